#!/usr/bin/env python3
"""Speed of qnrt against its peers, and its cold start and memory, in one run.

Every engine (qnrt, and ONNX Runtime, OpenVINO and ncnn where installed:
`pip install 'qnrt[bench]'`; tools/peers.py) runs the same QuickNet (batch
norm folded into the convolutions) on the same inputs at the same thread
count, in interleaved rounds after warm-up. The report gives medians, p10
and p90, the ratio of qnrt to each peer and to the compute floor (the
model's multiply-adds at numpy's sgemm peak, measured in the same run), and
a header with the machine, the versions, the thread counts and the BLAS
kernel: only ratios measured in the same run mean anything on a shared,
noisy machine. Each case runs at 1 thread and at every core.

The cold-start section runs fresh processes (import, load, one run; the
Python API at 1x3x32x32 and 1x3x224x224, and `qnrt run` on one image) for
ONNX Runtime, qnrt with its JIT kernels (Numba's cache warm) and qnrt with the
ahead-of-time build, and reads each one's wall time and peak RSS from wait4.
It also compares the two kernel backends' steady-state speed. The AOT build
comes from --kernel-dir, else the default location if it matches, else
`qnrt compile` makes one in a temporary folder (about 80 s).

    python tools/bench.py                       # all three shapes, 1 thread and all cores
    python tools/bench.py --shapes 1x3x32x32 --rounds 40 --threads 2 --cold 0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

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
    import os, qnrt
    s = qnrt.Session(path, num_threads=int(os.environ["OPENBLAS_NUM_THREADS"]))
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
    base = rss(); s = eng.Session(path, num_threads=int(__import__("os").environ["OPENBLAS_NUM_THREADS"]))
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


def machine_header(threads_list) -> dict:
    """What the numbers were measured on: machine, versions, threads, BLAS."""
    import platform

    import numba

    import qnrt
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.lower().startswith(("model name", "hardware"))), cpu)
    except OSError:
        pass
    versions = {"qnrt": qnrt.__version__, "numpy": np.__version__, "numba": numba.__version__}
    for mod in ("onnxruntime", "openvino", "ncnn"):
        try:
            m = __import__(mod)
            versions[mod] = str(getattr(m, "__version__", "?")).split("-")[0]
        except ImportError:
            pass
    from qnrt.threads import available_cores
    return {"cpu": cpu, "cores": available_cores(), "python": platform.python_version(),
            "versions": versions, "threads": list(threads_list), "blas": blas_info()}


def time_case(qnb_path: str, onnx_path: str, shape, threads: int, rounds: int, tmp: str,
              peak_gflops: float) -> dict:
    """Every engine on this shape at this thread count, interleaved: per engine
    median/p10/p90 ms, max |diff| against ONNX Runtime (else qnrt), and qnrt's
    ratio to each; the compute floor from the sgemm peak."""
    import peers

    engs = peers.engines(qnb_path, onnx_path, shape, threads, tmp,
                         say=lambda m: print(m, file=sys.stderr))
    unstreamed = peers.qnrt_unstreamed_engine(qnb_path, shape, threads)
    if unstreamed is not None:
        engs.append(unstreamed)
    if tuple(shape) == INT8_SHAPE:
        import qnrt
        s8 = qnrt.Session(qnb_path, weights="int8", num_threads=threads)
        engs.append(peers.Engine("qnrt int8-weights", qnrt.__version__,
                                 lambda x: s8.run(None, {"input": x})[0], threads))
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    ref_name = "onnxruntime" if any(e.name == "onnxruntime" for e in engs) else "qnrt"
    ref = np.asarray(next(e for e in engs if e.name == ref_name).run(x))
    diffs = {e.name: float(np.abs(np.asarray(e.run(x)).reshape(ref.shape) - ref).max())
             for e in engs}
    peers.interleaved(engs, x, rounds)
    macs = peers.model_macs(qnb_path, shape)
    floor_ms = 2e3 * macs / (peak_gflops * 1e9)
    out = {"shape": list(shape), "threads": threads, "macs": macs,
           "floor_ms": floor_ms, "sgemm_peak_gflops": peak_gflops, "engines": {}}
    q = statistics.median(engs[0].times)
    for e in engs:
        m = statistics.median(e.times)
        out["engines"][e.name] = {**peers.summary(e.times), "version": e.version,
                                  "note": e.note, f"max_abs_diff_vs_{ref_name}": diffs[e.name],
                                  "qnrt_over_this": q / m}
    peer_medians = {n: r["median_ms"] for n, r in out["engines"].items()
                    if not n.startswith("qnrt")}
    if peer_medians:
        fastest = min(peer_medians, key=peer_medians.get)
        out["fastest_peer"] = fastest
        out["qnrt_over_fastest_peer"] = 1e3 * q / peer_medians[fastest]
    out["qnrt_over_floor"] = 1e3 * q / floor_ms
    return out


def print_case(r: dict) -> None:
    shape = "x".join(str(d) for d in r["shape"])
    print(f"{shape} on {r['threads']} thread(s): floor {r['floor_ms']:.2f} ms "
          f"({r['macs'] / 1e6:.0f} M multiply-adds at {r['sgemm_peak_gflops']:.0f} GFLOP/s)",
          file=sys.stderr)
    for name, e in r["engines"].items():
        diff = next(v for k, v in e.items() if k.startswith("max_abs_diff"))
        print(f"  {name:<18} {e['median_ms']:8.2f} ms  p10 {e['p10_ms']:7.2f}  p90 "
              f"{e['p90_ms']:7.2f}  qnrt/this {e['qnrt_over_this']:5.2f}  max|diff| "
              f"{diff:.1e}  {e['note']}", file=sys.stderr)
    if "fastest_peer" in r:
        print(f"  qnrt / fastest peer ({r['fastest_peer']}): {r['qnrt_over_fastest_peer']:.2f};"
              f" qnrt / floor: {r['qnrt_over_floor']:.2f}", file=sys.stderr)


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
s = qnrt.Session(sys.argv[1], num_threads=int(sys.argv[3]))
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
    p.add_argument("--rounds", type=int, default=0,
                   help="interleaved rounds of 3 timed runs per engine (default: by size)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, the same for every engine (default: 1 and every core)")
    p.add_argument("--weights", help="a .qnb or neutral .npz to benchmark (default: initial weights)")
    p.add_argument("--cold", type=int, default=5,
                   help="fresh processes for cold start (default 5; 0 skips)")
    p.add_argument("--kernel-dir", help="the AOT kernel build to measure (default: the default "
                                        "location if it matches, else a new one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from qnrt.threads import available_cores
    import peers

    threads_list = args.threads or sorted({1, available_cores()})
    report = {"machine": machine_header(threads_list), "runs": []}
    h = report["machine"]
    print(f"machine: {h['cpu']}, {h['cores']} cores, Python {h['python']}; "
          + ", ".join(f"{k} {v}" for k, v in h["versions"].items()), file=sys.stderr)
    print(f"numpy BLAS: {h['blas']}; thread counts: {threads_list}", file=sys.stderr)
    for line in peers.missing_peers():
        print(f"bench: {line}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        qnb_path, onnx_path = build_models(tmp, args.weights)
        peaks = {t: peers.sgemm_peak_gflops(t) for t in threads_list}
        report["sgemm_peak_gflops"] = peaks
        print("sgemm peak (numpy, float32): " + ", ".join(
            f"{v:.0f} GFLOP/s on {t} thread(s)" for t, v in peaks.items()), file=sys.stderr)
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split("x"))
            rounds = args.rounds or max(5, min(40, int(4e7 // np.prod(shape) // 10)))
            for t in threads_list:
                r = time_case(qnb_path, onnx_path, shape, t, rounds, tmp, peaks[t])
                report["runs"].append(r)
                print_case(r)
        for text in args.shapes:
            by = {r["threads"]: r for r in report["runs"]
                  if "x".join(map(str, r["shape"])) == text}
            if len(by) > 1:
                one, most = by[min(by)], by[max(by)]
                print(f"{text}: qnrt on {max(by)} threads is "
                      f"{one['engines']['qnrt']['median_ms'] / most['engines']['qnrt']['median_ms']:.2f}x"
                      f" its speed on {min(by)}", file=sys.stderr)
        args.threads = min(threads_list)  # cold start and memory: one thread
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
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
