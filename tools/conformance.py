#!/usr/bin/env python3
"""Convert ONNX models to .qnb and check qnrt against onnxruntime on the original.

For each model: `exporters.convert.convert` (import, clean-up, optimize, write
.qnb), then qnrt.Session and onnxruntime run the same random inputs (and, for
the self-test's torch models, torch's own output is a third reference). One row
per output: nodes before (ONNX) and after (.qnb), the max abs error, the output
scale max(1, max|ref|), their ratio, and PASS if the error is <= 1e-4 x scale.
Exits 1 if anything fails (or does not convert).

    python tools/conformance.py model.onnx other.onnx --input-shape 1,3,224,224
    python tools/conformance.py --self-test      # every model tests/test_messy_onnx.py builds
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
        dims = [d.dim_value if d.HasField("dim_value") else None
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
                seed=0, tmp=None, kernels="auto") -> list[dict]:
    """Rows for one model: one per output (or one ERROR row)."""
    import onnx

    from qnrt.exporters.convert import convert
    from qnrt import Session

    model = onnx.load(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
    row = {"model": name, "opset": opset, "before": len(model.graph.node), "after": "-"}
    try:
        feeds = feeds if feeds is not None else random_feeds(model, shapes or {}, seed)
        names, refs = ort_run(model, feeds)
        dst = os.path.join(tmp, f"{os.path.basename(path)}.qnb")
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
        ok = err <= TOLERANCE * scale
        if expected is not None and k < len(expected):
            ref_err = float(np.max(np.abs(got.astype(np.float64) - expected[k])))
            r["ref_err"] = ref_err
            ok = ok and ref_err <= TOLERANCE * max(1.0, float(np.max(np.abs(expected[k]))))
        rows.append({**r, "err": err, "scale": scale, "ok": ok})
    return rows


def print_table(rows, out=sys.stdout):
    head = ["model", "opset", "nodes", "output", "max|err|", "scale", "err/scale", "vs ref",
            "result"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], str(r["opset"]), f"{r['before']}->{r['after']}",
                          r["output"], "-", "-", "-", "-", "FAIL: " + r["error"]])
            continue
        table.append([r["model"], str(r["opset"]), f"{r['before']}->{r['after']}",
                      r["output"][:20], f"{r['err']:.2e}", f"{r['scale']:.3g}",
                      f"{r['err'] / r['scale']:.2e}",
                      f"{r['ref_err']:.2e}" if "ref_err" in r else "-",
                      "PASS" if r["ok"] else "FAIL"])
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h)
              for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(head), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for t in table:
        print(line(t), file=out)


def self_test_cases(torch_models=True):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    module = importlib.import_module("test_messy_onnx")
    return module.messy_models(torch_models=torch_models)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="ONNX files")
    parser.add_argument("--self-test", action="store_true",
                        help="also every model tests/test_messy_onnx.py builds")
    parser.add_argument("--no-torch", action="store_true",
                        help="--self-test without the torch.onnx exports")
    parser.add_argument("--input-shape", action="append", type=_shape_arg, default=[],
                        metavar="[NAME=]1,3,32,32",
                        help="shape of an input with dynamic dims (no NAME: the first input); "
                             "the first input's shape is also given to the converter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", choices=["auto", "reference"], default="auto",
                        help="run qnrt's fastest kernel variants (auto) or every op's reference")
    args = parser.parse_args(argv)
    if not args.models and not args.self_test:
        parser.error("give ONNX files and/or --self-test")
    import onnx

    shapes = dict(args.input_shape)
    first_shape = shapes.get(None) or (next(iter(shapes.values())) if len(shapes) == 1 else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qnrt-conformance-") as tmp:
        for path in args.models:
            try:
                rows += check_model(path, os.path.basename(path), input_shape=first_shape,
                                    shapes=shapes, seed=args.seed, tmp=tmp,
                                    kernels=args.kernels)
            except Exception as exc:  # one unreadable model must not hide the others
                print(f"conformance: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
                rows.append({"model": os.path.basename(path), "opset": "-", "before": "-",
                             "after": "-", "output": "-", "error": str(exc), "ok": False})
        if args.self_test:
            for case in self_test_cases(not args.no_torch):
                path = os.path.join(tmp, f"{case.name}-opset{case.opset}.onnx")
                onnx.save(case.model, path)
                rows += check_model(path, case.name, feeds=case.feeds, expected=case.expected,
                                    tmp=tmp, kernels=args.kernels)
    print_table(rows)
    failed = sum(not r["ok"] for r in rows)
    models = len({(r["model"], r["opset"], r["before"]) for r in rows})
    print(f"\n{models} models, {len(rows)} outputs: "
          + (f"{failed} FAILED" if failed else "all PASS")
          + f" (tolerance {TOLERANCE:g} x max(1, max|onnxruntime output|); "
          + f"{args.kernels} kernels)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
