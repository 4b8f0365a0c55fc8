"""Threads inside a step (qnrt.threads): kernels that split into parts give the
same bits on any number of threads, in any order of parts, and as the plain
np.matmul loops the direct sgemm calls replace; the kernels run without the
GIL; numpy's BLAS is kept to one thread during a run and given back after;
the options users know (num_threads, sess_options.intra_op_num_threads,
qnrt run --threads) are honoured."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import qnrt
from qnrt import compiler, threads
from qnrt.compiler import compile_program
from qnrt.ops import _common
from qnrt.session import Session, SessionOptions

from test_streaming import CHAIN_KERNELS, bits, random_chain

MODEL = "models/quicknet_digits.qnb"
# more threads than this machine's cores, on purpose: the warning is tested on its own
pytestmark = pytest.mark.filterwarnings("ignore::qnrt.threads.OversubscriptionWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_steps(session: Session, shape) -> int:
    return sum(s.kernel.parts > 1 for s in session.prepare({"input": shape}).steps)


def test_parts_split_large_kernels_only():
    assert _common.parts_for(1, 1e9) == 1
    assert _common.parts_for(100, 1.0) == 1  # 100 ns of work: not worth a thread
    assert _common.parts_for(100, 1e6) == _common.MAX_PARTS
    assert _common.split_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert threads.MAX_PARTS == _common.MAX_PARTS


def test_channel_ranges_split_late_layers_only():
    from qnrt.ops.conv.pointwise import CHANNEL_MIN, CHANNEL_STEP, channel_ranges
    assert channel_ranges(1024, 13, 1e6) == [(0, 1024)]  # enough blocks already
    assert channel_ranges(1024, 1, 10.0) == [(0, 1024)]  # too little work
    assert channel_ranges(128, 1, 1e9) == [(0, 128)]  # too few channels
    for cout in (256, 512, 1000, 1024, 2048):
        ranges = channel_ranges(cout, 1, 1e9)
        assert ranges[0][0] == 0 and ranges[-1][1] == cout
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % CHANNEL_STEP == 0 and hi - lo >= CHANNEL_MIN - CHANNEL_STEP
                   for lo, hi in ranges)
        assert len(ranges) == min(_common.MAX_PARTS, cout // CHANNEL_MIN)


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (8, 3, 32, 32)])
def test_steps_split_by_channels_same_bits_range_by_range(shape):
    """The late 1x1 layers' channel ranges run one at a time, in reverse
    order, give the bits of the whole step in one call (each range is its own
    sgemm either way: BLAS's bits for a row may depend on the rows around it)."""
    session = Session(MODEL, num_threads=1, streaming=False)
    program = compile_program(session.graph, session._consts, {"input": shape},
                              session._kernel_choice, streaming=False)
    np.copyto(program.views["input"],
              np.random.default_rng(5).standard_normal(shape).astype(np.float32))
    checked = 0
    for step in program.steps:
        k = step.kernel
        k.run(step.inputs, step.outputs, step.workspace)
        if k.parts > 1 and k.name.startswith("conv.pointwise") and not k.inplace:
            want = step.outputs[0].copy()
            step.outputs[0][...] = np.nan
            for part in reversed(range(k.parts)):
                k.run_parts(part, part + 1, step.inputs, step.outputs, step.workspace)
            assert np.array_equal(bits(step.outputs[0]), bits(want)), step.node_name
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 96, 80), (1, 3, 160, 160)])
def test_quicknet_same_bits_on_any_thread_count(shape):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    want = Session(MODEL, num_threads=1).run(None, {"input": x})[0]
    for n, streaming in ((2, True), (3, True), (2, False)):
        s = Session(MODEL, num_threads=n, streaming=streaming)
        assert s.num_threads == n
        if shape[2] >= 96:
            assert split_steps(s, shape) > 0  # the threads really get parts
        for _ in range(2):  # the pool is reused from run to run
            assert np.array_equal(bits(s.run(None, {"input": x})[0]), bits(want)), (n, streaming)


