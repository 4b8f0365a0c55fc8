#!/usr/bin/env python3
"""Speed, cold start and memory of qnrt against ONNX Runtime, in one run.

Both engines run the same QuickNet (batch norm folded into the convolutions)
on the same inputs, interleaved, and the report gives medians and the ratio
qnrt / ONNX Runtime: only ratios measured in the same run mean anything on a
shared, noisy machine. It also says which BLAS kernel numpy used.

The cold-start section runs fresh processes (import, load, one run; the
Python API at 1x3x32x32 and 1x3x224x224, and `qnrt run` on one image) for
ONNX Runtime, qnrt with its JIT kernels (Numba's cache warm) and qnrt with the
ahead-of-time build, and reads each one's wall time and peak RSS from wait4.
It also compares the two kernel backends' steady-state speed. The AOT build
comes from --kernel-dir, else the default location if it matches, else
`qnrt compile` makes one in a temporary folder (about 80 s).

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

COLD_API = """
import sys
import numpy as np
engine, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = {"input": np.zeros((1, 3, size, size), np.float32)}
if engine == "ort":
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = int(__import__("os").environ["OPENBLAS_NUM_THREADS"])
    ort.InferenceSession(path, o, providers=["CPUExecutionProvider"]).run(None, x)
else:
    import qnrt
    s = qnrt.Session(path)
    s.run(None, x)
    assert s.kernel_backend == engine, (s.kernel_backend, engine)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"numba", "llvmlite"})
    assert engine == "jit" or not heavy, heavy
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
    nodes = {node.name: node for node in session.graph.nodes}
    for step in program.steps:
        for name, variant in step.members:  # a streamed step runs several nodes
            node = nodes[name]
            if node.attrs.get("weights_int8") and variant == "conv.pointwise.skinny":
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


# A child's ru_maxrss counts the memory of the process that forked it (it survives
# exec), so the measured process is started by a small launcher, not by this one.
LAUNCH = """
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(p.pid, 0)
wall = time.perf_counter() - t
err = p.stderr.read().decode()
print(wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
sys.stderr.write(err[-800:])
"""


def fresh_process(cmd: list, env: dict) -> tuple[float, float]:
    """(wall seconds from spawn to exit, peak RSS MiB) of one process, from wait4."""
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCH, *cmd], env=env,
                         capture_output=True, text=True)
    wall, maxrss_kib, code = out.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: {out.stderr.strip()[-500:]}")
    return float(wall), int(maxrss_kib) / 1024


def aot_build_dir(given: str | None, tmp: str) -> str:
    """A kernel build that matches this checkout: given, the default one, or a new one."""
    from qnrt import backend as be
    for folder in ([given] if given else [be.kernel_dir()]):
        exports, why = be._load_build(folder)
        if exports is not None:
            return folder
        if given:
            raise SystemExit(f"bench: --kernel-dir {given}: {why}")
    folder = os.path.join(tmp, "kernels")
    print("bench: no matching kernel build; running `qnrt compile` (about 80 s)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "qnrt", "compile", "--out", folder], check=True,
                   stdout=subprocess.DEVNULL)
    return folder


