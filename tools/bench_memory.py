#!/usr/bin/env python3
"""Activation memory of qnrt's plans, measured, next to ONNX Runtime.

For QuickNet at 32x32, 224x224 and 512x512, and for models written to ONNX by
PyTorch's exporter and converted with `qnrt convert` (MobileNetV1, and a
ResNet-18-shaped net whose residual adds stop streaming): the naive sum of
all activations, the tensor-level lower bound (what any tensor-by-tensor
planner needs), the unfused plan's arena, the default plan's arena and the
lowest reachable (Session(arena_limit=...)), each as a ratio to the bound;
the latency of both against the unfused plan (interleaved runs in this
process, medians); and the peak RSS of a fresh process that loads the model
and answers once, qnrt (default plan) next to ONNX Runtime.

    python tools/bench_memory.py                 # all models, 5 rounds
    python tools/bench_memory.py --quick         # QuickNet 224 only, 3 rounds

Needs onnxruntime; the PyTorch models need torch (pip install torch==2.13.0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import numpy as np  # noqa: E402

RSS_RUN = """
import sys, numpy as np
engine, path, shape, limit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
shape = tuple(int(v) for v in shape.split("x"))
if engine == "qnrt":
    import qnrt
    s = qnrt.Session(path, arena_limit=int(limit) if limit != "none" else None, num_threads=1)
    name = s.get_inputs()[0].name
