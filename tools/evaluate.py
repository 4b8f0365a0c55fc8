#!/usr/bin/env python3
"""Held-out accuracy of a .qnb model, three ways: PyTorch, ONNX Runtime on the
ONNX we export from the same graph, and qnrt. The three must agree. For a
digits model, also its accuracy on everyday input (qnrt): held-out digits drawn
with margins on canvases of several sizes in both polarities, and held-out
non-digits, which it should call "not a digit".

PyTorch runs the graph with torch.nn.functional (an engine independent of
qnrt's kernels); ONNX Runtime runs exporters.onnx_export's ONNX of it. Every
image goes through the preprocessing stored in the model being evaluated.

    python tools/evaluate.py models/quicknet_digits.qnb models/quicknet_digits_dc.qnb
    python tools/evaluate.py --everyday-only --by-condition models/quicknet_digits_dc.qnb
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def heldout(dataset: str, data_dir: str | None, metadata: dict):
    import datasets

    if dataset == "digits":
        _, _, images, labels = datasets.digits_split()
    else:
        _, _, images, labels = datasets.cifar10_split(data_dir)
    return datasets.to_array(images, metadata), np.asarray(labels)


def torch_engine(graph):
    """Run an IR graph (after qnrt's rewrites) with torch.nn.functional."""
    import torch
    import torch.nn.functional as F

    consts = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in graph.initializers.items()}

    def act(y, node, slope):
        kind = node.attrs.get("activation", "")
        if kind == "PRelu":
            return torch.where(y >= 0, y, y * slope.view(1, -1, 1, 1))
        if kind == "Relu":
            return torch.relu(y)
        if kind == "":
            return y
        raise NotImplementedError(kind)

    def run(x: np.ndarray) -> np.ndarray:
        env = {graph.inputs[0].name: torch.from_numpy(x)}
        for node in graph.nodes:
            ins = [env[i] if i in env else consts.get(i) for i in node.inputs]
            a = node.attrs
            if node.op == "Conv":
                pads = a.get("pads", [0, 0, 0, 0])
                assert pads[:2] == pads[2:], "symmetric pads only"
                y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                             stride=a.get("strides", [1, 1]), padding=pads[:2],
                             dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
                y = act(y, node, ins[3] if len(ins) > 3 else None)
            elif node.op == "MaxPool":
                y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides"))
            elif node.op == "GlobalAveragePool":
                y = ins[0].mean(dim=(2, 3), keepdim=True)
            elif node.op == "Flatten":
                y = torch.flatten(ins[0], a.get("axis", 1))
            elif node.op == "Softmax":
                y = torch.softmax(ins[0], a.get("axis", -1))
            else:
                raise NotImplementedError(f"{node.op} in the PyTorch evaluator")
            env[node.outputs[0]] = y
        return env[graph.outputs[0].name].numpy()

    def batched(x):
        with torch.no_grad():
            return np.concatenate([run(x[i:i + 128]) for i in range(0, len(x), 128)])
    return batched


def evaluate(path: str, data_dir: str | None = None) -> dict:
    import copy

    import onnxruntime as ort

    from qnrt.exporters.onnx_export import to_onnx
    from qnrt import Session

    session = Session(path)
    meta = session.metadata
    dataset = meta.get("model.dataset", "digits")
    x, y = heldout(dataset, data_dir, meta)
    graph = session.graph
    preds = {}
    preds["qnrt"] = np.concatenate([session.run(None, {"input": x[i:i + 64]})[0]
                                    for i in range(0, len(x), 64)]).argmax(1)
    onnx_graph = copy.deepcopy(graph)
    onnx_graph.inputs[0].shape = ("N",) + tuple(onnx_graph.inputs[0].shape[1:])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ref = ort.InferenceSession(to_onnx(onnx_graph).SerializeToString(), opts,
                               providers=["CPUExecutionProvider"])
    preds["onnxruntime"] = ref.run(None, {"input": x})[0].argmax(1)
    preds["pytorch"] = torch_engine(graph)(x).argmax(1)
    result = {"model": path, "dataset": dataset, "images": int(len(y)),
              "file_bytes": os.path.getsize(path)}
    for name, p in preds.items():
        result[f"{name}_accuracy"] = float((p == y).mean())
    result["agreement_qnrt_onnxruntime"] = float((preds["qnrt"] == preds["onnxruntime"]).mean())
    result["agreement_qnrt_pytorch"] = float((preds["qnrt"] == preds["pytorch"]).mean())
    return result