def cold_starts(qnb_path, onnx_path, kernels: str, rounds: int, threads: int) -> dict:
    """Fresh processes, interleaved: {case: {engine: (median wall s, median peak RSS MiB)}}."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "qnrt")],
                   check=True)  # bytecode present, as after a pip install
    base = {k: v for k, v in os.environ.items() if k not in ("QNRT_JIT", "QNRT_KERNEL_DIR")}
    base.update(PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS=str(threads))
    envs = {"ort": base, "jit": dict(base, QNRT_JIT="1"),
            "aot": dict(base, QNRT_KERNEL_DIR=kernels)}
    digit = os.path.join(ROOT, "examples", "digit_7.png")
    shipped = os.path.join(ROOT, "models", "quicknet_digits.qnb")
    cases = {f"api {n}x{n}": {e: [sys.executable, "-c", COLD_API, e,
                                  onnx_path if e == "ort" else qnb_path, str(n)]
                              for e in envs} for n in (32, 224)}
    cases["qnrt run (CLI), one digit"] = {
        e: [sys.executable, "-m", "qnrt", "run", shipped, digit] for e in ("jit", "aot")}
    for case in cases.values():  # prime: Numba's cache, the page cache
        for engine, cmd in case.items():
            fresh_process(cmd, envs[engine])
    samples = {c: {e: [] for e in case} for c, case in cases.items()}
    for _ in range(rounds):
        for c, case in cases.items():
            for engine, cmd in case.items():
                samples[c][engine].append(fresh_process(cmd, envs[engine]))
    return {c: {e: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v))
                for e, v in by_engine.items()} for c, by_engine in samples.items()}


STEADY = """
import sys, time, statistics
import numpy as np, qnrt
from threadpoolctl import threadpool_limits
threadpool_limits(int(sys.argv[3]), user_api="blas")
s = qnrt.Session(sys.argv[1])
shape = tuple(int(v) for v in sys.argv[2].split("x"))
x = {"input": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
for _ in range(3):
    s.run(None, x)
ts = []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter(); s.run(None, x); ts.append(time.perf_counter() - t)
print(s.kernel_backend, statistics.median(ts))
"""


def steady_backends(qnb_path, kernels: str, shapes, rounds: int, threads: int) -> dict:
    """{shape: {backend: median ms}}: JIT and AOT in alternating processes."""
    base = {k: v for k, v in os.environ.items() if k not in ("QNRT_JIT", "QNRT_KERNEL_DIR")}
    base.update(PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS=str(threads))
    envs = {"jit": dict(base, QNRT_JIT="1"), "aot": dict(base, QNRT_KERNEL_DIR=kernels)}
    out = {}
    for text in shapes:
        n = max(10, min(100, int(1e8 // np.prod([int(v) for v in text.split("x")]) // 100)))
        times = {b: [] for b in envs}
        for _ in range(rounds):
            for b, env in envs.items():
                got, med = subprocess.run(
                    [sys.executable, "-c", STEADY, qnb_path, text, str(threads), str(n)],
                    env=env, capture_output=True, text=True, check=True).stdout.split()
                assert got == b, (got, b)
                times[b].append(float(med))
        out[text] = {b: 1e3 * statistics.median(v) for b, v in times.items()}
    return out


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
    p.add_argument("--kernel-dir", help="the AOT kernel build to measure (default: the default "
                                        "location if it matches, else a new one)")
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
            from qnrt.backend import backend
            report["backend_in_process"] = backend().name
            kernels = aot_build_dir(args.kernel_dir, tmp)
            cold = cold_starts(qnb_path, onnx_path, kernels, args.cold, args.threads)
            report["cold_start"] = cold
            print(f"cold start: fresh processes, import + load + first answer, median of "
                  f"{args.cold} (wall from spawn to exit; peak RSS from wait4):", file=sys.stderr)
            print(f"  {'case':<28} {'ONNX Runtime':>16} {'qnrt JIT-cached':>20} "
                  f"{'qnrt AOT':>16} {'AOT/ORT wall':>13} {'AOT/ORT RSS':>12}",
                  file=sys.stderr)
            for case, by in cold.items():
                ort_ = by.get("ort") or cold["api 32x32"]["ort"]
                cells = [f"{by[e][0]:.3f} s {by[e][1]:4.0f} MiB" if e in by else "-"
                         for e in ("ort", "jit", "aot")]
                print(f"  {case:<28} {cells[0]:>16} {cells[1]:>20} {cells[2]:>16} "
                      f"{by['aot'][0] / ort_[0]:13.2f} {by['aot'][1] / ort_[1]:12.2f}"
                      + ("" if "ort" in by else "  (vs ORT's api 32x32)"), file=sys.stderr)
            steady = steady_backends(qnb_path, kernels, args.shapes, 5, args.threads)
            report["steady_backends"] = steady
            print("steady state, JIT vs AOT kernels (alternating processes, median of 5): "
                  + ", ".join(f"{k}: {v['jit']:.2f} vs {v['aot']:.2f} ms "
                              f"(AOT/JIT {v['aot'] / v['jit']:.2f})" for k, v in steady.items()),
                  file=sys.stderr)
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
