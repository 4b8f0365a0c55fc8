"""The ahead-of-time kernel build (qnrt compile): built once here (about 80 s,
where a C and C++ compiler exist), then every kernel variant the build covers
must give bit-identical outputs to the JIT, in a process that never imports
numba; a stale build is never loaded; QNRT_JIT=1 forces the JIT."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qnrt import backend as be

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc"))
                                or not (shutil.which("g++") or shutil.which("c++")),
                                reason="the AOT build needs a C and a C++ compiler")

# Runs every model step on every non-reference variant that applies (as the
# build's harvest does) and saves each variant's output, plus the backend facts.
RUN_ALL = r"""
import json, sys
import numpy as np
import qnrt
from qnrt.aot_build import model_workloads, shipped_models, variant_outputs, zoo
from qnrt.compiler import KernelChoice, compile_program

out = {}
def run(label, graph, shapes):
    graph.toposort()
    consts = dict(graph.initializers)
    program = compile_program(graph, consts, shapes, KernelChoice(), streaming=False)
    rng = np.random.default_rng(0)
    for name in shapes:
        program.views[name][...] = rng.standard_normal(program.views[name].shape)
    for i, name, ys in variant_outputs(graph, consts, program):
        out[f"{label}|{i}|{name}"] = ys[0]
for label, graph, shapes in model_workloads(
        [(p, [(1, 3, 32, 32), (2, 3, 20, 28)]) for p in shipped_models()]):
    run(label, graph, shapes)
for op, graph, shapes in zoo():
    try:
        run(op, graph, shapes)
    except qnrt.GraphError:
        pass
np.savez(sys.argv[1], **out)
print(json.dumps({"backend": qnrt.Session(shipped_models()[0]).kernel_backend,
                  "numba": bool({m.split(".")[0] for m in sys.modules}
                                & {"numba", "llvmlite", "scipy"})}))
"""


def run_all(tmp_path, name, env):
    path = tmp_path / f"{name}.npz"
    out = subprocess.run([sys.executable, "-c", RUN_ALL, str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return np.load(path), json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernels")
    out = subprocess.run([sys.executable, "-m", "qnrt", "compile", "--out", str(folder)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote" in out.stdout
    return folder


def env_with(**changes):
    env = {k: v for k, v in os.environ.items() if k not in ("QNRT_JIT", "QNRT_KERNEL_DIR")}
    env.update(changes)
    return env


def test_every_variant_is_bit_identical_aot_and_jit_and_aot_needs_no_numba(build, tmp_path):
    jit, jit_facts, _ = run_all(tmp_path, "jit", env_with(QNRT_JIT="1"))
    aot, aot_facts, err = run_all(tmp_path, "aot", env_with(QNRT_KERNEL_DIR=str(build)))
    assert jit_facts == {"backend": "jit", "numba": True}
    assert aot_facts == {"backend": "aot", "numba": False}, err
    assert "compiling it with Numba" not in err  # every kernel call was served by the build
    assert sorted(jit.files) == sorted(aot.files) and len(jit.files) > 300
    differ = [k for k in jit.files if jit[k].tobytes() != aot[k].tobytes()]
    assert not differ, differ[:10]
    variants = {k.rsplit("|", 1)[1] for k in jit.files}
    assert {"conv.pointwise.skinny", "conv.pointwise.batched", "conv.pointwise.gemm",
            "conv.pointwise.tiled",
            "conv.depthwise.nhwc", "conv.dw3x3.padded", "conv.dw3x3.plane",
            "conv.depthwise.rows", "conv.im2col", "pool.max2x2", "pool.window",
            "binary.broadcast6", "resize.bilinear", "conv_transpose.col2im", "gather.blocks",
            "layernorm.rows"} <= variants


def test_a_stale_or_foreign_build_is_never_loaded(build, tmp_path):
    copy = tmp_path / "stale"
    shutil.copytree(build, copy)
    manifest = json.loads((copy / be.MANIFEST).read_text())
    for field, value in (("sources", "0" * 64), ("numba", "0.1.0"),
                         ("machine", {**manifest["machine"], "cpu_features": "other"})):
        (copy / be.MANIFEST).write_text(json.dumps({**manifest, field: value}))
        exports, why = be._load_build(str(copy))
        assert exports is None and field in why
    out = subprocess.run([sys.executable, "-m", "qnrt", "info", "models/quicknet_digits.qnb"],
                         cwd=ROOT, env=env_with(QNRT_KERNEL_DIR=str(copy)),
                         capture_output=True, text=True)
    assert out.returncode == 0 and "kernels: jit (the kernel build" in out.stdout


def test_qnrt_jit_forces_the_jit_and_info_says_which(build):
    for env, want in ((env_with(QNRT_KERNEL_DIR=str(build)), "kernels: aot"),
                      (env_with(QNRT_KERNEL_DIR=str(build), QNRT_JIT="1"),
                       "kernels: jit (QNRT_JIT=1)")):
        out = subprocess.run([sys.executable, "-m", "qnrt", "info",
                              "models/quicknet_digits_dc.qnb"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert want in out.stdout


def test_a_call_the_build_lacks_falls_back_to_the_jit(build):
    code = r"""