else:
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = 1
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
s.run(None, {name: np.zeros(shape, np.float32)})
"""


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


# --- the PyTorch models ------------------------------------------------------------

def torch_models(tmp: str) -> list[tuple[str, str, str]]:
    """(label, .qnb path, .onnx path) for the PyTorch-written models."""
    try:
        import torch
        from torch import nn
    except ImportError:
        print("bench_memory: skipping the PyTorch models: pip install torch==2.13.0")
        return []
    from qnrt.exporters.convert import convert

    def conv_bn(cin, cout, stride, groups=1, k=3):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)]

    class MobileNetV1(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                   (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
            layers = conv_bn(3, 32, 2)
            for cin, cout, s in cfg:
                layers += conv_bn(cin, cin, s, groups=cin) + conv_bn(cin, cout, 1, k=1)
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))

        def forward(self, x):
            return self.head(self.features(x))

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                         else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for cout, s in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                            (512, 1)]:
                blocks.append(Basic(cin, cout, s))
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    out = []
    torch.manual_seed(0)
    for label, net in (("MobileNetV1 (torch.onnx)", MobileNetV1()),
                       ("ResNet-18 shape (torch.onnx)", ResNet18())):
        net.eval()
        with torch.no_grad():  # random BN statistics, so folding is not trivial
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        stem = label.split()[0].lower().replace("-", "")
        onnx_path, qnb_path = os.path.join(tmp, f"{stem}.onnx"), os.path.join(tmp, f"{stem}.qnb")
        torch.onnx.export(net, torch.zeros(1, 3, 224, 224), onnx_path, input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
        convert(onnx_path, qnb_path)
        out.append((label, qnb_path, onnx_path))
    return out


# --- one model at one shape --------------------------------------------------------

def plans(path: str, shape: tuple) -> dict:
    import qnrt
    from qnrt.compiler import ArenaLimitError

    feed_name = qnrt.Session(path, streaming=False, num_threads=1).get_inputs()[0].name
    shapes = {feed_name: shape}
    unfused = qnrt.Session(path, streaming=False, num_threads=1)
    default = qnrt.Session(path, num_threads=1)
    try:
        qnrt.Session(path, arena_limit=1, num_threads=1).prepare(shapes)
    except ArenaLimitError as exc:
        smallest_bytes = exc.smallest
    lowest = qnrt.Session(path, arena_limit=smallest_bytes, num_threads=1)
    out = {"name": feed_name, "sessions": {}}
    for key, s in (("unfused", unfused), ("default", default), ("lowest", lowest)):
        program = s.prepare(shapes)
        out["sessions"][key] = (s, program)
    ref = out["sessions"]["unfused"][1]
    out.update(naive=ref.unfused.naive_bytes, bound=ref.unfused.lower_bound,
               unfused_arena=ref.memory.arena_bytes, smallest=smallest_bytes)
    return out


def latencies(p: dict, shape: tuple, rounds: int) -> dict:
    x = {p["name"]: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    outs = {}
    for key, (s, _) in p["sessions"].items():
        outs[key] = s.run(None, x)[0]
    for key in ("default", "lowest"):  # the point of streaming: not one bit differs
        assert np.array_equal(outs[key].view(np.uint32), outs["unfused"].view(np.uint32)), key
    times = {key: [] for key in p["sessions"]}
    for _ in range(rounds):
        for key, (s, _) in p["sessions"].items():
            t = time.perf_counter()
            s.run(None, x)
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss(engine: str, path: str, shape: tuple, limit, rounds: int, kernels: str) -> float:
    from bench import fresh_process

    env = {k: v for k, v in os.environ.items() if k not in ("QNRT_JIT", "QNRT_KERNEL_DIR")}
    env.update(PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1")
    if kernels == "jit":
        env["QNRT_JIT"] = "1"
    else:
        env["QNRT_KERNEL_DIR"] = kernels
    cmd = [sys.executable, "-c", RSS_RUN, engine, path, "x".join(map(str, shape)),
           str(limit) if limit else "none"]
    fresh_process(cmd, env)  # prime caches
    return statistics.median(fresh_process(cmd, env)[1] for _ in range(rounds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rounds", type=int, default=5, help="timed runs / processes per case")
    parser.add_argument("--quick", action="store_true", help="QuickNet at 224x224 only")
    parser.add_argument("--jit", action="store_true",
                        help="measure the fresh processes with the JIT backend (default: the "
                             "`qnrt compile` build a device runs, built first if none matches)")
    parser.add_argument("--kernel-dir", help="an existing `qnrt compile` build to use")
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("bench_memory: needs onnxruntime: pip install onnxruntime", file=sys.stderr)
        return 1
    from bench import aot_build_dir, blas_info, build_models

    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, user_api="blas")  # one thread, as ORT is given below
    except ImportError:
        print("bench_memory: threadpoolctl is not installed: BLAS may use several threads "
              "(pip install threadpoolctl)")
    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        kernels = "jit" if args.jit else aot_build_dir(args.kernel_dir, tmp)
        print(f"BLAS: {blas_info()}; fresh processes: qnrt kernels "
              f"{'JIT' if kernels == 'jit' else 'ahead of time (' + kernels + ')'}, one thread")
        qnb_path, onnx_path = build_models(tmp, os.path.join(ROOT, "models", "quicknet_digits.qnb"))
        cases = [("QuickNet", qnb_path, onnx_path, (1, 3, n, n))
                 for n in ((224,) if args.quick else (32, 224, 512))]
        if not args.quick:
            cases += [(label, q, o, (1, 3, 224, 224)) for label, q, o in torch_models(tmp)]
        head = (f"{'model':<30} {'input':>11} {'naive':>8} {'bound':>8} {'unfused':>8} "
                f"{'default':>8} {'x bound':>8} {'lowest':>8} {'x bound':>8} "
                f"{'t def':>7} {'t low':>7} {'RSS qnrt':>9} {'RSS ORT':>8} {'ratio':>6}")
        print("MiB and ratios; t = latency / the unfused plan's; RSS: peak MiB of a fresh "
              "process, load + one run")
        print(head)
        notes = []
        for label, q, o, shape in cases:
            p = plans(q, shape)
            t = latencies(p, shape, max(rounds, 3))
            default_arena = p["sessions"]["default"][1].memory.arena_bytes
            lowest_arena = p["sessions"]["lowest"][1].memory.arena_bytes
            rss_q = peak_rss("qnrt", q, shape, None, rounds, kernels)
            rss_o = peak_rss("ort", o, shape, None, rounds, kernels)
            print(f"{label:<30} {'x'.join(map(str, shape[2:])):>11} {mib(p['naive']):>8} "
                  f"{mib(p['bound']):>8} {mib(p['unfused_arena']):>8} {mib(default_arena):>8} "
                  f"{default_arena / p['bound']:>8.3f} {mib(lowest_arena):>8} "
                  f"{lowest_arena / p['bound']:>8.3f} {t['default'] / t['unfused']:>7.2f} "
                  f"{t['lowest'] / t['unfused']:>7.2f} {rss_q:>9.0f} {rss_o:>8.0f} "
                  f"{rss_q / rss_o:>6.2f}", flush=True)
            for key in ("default", "lowest"):
                groups = p["sessions"][key][1].groups
                notes.append(f"{label} {shape[2]}x{shape[3]} {key}: " + ("; ".join(
                    f"{g.links[0].node.name}..{g.links[-1].node.name} ({g.band} rows)"
                    for g in groups) or "nothing streamed"))
        print("groups:")
        for line in notes:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