@pytest.mark.parametrize("seed", range(16))
def test_random_chains_split_into_parts_same_bits(seed, monkeypatch):
    """Every kernel split as finely as it can (PART_MIN_NS=1) and its parts run on
    three threads, or one after another in reverse order: the same bits as the
    unsplit kernels, streamed or not."""
    graph, shape = random_chain(seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    kernels = CHAIN_KERNELS[seed % len(CHAIN_KERNELS)]
    try:
        want = Session(graph, kernels=kernels, num_threads=1, streaming=False).run(None, {"x": x})[0]
    except qnrt.GraphError:
        pytest.skip("a kernel choice that does not apply to this chain")
    monkeypatch.setattr(_common, "PART_MIN_NS", 1)
    split = Session(graph, kernels=kernels, num_threads=3)
    program = split.prepare({"x": shape})
    for streaming in (True, False):
        s = Session(graph, kernels=kernels, num_threads=3, streaming=streaming)
        assert np.array_equal(bits(s.run(None, {"x": x})[0]), bits(want)), streaming
    # parts in reverse order, one thread: each writes only its own share
    session = Session(graph, kernels=kernels, num_threads=1, streaming=False)
    program = compile_program(session.graph, session._consts, {"x": shape},
                              session._kernel_choice, streaming=False)
    for name, value in {"x": x}.items():
        np.copyto(program.views[name], value)
    for step in program.steps:
        k = step.kernel
        if k.parts > 1:
            for part in reversed(range(k.parts)):
                k.run_parts(part, part + 1, step.inputs, step.outputs, step.workspace)
        else:
            k.run(step.inputs, step.outputs, step.workspace)
    assert np.array_equal(bits(program.steps[-1].outputs[0]), bits(want))


SAME_AS_MATMUL = r"""
import json, sys
import numpy as np
import qnrt
from qnrt.ops import _common
sys.path.insert(0, "tests")
from test_streaming import random_chain
_common.PART_MIN_NS = 1  # every kernel in parts: the direct calls take every branch
out = {}
for shape in [(1, 3, 32, 32), (3, 3, 45, 61), (1, 3, 16, 16), (5, 3, 16, 16)]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for streaming in (True, False):
        s = qnrt.Session("models/quicknet_digits.qnb", num_threads=2, streaming=streaming)
        out[f"{shape}{streaming}"] = s.run(None, {"input": x})[0]
for seed in range(12):
    graph, shape = random_chain(seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for kernels in ("auto", {"Conv": "conv.im2col"}):
        try:
            out[f"{seed}{kernels}"] = qnrt.Session(graph, kernels=kernels).run(None, {"x": x})[0]
        except qnrt.GraphError:
            pass
np.savez(sys.argv[1], **out)
print(json.dumps(_common.SGEMM != 0))
"""


def test_direct_sgemm_gives_the_bits_of_numpy_matmul(tmp_path):
    """conv.pointwise.gemm, .batched and conv.im2col call numpy's cblas_sgemm from
    Numba; QNRT_NUMPY_MATMUL=1 gives the np.matmul loops they replace."""
    got = {}
    for name, flag in (("direct", "0"), ("matmul", "1")):
        env = dict(os.environ, QNRT_NUMPY_MATMUL=flag)
        path = tmp_path / f"{name}.npz"
        proc = subprocess.run([sys.executable, "-c", SAME_AS_MATMUL, str(path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got[name] = (json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(path)))
    assert got["direct"][0] is True and got["matmul"][0] is False
    a, b = got["direct"][1], got["matmul"][1]
    assert a.keys() == b.keys() and len(a) >= 20
    for key in a:
        assert np.array_equal(bits(a[key]), bits(b[key])), key


def test_kernels_run_without_the_gil():
    """While a kernel runs in another thread, this thread keeps running Python."""
    from qnrt.ops.conv import pointwise
    if not _common.SGEMM:
        pytest.skip("numpy's BLAS has no cblas_sgemm qnrt can call")
    rng = np.random.default_rng(0)
    cin = cout = 256
    x = rng.standard_normal((1, cin, 128, 128)).astype(np.float32)
    y = np.empty((1, cout, 128, 128), np.float32)
    w = rng.standard_normal((cout, cin)).astype(np.float32)
    blocks = np.array([(0, t, t + 256, 0, cout) for t in range(0, 128 * 128, 256)], np.int64)
    zeros = np.zeros(cout, np.float32)
    args = (_common.SGEMM, _common.SGEMM_ILP64, w, _common.address(x), cin * 128 * 128,
            128 * 128, _common.address(y), cout * 128 * 128, 128 * 128, blocks, 0, len(blocks),
            pointwise._NO_SCRATCH, zeros, zeros, 2, 0.0, 0.0, True)
    pointwise._pw_gemm(*args)  # compiled before timing
    calls = 40

    def work():
        for _ in range(calls):
            pointwise._pw_gemm(*args)
    t = threading.Thread(target=work)
    spins = 0
    start = time.perf_counter()
    t.start()
    while t.is_alive():
        spins += 1
    elapsed = time.perf_counter() - start
    # with the GIL held for the kernel's duration this loop would barely run
    assert elapsed > 0.02 and spins > 2000 * elapsed, (spins, elapsed)
    want = x.reshape(cin, -1).T @ w.T
    np.testing.assert_allclose(y.reshape(cout, -1).T, np.maximum(want, 0), rtol=1e-4, atol=1e-3)


def test_blas_is_one_thread_during_a_run_and_given_back():
    tp = pytest.importorskip("threadpoolctl")
    blas = threads.blas_threads()
    if not blas.controllable:
        pytest.skip("numpy's BLAS is not an OpenBLAS qnrt can set")

    def numpy_blas_threads():  # as threadpoolctl sees numpy's own OpenBLAS (not torch's)
        numpy_libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        found = [i["num_threads"] for i in tp.threadpool_info() if i.get("user_api") == "blas"
                 and os.path.samefile(os.path.dirname(i["filepath"]), numpy_libs)]
        assert len(found) == 1
        return found[0]
    with tp.threadpool_limits(2, user_api="blas"):
        seen = []
        blas.enter(1)
        seen.append(numpy_blas_threads())
        blas.enter(1)  # a second concurrent run
        blas.exit(1)
        seen.append(numpy_blas_threads())
        blas.exit(1)
        seen.append(numpy_blas_threads())
        assert seen == [1, 1, 2]
        s = Session(MODEL, num_threads=2)
        s.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
        assert numpy_blas_threads() == 2


def test_thread_options_as_onnx_runtime_users_know_them():
    cores = threads.available_cores()
    assert Session(MODEL).num_threads == min(cores, threads.MAX_PARTS)
    assert Session(MODEL, num_threads=0).num_threads == min(cores, threads.MAX_PARTS)
    assert Session(MODEL, num_threads=3).num_threads == 3
    assert Session(MODEL, num_threads=99).num_threads == threads.MAX_PARTS
    assert Session(MODEL, sess_options=SessionOptions(intra_op_num_threads=2)).num_threads == 2
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    assert Session(MODEL, opts).num_threads == 1
    opts.inter_op_num_threads = 4
    with pytest.warns(qnrt.IgnoredOptionWarning, match="inter_op_num_threads"):
        Session(MODEL, opts)
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="num_threads"):
            Session(MODEL, num_threads=bad)


@pytest.mark.filterwarnings("default::qnrt.threads.OversubscriptionWarning")
def test_more_threads_than_cores_at_once_is_said():
    blas = threads.blas_threads()
    s = Session(MODEL, num_threads=1)
    x = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", threads.OversubscriptionWarning)
        s.run(None, x)  # alone: no warning
    blas.enter(threads.available_cores())  # as if other sessions held every core
    try:
        with pytest.warns(threads.OversubscriptionWarning, match="cores"):
            s.run(None, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", threads.OversubscriptionWarning)
            s.run(None, x)  # said once per Session
    finally:
        blas.exit(threads.available_cores())


def test_worker_threads_start_when_needed_and_end_with_their_session():
    s = Session(MODEL, num_threads=3)
    assert s._pool is None or not s._pool._workers  # no threads before a step splits
    s.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})  # no step worth splitting
    assert s._pool is None or not s._pool._workers
    s.run(None, {"input": np.zeros((1, 3, 96, 96), np.float32)})
    mine = list(s._pool._workers)
    assert len(mine) == 2 and all(t.is_alive() for t in mine)
    del s
    gc.collect()
    assert not any(t.is_alive() for t in mine)


def test_an_exception_in_a_part_reaches_the_caller():
    pool = threads.WorkerPool(3)
    try:
        def span(p0, p1, slot, box):
            assert 0 <= slot < 3
            for p in range(p0, p1):
                if p == 5:
                    raise RuntimeError("part 5")
                box.append(p)
        box: list = []
        with pytest.raises(RuntimeError, match="part 5"):
            pool.run_spans(span, 8, (box,))
        assert sorted(box) == [0, 1, 2, 3, 4]  # the other threads' spans ran to the end
        box.clear()
        pool.run_spans(span, 5, (box,))  # the pool still works
        assert sorted(box) == list(range(5))
    finally:
        pool.close()


def test_cli_threads_option():
    out = subprocess.run([sys.executable, "-m", "qnrt", "run", "--threads", "2", MODEL,
                          "examples/digit_7.png"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "digit_7.png: 7" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "qnrt", "run", "--threads", "many", MODEL,
                          "examples/digit_7.png"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "thread count" in bad.stderr
    assert "Traceback" not in bad.stderr
    info = subprocess.run([sys.executable, "-m", "qnrt", "info", MODEL, "--threads", "3",
                           "--input-shape", "1,3,96,96", "--json"], cwd=ROOT, capture_output=True,
                          text=True)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["threads"] == 3 and report["split_steps"] > 0


def _group_split_same_bits(session, shape, x, specs, parts_list, split_by="rows"):
    """Each forced group, its rows (or images) split for 2..5 threads, gives
    the group's output of the unsplit run, bit for bit."""
    from qnrt import streaming
    program = compile_program(session.graph, session._consts, {session.get_inputs()[0].name:
                              shape}, session._kernel_choice, groups=specs)
    name = session.get_inputs()[0].name
    np.copyto(program.views[name], x)
    want = {}
    for step in program.steps:
        step.kernel.run(step.inputs, step.outputs, step.workspace)
        if step.op == "Stream":
            want[step.members[0][0]] = (step.inputs[0].copy(), step.outputs[0].copy())
    assert program.groups
    done = 0
    for group in program.groups:
        x0, ym = want[group.links[0].node.name]
        for parts in parts_list:
            split = getattr(streaming, f"split_{split_by}")(group, parts)
            if not split.row_parts:  # fewer row blocks than threads: nothing to split
                continue
            done += 1
            pool = threads.WorkerPool(parts)
            try:
                ws = np.zeros(split.workspace, np.uint8)
                out = np.full_like(ym, np.nan)
                k = streaming.group_kernel(split, x0, out, ws, pool)
                k.run([x0], [out], ws)
                assert np.array_equal(bits(out), bits(ym)), (group.links[0].node.name, parts)
            finally:
                pool.close()
    return done


@pytest.mark.parametrize("split_by,shape,parts", [
    ("rows", (1, 3, 96, 80), (2, 3, 5)), ("rows", (2, 3, 67, 45), (2, 3, 5)),
    # a batch's images in ranges, each through band buffers (and band kernels)
    # for its own images only
    ("images", (4, 3, 40, 40), (2, 3, 4)), ("images", (3, 3, 67, 45), (2, 3, 4))])
def test_quicknet_groups_split_same_bits(split_by, shape, parts):
    from qnrt.streaming import GroupSpec
    s = Session(MODEL, num_threads=1)
    names = [n.name for n in s.graph.nodes]
    pool3 = names.index("pool3")
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    specs = [GroupSpec(names[0], names[pool3], 2, "cadence"),
             GroupSpec(names[pool3 + 1], "pool6", 1, "uniform")]
    assert _group_split_same_bits(s, shape, x, specs, parts, split_by) >= 5


def _one_thread_then_two(shape, seed):
    """(input, the 1-thread output, the 1-thread arena bytes, a 2-thread Session)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    one = Session(MODEL, num_threads=1)
    return (x, one.run(None, {"input": x})[0], one.prepare({"input": shape}).memory.arena_bytes,
            Session(MODEL, num_threads=2))


def test_a_batch_streams_on_threads_by_images_within_the_arena():
    shape = (32, 3, 32, 32)
    x, want, base, two = _one_thread_then_two(shape, 6)
    program = two.prepare({"input": shape})
    assert program.groups and all(g.row_parts and g.row_parts[0].images == (0, 16)
                                  for g in program.groups)
    assert program.memory.arena_bytes <= base + base // compiler.SPLIT_SLACK
    assert np.array_equal(bits(two.run(None, {"input": x})[0]), bits(want))


@pytest.mark.parametrize("seed", range(12))
def test_random_chains_split_by_rows_same_bits(seed):
    from qnrt.streaming import GroupSpec
    graph, shape = random_chain(seed)
    s = Session(graph, kernels=CHAIN_KERNELS[seed % len(CHAIN_KERNELS)], num_threads=1)
    names = [n.name for n in s.graph.nodes if n.op != "Identity"]
    if len(names) < 2 or shape[2] < 8:
        pytest.skip("too short a chain")
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    try:
        done = _group_split_same_bits(s, shape, x, [GroupSpec(names[0], names[-1], 1, "uniform")],
                                      (2, 3))
    except qnrt.GraphError:
        pytest.skip("this chain cannot stream as one group")
    if not done:
        pytest.skip("the last op's output has fewer row blocks than threads")


def test_threads_keep_the_arena_and_split_streamed_rows_within_a_limit():
    """At 224x224 the default plan streams the first stages. On 2 threads the
    arena stays the one-thread arena (plus a share of scratch per thread);
    with an arena_limit that leaves room, each thread runs its own range of a
    streamed group's rows. The bits are the same either way."""
    shape = (1, 3, 224, 224)
    x, want, base, two = _one_thread_then_two(shape, 5)
    assert two.prepare({"input": shape}).memory.arena_bytes <= 1.1 * base
    assert np.array_equal(bits(two.run(None, {"input": x})[0]), bits(want))
    roomy = Session(MODEL, num_threads=2, arena_limit=8_000_000)
    program = roomy.prepare({"input": shape})
    assert program.groups and all(len(g.row_parts) == 2 for g in program.groups)
    assert program.memory.arena_bytes <= 8_000_000
    assert np.array_equal(bits(roomy.run(None, {"input": x})[0]), bits(want))