import numpy as np
from qnrt.ops import _common
y = np.zeros(8, np.float64)  # float64: no kernel is built for it
_common.unary(np.ones(8, np.float64), y, 1, 0.0, 0.0)
print(y.sum(), type(_common.unary).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         env=env_with(QNRT_KERNEL_DIR=str(build)), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8.0", "AotKernel"]
    assert "has no version for these argument types" in out.stderr


def test_value_keys_match_the_build_keys():
    a = np.zeros((2, 3), np.float32)
    assert be.value_key((a, a[:, 1:], 3, 0.5, True, np.float32(1))) == (
        np.dtype(np.float32), 2, True, np.dtype(np.float32), 2, False,
        "int64", "float64", "bool", "float32")
    keys = be.signature_keys([["float32", 2, "A", False], "int64"])
    assert (np.dtype(np.float32), 2, True, "int64") in keys
    assert (np.dtype(np.float32), 2, False, "int64") in keys


THREADS = r"""
import json, sys, threading, time
import numpy as np
import qnrt
from qnrt.ops import _common
from qnrt.ops.conv import pointwise
x = np.random.default_rng(0).standard_normal((1, 3, 160, 160)).astype(np.float32)
outs = [qnrt.Session("models/quicknet_digits.qnb", num_threads=n).run(None, {"input": x})[0]
        for n in (1, 2, 3)]
same = all(np.array_equal(o.view(np.uint32), outs[0].view(np.uint32)) for o in outs)
# a kernel from the build, run in another thread: does this one keep running Python?
rng = np.random.default_rng(0)
xa = rng.standard_normal((1, 256, 128, 128)).astype(np.float32)
ya = np.empty_like(xa)
w = rng.standard_normal((256, 256)).astype(np.float32)
w.flags.writeable = False
blocks = np.array([(0, t, t + 256, 0, 256) for t in range(0, 128 * 128, 256)], np.int64)
z = np.zeros(256, np.float32)
args = (_common.SGEMM, _common.SGEMM_ILP64, w, _common.address(xa), 256 * 128 * 128, 128 * 128,
        _common.address(ya), 256 * 128 * 128, 128 * 128, blocks, 0, len(blocks),
        pointwise._NO_SCRATCH, z, z, 2, 0.0, 0.0, True)
t = threading.Thread(target=lambda: [pointwise._pw_gemm(*args) for _ in range(40)])
spins, start = 0, time.perf_counter()
t.start()
while t.is_alive():
    spins += 1
elapsed = time.perf_counter() - start
print(json.dumps({"same": same, "spins_per_s": spins / elapsed, "elapsed": elapsed,
                  "numba": bool({m.split(".")[0] for m in sys.modules} & {"numba", "llvmlite"}),
                  "kernel": type(pointwise._pw_gemm).__name__}))
"""


def test_threads_on_the_build_same_bits_and_no_gil(build):
    """The build's exports release the GIL (numba.pycc keeps the nogil option),
    so a Session's worker threads run them at once; outputs keep their bits."""
    out = subprocess.run([sys.executable, "-c", THREADS], cwd=ROOT,
                         env=env_with(QNRT_KERNEL_DIR=str(build)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["same"] and not facts["numba"] and facts["kernel"] == "AotKernel", facts
    assert facts["elapsed"] > 0.02 and facts["spins_per_s"] > 2000, facts
    assert "compiling it with Numba" not in out.stderr  # streamed band kernels too