def _predict(session, images, batch: int = 64) -> np.ndarray:
    import datasets

    meta = session.metadata
    out = []
    for i in range(0, len(images), batch):
        x = datasets.to_array(images[i:i + batch], meta)
        out.append(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def everyday(path: str, seed: int | None = None) -> dict:
    """qnrt's accuracy on the held-out everyday sets of tools/datasets.py:
    `drawn_digits` (right = the digit) and `non_digits` (right = "not a
    digit"; a model without that label gets none right), overall and by
    condition ("by_condition": {name: [right, total]})."""
    import datasets

    from qnrt import Session

    session = Session(path)
    labels = [str(v) for v in session.metadata.get("labels", [])]
    seed = datasets.HELDOUT_SEED if seed is None else seed
    drawn = list(datasets.drawn_digits(seed))
    names, others = zip(*datasets.non_digits(seed))
    pred_drawn = _predict(session, [d.image for d in drawn])
    pred_other = _predict(session, list(others))
    name_of = lambda k: labels[k] if k < len(labels) else str(k)  # noqa: E731
    right_drawn = np.array([name_of(k) == str(d.label) for k, d in zip(pred_drawn, drawn)])
    right_other = np.array([name_of(k) == datasets.NOT_A_DIGIT for k in pred_other])
    groups: dict[str, list[int]] = {}

    def add(key, ok):
        g = groups.setdefault(key, [0, 0])
        g[0] += int(ok)
        g[1] += 1

    conditions = (
        lambda d: "handwritten" if d.source == "handwritten" else "held-out fonts",
        lambda d: f"{d.canvas}x{d.canvas}",
        lambda d: f"digit {int(100 * d.height)} % of the height",
        lambda d: d.polarity,
        lambda d: f"{d.polarity}, {d.canvas}x{d.canvas}, {int(100 * d.height)} %",
    )
    for condition in conditions:
        ordered = sorted(drawn, key=lambda d: (d.source != "handwritten", d.polarity != "white on black",
                                               d.canvas, d.height))
        for key in dict.fromkeys(condition(d) for d in ordered):
            groups[f"drawn: {key}"] = [0, 0]
        for d, ok in zip(drawn, right_drawn):
            add(f"drawn: {condition(d)}", ok)
    for name, ok in zip(names, right_other):
        add(f"not a digit: {name.rsplit(' ', 1)[0] if not name.startswith('whole') else 'whole photos'}", ok)
    fooled = [name_of(k) for k in pred_other if name_of(k) != datasets.NOT_A_DIGIT]
    return {"model": path, "drawn_images": len(drawn), "drawn_accuracy": float(right_drawn.mean()),
            "non_digit_images": len(others), "non_digit_accuracy": float(right_other.mean()),
            "drawn_called_not_a_digit": float(np.mean([name_of(k) == datasets.NOT_A_DIGIT
                                                       for k in pred_drawn])),
            "non_digits_read_as": {v: fooled.count(v) for v in sorted(set(fooled))},
            "by_condition": groups}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help=".qnb files (their metadata names the dataset)")
    p.add_argument("--data-dir", help="CIFAR-10 python-batch folder, for cifar10 models")
    p.add_argument("--json", action="store_true")
    p.add_argument("--everyday-only", action="store_true",
                   help="only the drawn-digit and non-digit sets (no held-out three-engine check)")
    p.add_argument("--by-condition", action="store_true",
                   help="also print the everyday accuracy per canvas, height and polarity")
    args = p.parse_args(argv)
    from qnrt.format import FormatError
    from qnrt.graph import GraphError

    try:
        rows = [] if args.everyday_only else [evaluate(m, args.data_dir) for m in args.models]
        daily = [everyday(m) for m in args.models
                 if rows and rows[0]["dataset"] == "digits" or args.everyday_only]
    except (OSError, FormatError, GraphError, ValueError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"heldout": rows, "everyday": daily}, indent=2))
        return 0
    if rows:
        _print_heldout(rows)
    if daily:
        _print_everyday(daily, args.by_condition)
    return 0


def _print_everyday(daily, by_condition: bool) -> None:
    print()
    print("| model | drawn digits | not a digit | drawn digits called not a digit |")
    print("|---|---:|---:|---:|")
    for r in daily:
        print(f"| {os.path.basename(r['model'])} | {100 * r['drawn_accuracy']:.2f} % | "
              f"{100 * r['non_digit_accuracy']:.2f} % | {100 * r['drawn_called_not_a_digit']:.2f} % |")
    print(f"({daily[0]['drawn_images']} held-out drawn digits, {daily[0]['non_digit_images']} "
          "held-out non-digits: tools/datasets.py drawn_digits, non_digits)")
    if by_condition:
        keys = list(daily[0]["by_condition"])
        print()
        print("| condition | images | " + " | ".join(os.path.basename(r["model"]) for r in daily) + " |")
        print("|---|---:|" + "---:|" * len(daily))
        for k in keys:
            cells = [r["by_condition"][k] for r in daily]
            print(f"| {k} | {cells[0][1]} | "
                  + " | ".join(f"{100 * c[0] / c[1]:.1f} %" for c in cells) + " |")


def _print_heldout(rows) -> None:
    print("| model | size | PyTorch | ONNX Runtime | qnrt | qnrt = ORT | qnrt = PyTorch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {os.path.basename(r['model'])} | {r['file_bytes'] / 2**20:.2f} MiB | "
              f"{100 * r['pytorch_accuracy']:.2f} % | {100 * r['onnxruntime_accuracy']:.2f} % | "
              f"{100 * r['qnrt_accuracy']:.2f} % | {100 * r['agreement_qnrt_onnxruntime']:.2f} % | "
              f"{100 * r['agreement_qnrt_pytorch']:.2f} % |")
    print(f"(held-out {rows[0]['dataset']}: {rows[0]['images']} images)")


if __name__ == "__main__":
    sys.exit(main())
