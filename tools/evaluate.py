#!/usr/bin/env python3
"""Held-out accuracy of a .qnb model, three ways: PyTorch, ONNX Runtime on the
ONNX we export from the same graph, and qnrt. The three must agree.

PyTorch runs the graph with torch.nn.functional (an engine independent of
qnrt's kernels); ONNX Runtime runs exporters.onnx_export's ONNX of it.

    python tools/evaluate.py models/quicknet_digits.qnb models/quicknet_digits_dc.qnb
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help=".qnb files (their metadata names the dataset)")
    p.add_argument("--data-dir", help="CIFAR-10 python-batch folder, for cifar10 models")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from qnrt.format import FormatError
    from qnrt.graph import GraphError

    try:
        rows = [evaluate(m, args.data_dir) for m in args.models]
    except (OSError, FormatError, GraphError, ValueError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"| model | size | PyTorch | ONNX Runtime | qnrt | qnrt = ORT | qnrt = PyTorch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {os.path.basename(r['model'])} | {r['file_bytes'] / 2**20:.2f} MiB | "
              f"{100 * r['pytorch_accuracy']:.2f} % | {100 * r['onnxruntime_accuracy']:.2f} % | "
              f"{100 * r['qnrt_accuracy']:.2f} % | {100 * r['agreement_qnrt_onnxruntime']:.2f} % | "
              f"{100 * r['agreement_qnrt_pytorch']:.2f} % |")
    print(f"(held-out {rows[0]['dataset']}: {rows[0]['images']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
