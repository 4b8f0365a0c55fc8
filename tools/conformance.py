#!/usr/bin/env python3
"""Convert ONNX models to .qnb and check qnrt against onnxruntime on the original.

For each model and input shape: `exporters.convert.convert` (import, clean-up,
optimize, write .qnb), then qnrt.Session and onnxruntime run the same random
inputs (and, for the self-test's torch models, torch's own output is a third
reference). One row per output: nodes before (ONNX) and after (.qnb), the max
abs error, the output scale max(1, max|ref|), their ratio (the relative
error), and PASS if it is <= the tolerance (1e-4 unless --tolerance).
Then, per output, the worst relative error over every input shape, and per
model the clean-up rules that fired. Exits 1 if anything fails (or does not
convert).

    python tools/conformance.py model.onnx other.onnx --input-shape 1,3,224,224
    python tools/conformance.py rec.onnx --input-shape 1,3,48,192 --input-shape 2,3,48,320
    python tools/conformance.py --self-test      # every model the tests build

An --input-shape given more than once for one input checks the model at each
shape (converted for each: the shape is fixed at conversion).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOLERANCE = 1e-4


def _shape_arg(text):
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not [NAME=]1,3,32,32") from None
    return (name or None), shape


def random_feeds(model, shapes: dict, seed: int) -> dict:
    """Random float32 inputs; a dynamic batch becomes 2, other dynamic dims must be
    given with --input-shape."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for k, vi in enumerate(v for v in model.graph.input if v.name not in inits):
        # any dim that is not a positive int (-1, 0, a name) is dynamic
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in vi.type.tensor_type.shape.dim]
        given = shapes.get(vi.name) or (shapes.get(None) if k == 0 else None)
        if given is not None:
            shape = given
        else:
            shape = [d if d else 2 if i == 0 else None for i, d in enumerate(dims)]
            if None in shape:
                raise ValueError(f"input '{vi.name}' has dynamic dims {dims}: give "
                                 f"--input-shape {vi.name}=...")
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def ort_run(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, feeds)


def check_model(path, name, feeds=None, expected=None, input_shape=None, shapes=None,
                seed=0, tmp=None, kernels="auto", tolerance=TOLERANCE) -> list[dict]:
    """Rows for one model at one input shape: one per output (or one ERROR row)."""
    import onnx

    from qnrt.exporters.convert import convert
    from qnrt import Session

    model = onnx.load(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
    row = {"model": name, "opset": opset, "before": len(model.graph.node), "after": "-",
           "shape": "-"}
    try:
        feeds = feeds if feeds is not None else random_feeds(model, shapes or {}, seed)
        row["shape"] = "x".join(map(str, next(iter(feeds.values())).shape)) if feeds else "-"
        names, refs = ort_run(model, feeds)
        tag = "-".join(map(str, input_shape)) if input_shape else "model"
        dst = os.path.join(tmp, f"{os.path.basename(path)}.{tag}.qnb")
        summary = convert(path, dst, input_shape=input_shape)
        sess = Session(dst, kernels=kernels)
        row["after"] = len(sess.graph.nodes)
        row["cleanup"] = summary.get("cleanup", {})
        ours = sess.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if os.environ.get("CONFORMANCE_TRACEBACK"):
            traceback.print_exc()
        return [{**row, "output": "-", "error": msg, "ok": False}]
    rows = []
    for k, (out, got, ref) in enumerate(zip(names, ours, refs)):
        r = {**row, "output": out}
        if got.shape != ref.shape:
            rows.append({**r, "error": f"shape {got.shape} != onnxruntime's {ref.shape}",
                         "ok": False})
            continue
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        ok = err <= tolerance * scale  # NaN where ORT has none fails
        if expected is not None and k < len(expected):
            ref_err = float(np.max(np.abs(got.astype(np.float64) - expected[k])))
            r["ref_err"] = ref_err
            ok = ok and ref_err <= tolerance * max(1.0, float(np.max(np.abs(expected[k]))))
        rows.append({**r, "err": err, "scale": scale, "rel": err / scale, "ok": ok})
    return rows


def print_table(rows, out=None):  # out None: sys.stdout as it is at the call
    head = ["model", "opset", "nodes", "input", "output", "max|err|", "scale", "rel err",
            "vs ref", "result"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], str(r["opset"]), f"{r['before']}->{r['after']}",
                          r.get("shape", "-"), r["output"], "-", "-", "-", "-",
                          "FAIL: " + r["error"]])
            continue
        table.append([r["model"], str(r["opset"]), f"{r['before']}->{r['after']}",
                      r.get("shape", "-"), r["output"][:20], f"{r['err']:.2e}",
                      f"{r['scale']:.3g}", f"{r['rel']:.2e}",
                      f"{r['ref_err']:.2e}" if "ref_err" in r else "-",
                      "PASS" if r["ok"] else "FAIL"])
    _print_columns(head, table, out)


def _print_columns(head, table, out):
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h)
              for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(head), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for t in table:
        print(line(t), file=out)


