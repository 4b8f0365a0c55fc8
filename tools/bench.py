#!/usr/bin/env python3
"""Speed, cold start and memory of qnrt against ONNX Runtime, in one run.

Both engines run the same QuickNet (batch norm folded into the convolutions)
on the same inputs, interleaved, and the report gives medians and the ratio
qnrt / ONNX Runtime: only ratios measured in the same run mean anything on a
shared, noisy machine. It also says which BLAS kernel numpy used.

    python tools/bench.py                       # all three shapes, 1 thread
    python tools/bench.py --shapes 1x3x32x32 --repeat 200 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SHAPES = ("1x3x32x32", "32x3x32x32", "1x3x224x224")

PEAK_RSS = """
def peak_rss_kib():  # VmHWM: this process's own peak (ru_maxrss survives exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
"""
COLD_QNRT = PEAK_RSS + """
import time, sys
t0 = time.perf_counter()
import numpy as np, qnrt
s = qnrt.Session(sys.argv[1])
s.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
t1 = time.perf_counter()
print(t1 - t0, peak_rss_kib())
"""
COLD_ORT = PEAK_RSS + """
import time, sys
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = int(__import__("os").environ["OPENBLAS_NUM_THREADS"])
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
t1 = time.perf_counter()
print(t1 - t0, peak_rss_kib())
"""
RSS_RUN = """
import resource, sys, numpy as np
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
engine, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if engine == "qnrt":  # the engine's import is not the model's cost: import first
    import qnrt.session as eng
    from qnrt.ops import all_variants
    all_variants()  # imports numba and every kernel module (compiled code loads on first use)
    base = rss(); s = eng.Session(path)
else:
    import onnxruntime as eng
    o = eng.SessionOptions(); o.intra_op_num_threads = int(__import__("os").environ["OPENBLAS_NUM_THREADS"])
    base = rss(); s = eng.InferenceSession(path, o, providers=["CPUExecutionProvider"])
