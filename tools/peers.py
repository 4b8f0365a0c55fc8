"""The engines tools/bench.py times against each other: qnrt and its peers
(ONNX Runtime, OpenVINO, ncnn), each behind the same `run(x) -> output` on
the same model file, at a given thread count, in float32 everywhere.

Peers that are not installed are left out, each with one line naming the
package (`pip install 'qnrt[bench]'` installs all of them). ncnn reads its
own format: the ONNX file is converted once with pnnx (fp16=0, so the
weights stay float32), and ncnn's fp16/bf16 storage and arithmetic are
turned off, as OpenVINO's inference precision is pinned to f32 (both would
otherwise trade accuracy for speed on CPUs that have those units).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

PEERS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "ncnn": "ncnn"}


@dataclass
class Engine:
    name: str
    version: str
    run: Callable[[np.ndarray], np.ndarray]
    threads: int
    note: str = ""
    times: list = field(default_factory=list)


def missing_peers() -> list[str]:
    """One line for each peer that is not installed."""
    out = [f"{name}: not installed (pip install {pkg})" for name, pkg in PEERS.items()
           if importlib.util.find_spec(pkg) is None]
    if importlib.util.find_spec("ncnn") is not None and importlib.util.find_spec("pnnx") is None:
        out.append("ncnn: pnnx (ONNX -> ncnn) not installed (pip install pnnx)")
    return out


def qnrt_engine(qnb_path: str, threads: int) -> Engine:
    import qnrt
    s = qnrt.Session(qnb_path, num_threads=threads)
    name = s.get_inputs()[0].name
    return Engine("qnrt", qnrt.__version__, lambda x: s.run(None, {name: x})[0], threads,
                  f"kernels {s.kernel_backend}")


def qnrt_unstreamed_engine(qnb_path: str, shape, threads: int) -> Engine | None:
    """qnrt with streaming=False, where the default plan streams at this shape:
    the speed its smaller arena costs (both arenas in the note)."""
    import qnrt
    s = qnrt.Session(qnb_path, num_threads=threads)
    name = s.get_inputs()[0].name
    default = s.prepare({name: tuple(shape)})
    if not default.groups:
        return None
    u = qnrt.Session(qnb_path, num_threads=threads, streaming=False)
    plain = u.prepare({name: tuple(shape)})
    return Engine("qnrt unstreamed", qnrt.__version__, lambda x: u.run(None, {name: x})[0],
                  threads, f"arena {plain.memory.arena_bytes / 2**20:.2f} MiB, streamed "
                  f"{default.memory.arena_bytes / 2**20:.2f} MiB")


def ort_engine(onnx_path: str, threads: int) -> Engine:
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    s = ort.InferenceSession(onnx_path, o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return Engine("onnxruntime", ort.__version__, lambda x: s.run(None, {name: x})[0], threads)


def openvino_engine(onnx_path: str, threads: int, shape) -> Engine:
    import openvino as ov
    core = ov.Core()
    model = core.read_model(onnx_path)
    model.reshape([int(d) for d in shape])  # a static shape, as OpenVINO prefers
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    request = compiled.create_infer_request()

    def run(x):
        return request.infer({0: x})[0]
    return Engine("openvino", ov.__version__.split("-")[0], run, threads, "f32 precision")


def ncnn_files(onnx_path: str, folder: str) -> tuple[str, str]:
    """The model as ncnn .param/.bin, converted by pnnx in `folder` once."""
    param, binary = os.path.join(folder, "m.ncnn.param"), os.path.join(folder, "m.ncnn.bin")
    if not os.path.exists(param):
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, "m.onnx")
        shutil.copyfile(onnx_path, local)
        exe = shutil.which("pnnx") or os.path.join(os.path.dirname(sys.executable), "pnnx")
        out = subprocess.run([exe, local, "inputshape=[1,3,32,32]",
                              "inputshape2=[1,3,224,224]", "fp16=0"], cwd=folder,
                             capture_output=True, text=True)
        if out.returncode != 0 or not os.path.exists(param):
            raise RuntimeError(f"pnnx could not convert the model: {out.stderr[-400:]}")
    return param, binary


def ncnn_engine(onnx_path: str, threads: int, folder: str) -> Engine:
    import ncnn
    param, binary = ncnn_files(onnx_path, folder)
    net = ncnn.Net()
    net.opt.num_threads = threads
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                 "use_bf16_storage", "use_int8_inference"):
        setattr(net.opt, flag, False)
    net.load_param(param)
    net.load_model(binary)

    def run(x):  # ncnn has no batch axis: one extraction per image
        outs = []
        for image in x:
            ex = net.create_extractor()
            ex.input("in0", ncnn.Mat(np.ascontiguousarray(image)))
            _, y = ex.extract("out0")
            outs.append(np.array(y).reshape(-1))
        return np.stack(outs)
    return Engine("ncnn", ncnn.__version__, run, threads, "fp32, one image per call")


def engines(qnb_path: str, onnx_path: str, shape, threads: int, folder: str,
            say=print) -> list[Engine]:
    """qnrt and every installed peer, for this shape and thread count."""
    out = [qnrt_engine(qnb_path, threads)]
    makers = {"onnxruntime": lambda: ort_engine(onnx_path, threads),
              "openvino": lambda: openvino_engine(onnx_path, threads, shape),
              "ncnn": lambda: ncnn_engine(onnx_path, threads, os.path.join(folder, "ncnn"))}
    for name, make in makers.items():
        if importlib.util.find_spec(PEERS[name]) is None:
            continue
        try:
            out.append(make())
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            say(f"bench: {name} left out: {type(exc).__name__}: {exc}")
    return out


def interleaved(engs: list[Engine], x: np.ndarray, rounds: int, block: int = 3) -> None:
    """Times each engine `block` runs at a time, in rotating order, for `rounds`
    rounds; one untimed run first at each turn, so a previous engine's
    spinning threads have settled."""
    for e in engs:  # warm-up: first-run allocations, caches, JIT loads
        for _ in range(3):
            e.run(x)
    for r in range(rounds):
        for k in range(len(engs)):
            e = engs[(r + k) % len(engs)]
            e.run(x)
            for _ in range(block):
                t = time.perf_counter()
                e.run(x)
                e.times.append(time.perf_counter() - t)


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": 1e3 * statistics.median(times), "p10_ms": 1e3 * q[0],
            "p90_ms": 1e3 * q[-1], "runs": len(times)}


def sgemm_peak_gflops(threads: int, size: int = 1536, repeat: int = 7) -> float:
    """numpy's float32 matmul on `threads` BLAS threads: the best of `repeat`
    (GFLOP/s), the compute floor's denominator."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads, user_api="blas"):
        np.matmul(a, b, out=c)
        best = min(_timed(lambda: np.matmul(a, b, out=c)) for _ in range(repeat))
    return 2 * size ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_macs(qnb_path: str, shape) -> int:
    """Multiply-adds of one run (convolutions and matrix products)."""
    import qnrt
    from qnrt.compiler import infer_shapes
    s = qnrt.Session(qnb_path, num_threads=1)
    g = s.graph
    shapes = infer_shapes(g, {g.inputs[0].name: tuple(shape)})
    macs = 0
    for node in g.nodes:
        if node.op == "Conv":
            w = shapes.get(node.inputs[1]) or g.initializers[node.inputs[1]].shape
            y = shapes[node.outputs[0]]
            macs += int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op in ("Gemm", "MatMul"):
            a = shapes.get(node.inputs[0]) or g.initializers[node.inputs[0]].shape
            y = shapes[node.outputs[0]]
            macs += int(np.prod(y)) * int(a[-1])
    return macs