def worst_errors(rows) -> list[dict]:
    """Per (model, output): the worst relative error over every input shape it ran
    at, and that shape (rows that failed to run count as infinitely bad)."""
    worst: dict = {}
    for r in rows:
        if r["output"] == "-":
            continue
        key = (r["model"], r["opset"], r["output"])
        rel = r.get("rel", float("inf"))
        rel = float("inf") if rel != rel else rel  # NaN: as bad as it gets
        runs = worst[key]["runs"] + 1 if key in worst else 1
        if key not in worst or rel > worst[key]["rel"]:
            worst[key] = {"model": r["model"], "output": r["output"], "rel": rel,
                          "shape": r.get("shape", "-")}
        worst[key]["runs"] = runs
    return list(worst.values())


def print_worst(rows, out=None):
    table = [[w["model"], w["output"][:20], str(w["runs"]), f"{w['rel']:.2e}", w["shape"]]
             for w in worst_errors(rows)]
    print("\nworst relative error per output (max|err| / max(1, max|onnxruntime output|)):",
          file=out)
    _print_columns(["model", "output", "shapes", "worst rel err", "at input"], table, out)


def print_cleanup(rows, out=None):
    """Per model, the clean-up rules that fired (exporters.cleanup.summary)."""
    from qnrt.exporters.cleanup import summary

    seen, lines = set(), []
    for r in rows:
        key = (r["model"], r["opset"], r.get("shape", "-"))
        if "cleanup" not in r or key in seen:
            continue
        seen.add(key)
        lines.append(f"  {r['model']} (opset {r['opset']}, {r.get('shape', '-')}): "
                     + summary(r["cleanup"]))
    if lines:
        print("\nclean-up rules fired:", file=out)
        print("\n".join(lines), file=out)


def self_test_cases(torch_models=True):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    module = importlib.import_module("test_messy_onnx")
    return module.messy_models(torch_models=torch_models)


def dynamic_test_cases(torch_models=True):
    """(name, model, input shapes) for the dynamic-dims models tests/test_dynamic_onnx.py
    builds (paddle2onnx-, tf2onnx- and torch-style), each checked at two shapes."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    module = importlib.import_module("test_dynamic_onnx")
    return module.dynamic_models(torch_models=torch_models)


def _shape_runs(given: list) -> list[dict]:
    """--input-shape values -> one {name: shape} per run: an input given k times
    is checked at each of its k shapes (the others keep their one shape)."""
    by_name: dict = {}
    for name, shape in given:
        by_name.setdefault(name, []).append(shape)
    runs = max((len(v) for v in by_name.values()), default=1)
    return [{k: v[min(i, len(v) - 1)] for k, v in by_name.items()} for i in range(runs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="ONNX files")
    parser.add_argument("--self-test", action="store_true",
                        help="also every model tests/test_messy_onnx.py and "
                             "tests/test_dynamic_onnx.py build")
    parser.add_argument("--no-torch", action="store_true",
                        help="--self-test without the torch.onnx exports")
    parser.add_argument("--input-shape", action="append", type=_shape_arg, default=[],
                        metavar="[NAME=]1,3,32,32",
                        help="shape of an input with dynamic dims (no NAME: the first input); "
                             "the first input's shape is also given to the converter; "
                             "repeat it to check the model at several shapes")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest relative error that passes (default {TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", choices=["auto", "reference"], default="auto",
                        help="run qnrt's fastest kernel variants (auto) or every op's reference")
    args = parser.parse_args(argv)
    if not args.models and not args.self_test:
        parser.error("give ONNX files and/or --self-test")
    import onnx

    rows = []
    with tempfile.TemporaryDirectory(prefix="qnrt-conformance-") as tmp:
        for shapes in _shape_runs(args.input_shape):
            first_shape = shapes.get(None) or (next(iter(shapes.values())) if len(shapes) == 1
                                               else None)
            for path in args.models:
                try:
                    rows += check_model(path, os.path.basename(path), input_shape=first_shape,
                                        shapes=shapes, seed=args.seed, tmp=tmp,
                                        kernels=args.kernels, tolerance=args.tolerance)
                except Exception as exc:  # one unreadable model must not hide the others
                    print(f"conformance: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    rows.append({"model": os.path.basename(path), "opset": "-", "before": "-",
                                 "after": "-", "output": "-", "error": str(exc), "ok": False})
        if args.self_test:
            for case in self_test_cases(not args.no_torch):
                path = os.path.join(tmp, f"{case.name}-opset{case.opset}.onnx")
                onnx.save(case.model, path)
                rows += check_model(path, case.name, feeds=case.feeds, expected=case.expected,
                                    tmp=tmp, kernels=args.kernels, tolerance=args.tolerance)
            for name, model, shapes in dynamic_test_cases(not args.no_torch):
                path = os.path.join(tmp, f"{name}.onnx")
                onnx.save(model, path)
                for k, shape in enumerate(shapes):
                    rows += check_model(path, name, input_shape=shape, shapes={None: shape},
                                        seed=args.seed + k, tmp=tmp, kernels=args.kernels,
                                        tolerance=args.tolerance)
    print_table(rows)
    print_worst(rows)
    print_cleanup(rows)
    failed = sum(not r["ok"] for r in rows)
    models = len({(r["model"], r["opset"], r["before"]) for r in rows})
    compared = [r["rel"] for r in rows if "rel" in r]
    worst = f"{max(compared):.2e}" if compared else "-"
    print(f"\n{models} models, {len(rows)} outputs: "
          + (f"{failed} FAILED" if failed else "all PASS")
          + f" (worst relative error {worst}; tolerance {args.tolerance:g} x "
          + f"max(1, max|onnxruntime output|); {args.kernels} kernels)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