loaded = rss()
s.run(None, {"input": np.zeros((1, 3, size, size), np.float32)})
print(loaded - base, rss() - base)
"""


def _nchw(text: str) -> str:
    dims = text.lower().split("x")
    if len(dims) != 4 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1x3x32x32")
    return text.lower()


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        desc = ", ".join(f"{i['internal_api']} {i.get('version')} kernel={i.get('architecture')} "
                         f"threads={i['num_threads']}" for i in infos)
    except ImportError:
        desc = "threadpoolctl not installed; numpy BLAS unknown"
    core = os.environ.get("OPENBLAS_CORETYPE")
    return desc + (f" (OPENBLAS_CORETYPE={core})" if core else "")


def build_models(tmp: str, weights: str | None) -> tuple[str, str]:
    from qnrt.exporters.onnx_export import save_onnx
    from qnrt.models import quicknet
    from qnrt import format as qnb
    from qnrt.rewrite import optimize

    if weights and weights.endswith(".qnb"):
        graph = qnb.load(weights)
        graph = optimize(graph)
    else:
        w = None
        if weights:
            with np.load(weights) as d:
                w = {k: d[k] for k in d.files}
        graph = optimize(quicknet.build(w, input_size=None))
    qnb_path, onnx_path = os.path.join(tmp, "m.qnb"), os.path.join(tmp, "m.onnx")
    qnb.save(graph, qnb_path)
    graph = qnb.load(qnb_path)
    graph.inputs[0].shape = ("N", 3, "H", "W")
    save_onnx(graph, onnx_path)  # ORT gets the same folded weights, PReLU unfused as ONNX needs
    return qnb_path, onnx_path


INT8_SHAPE = (1, 3, 32, 32)  # the shape also timed with Session(weights="int8")


def skinny_weight_bytes(session, shape) -> tuple[int, int]:
    """Weight bytes the int8 layers that run on conv.pointwise.skinny (the
    kernel that reads int8 itself) of an int8-weights session read per run: as
    float32 and as int8."""
    program = session.prepare({session.get_inputs()[0].name: shape})
    n = 0
    for node, step in zip(session.graph.nodes, program.steps):
        if node.attrs.get("weights_int8") and step.kernel.name == "conv.pointwise.skinny":
            n += session.graph.initializers[node.inputs[1]].size
    return 4 * n, n


def time_engines(qnb_path: str, onnx_path: str, shape, repeat: int, threads: int) -> dict:
    import onnxruntime as ort

    import qnrt

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    ref = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    ours = qnrt.Session(qnb_path)
    ours8 = qnrt.Session(qnb_path, weights="int8") if tuple(shape) == INT8_SHAPE else None
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feed = {"input": x}
    a, b = ours.run(None, feed)[0], ref.run(None, feed)[0]
    err = float(np.abs(a - b).max())
    for _ in range(3):  # warm both: JIT cache load, ORT's first-run allocations
        ours.run(None, feed), ref.run(None, feed)
        if ours8 is not None:
            ours8.run(None, feed)
    tq, to, t8 = [], [], []
    for _ in range(repeat):  # interleaved, so both see the same machine noise
        t = time.perf_counter(); ours.run(None, feed); tq.append(time.perf_counter() - t)
        t = time.perf_counter(); ref.run(None, feed); to.append(time.perf_counter() - t)
        if ours8 is not None:
            t = time.perf_counter(); ours8.run(None, feed); t8.append(time.perf_counter() - t)
    mq, mo = statistics.median(tq), statistics.median(to)
    out = {"shape": list(shape), "qnrt_ms": 1e3 * mq, "ort_ms": 1e3 * mo,
           "ratio": mq / mo, "max_abs_diff": err}
    if ours8 is not None:
        m8 = statistics.median(t8)
        fp32_bytes, int8_bytes = skinny_weight_bytes(ours8, tuple(shape))
        out["int8_weights"] = {"qnrt_ms": 1e3 * m8, "ratio": m8 / mo,
                               "max_abs_diff": float(np.abs(ours8.run(None, feed)[0] - b).max()),
                               "skinny_weight_bytes_fp32": fp32_bytes,
                               "skinny_weight_bytes_int8": int8_bytes}
    return out


def child(script: str, *args, threads: int = 1) -> list[float]:
    # both engines get the same thread count: ORT by its option, numpy's BLAS here
    env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, check=True).stdout
    return [float(v) for v in out.split()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), type=_nchw,
                   help=f"NxCxHxW shapes (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--repeat", type=int, default=0, help="timed runs per shape (default: by size)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for ONNX Runtime and numpy's BLAS (default 1)")
    p.add_argument("--weights", help="a .qnb or neutral .npz to benchmark (default: initial weights)")
    p.add_argument("--cold", type=int, default=5,
                   help="fresh processes for cold start (default 5; 0 skips)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(args.threads, user_api="blas")
    except ImportError:
        limiter = None
    report = {"blas": blas_info(), "threads": args.threads, "runs": []}
    print(f"numpy BLAS: {report['blas']}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        qnb_path, onnx_path = build_models(tmp, args.weights)
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split("x"))
            repeat = args.repeat or max(10, min(200, int(2e8 // np.prod(shape) // 1000)))
            r = time_engines(qnb_path, onnx_path, shape, repeat, args.threads)
            r["repeat"] = repeat
            report["runs"].append(r)
            print(f"{text:>13}: qnrt {r['qnrt_ms']:8.2f} ms   onnxruntime {r['ort_ms']:8.2f} ms   "
                  f"qnrt/ort {r['ratio']:5.2f}   (median of {repeat}, max |diff| "
                  f"{r['max_abs_diff']:.1e})", file=sys.stderr)
            if "int8_weights" in r:
                q8 = r["int8_weights"]
                print(f"{'':>13}  qnrt int8-weights {q8['qnrt_ms']:8.2f} ms   qnrt int8/ort "
                      f"{q8['ratio']:5.2f}   (same loop, max |diff| vs ort "
                      f"{q8['max_abs_diff']:.1e}); skinny layers read "
                      f"{q8['skinny_weight_bytes_fp32'] / 2**20:.2f} MiB of weights fp32 vs "
                      f"{q8['skinny_weight_bytes_int8'] / 2**20:.2f} MiB int8", file=sys.stderr)
        if args.cold:
            cq = [child(COLD_QNRT, qnb_path, threads=args.threads) for _ in range(args.cold)]
            co = [child(COLD_ORT, onnx_path, threads=args.threads) for _ in range(args.cold)]
            cold = {"qnrt_s": statistics.median(c[0] for c in cq),
                    "ort_s": statistics.median(c[0] for c in co),
                    "qnrt_peak_rss_mib": statistics.median(c[1] for c in cq) / 1024,
                    "ort_peak_rss_mib": statistics.median(c[1] for c in co) / 1024}
            cold["ratio"] = cold["qnrt_s"] / cold["ort_s"]
            report["cold_start"] = cold
            print(f"cold start (import + load + first 1x3x32x32 answer, median of {args.cold} "
                  f"processes): qnrt {cold['qnrt_s']:.3f} s / {cold['qnrt_peak_rss_mib']:.0f} MiB "
                  f"peak RSS, onnxruntime {cold['ort_s']:.3f} s / {cold['ort_peak_rss_mib']:.0f} MiB, "
                  f"ratio {cold['ratio']:.2f}", file=sys.stderr)
            growth = {}
            for engine, path in (("qnrt", qnb_path), ("ort", onnx_path)):
                load, run = child(RSS_RUN, engine, path, "224", threads=args.threads)
                growth[engine] = {"load_mib": load / 1024, "load_and_224_run_mib": run / 1024}
            report["rss_growth"] = growth
            print(f"RSS growth: load qnrt {growth['qnrt']['load_mib']:.1f} MiB vs onnxruntime "
                  f"{growth['ort']['load_mib']:.1f} MiB; load + one 224x224 run qnrt "
                  f"{growth['qnrt']['load_and_224_run_mib']:.1f} MiB vs onnxruntime "
                  f"{growth['ort']['load_and_224_run_mib']:.1f} MiB", file=sys.stderr)
    if limiter is not None:
        limiter.restore_original_limits()
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
