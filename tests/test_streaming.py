"""Row streaming and in-place steps: bit-for-bit the unfused plan.

Every streamed schedule (random chains of convolutions of any window,
stride, pad, dilation and group, pools and activations, in bands of several
heights and both row policies, on every band-invariant kernel variant) is
compared with np.array_equal on the float32 bits against the same graph run
with streaming=False; the unfused plan itself is checked against ONNX
Runtime. In-place depthwise and pointwise kernels are compared bit for bit
with the same kernel writing a separate output.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, ort_run
from qnrt import Session
from qnrt.compiler import ArenaLimitError, KernelChoice, compile_program, smallest_program
from qnrt.graph import Graph, GraphError, Node, ValueInfo
from qnrt.ops import get_op
from qnrt.streaming import GroupSpec
from qnrt.threads import blas_threads

MODEL = "models/quicknet_digits.qnb"


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def run_program(program, feed: dict) -> np.ndarray:
    """The first graph output of a compiled program (as Session.run does it)."""
    for name, value in feed.items():
        np.copyto(program.views[name], value)
    with blas_threads().one_thread():  # numpy's BLAS on one thread, as in Session.run
        for step in program.steps:
            step.kernel.run(step.inputs, step.outputs, step.workspace)
    return program.steps[-1].outputs[0].copy()


def compiled(session: Session, shapes: dict, **kw):
    """The session's graph compiled with compile_program's own options."""
    return compile_program(session.graph, session._consts, shapes, session._kernel_choice, **kw)


def random_chain(seed: int) -> tuple[Graph, tuple]:
    """A chain of 3-7 ops on an odd-sized image: convolutions (full, grouped,
    depthwise, pointwise; any window, stride, pad and dilation) with bias and
    PRelu/Relu, max and average pools, activations."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.choice([1, 2])), int(rng.integers(1, 7))
    h, w = int(rng.integers(6, 40)), int(rng.integers(3, 30))
    shape = input_shape = (n, c, h, w)
    nodes, inits, cur = [], {}, "x"

    def add(node):  # append, and follow the shape
        nonlocal shape
        nodes.append(node)
        shape = get_op(node.op).infer(
            node, [shape] + [inits[t].shape for t in node.inputs[1:]], inits)[0]
        shape = tuple(int(d) for d in shape)

    for k in range(int(rng.integers(3, 8))):
        kind = rng.choice(["conv", "dw", "dw3", "pw", "pw", "maxpool", "avgpool", "act"])
        out = f"t{k}"
        _, c, h, w = shape
        if kind in ("conv", "dw", "dw3", "pw"):
            if kind == "pw":
                kh = kw = 1
                group, cout, stride, dil, pads = 1, int(rng.integers(1, 9)), 1, 1, [0, 0, 0, 0]
            elif kind == "dw3":  # QuickNet's window
                kh = kw = 3
                group, cout, stride, dil, pads = c, c, 1, 1, [1, 1, 1, 1]
            else:
                kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
                stride, dil = int(rng.integers(1, 3)), int(rng.integers(1, 3))
                pads = [int(rng.integers(0, kh)), int(rng.integers(0, kw)),
                        int(rng.integers(0, kh)), int(rng.integers(0, kw))]
                if kind == "dw":
                    group, cout = c, c * int(rng.integers(1, 3))
                else:
                    group = int(rng.choice([g for g in (1, 2, 3) if c % g == 0]))
                    cout = group * int(rng.integers(1, 4))
            if h + pads[0] + pads[2] < (kh - 1) * dil + 1 or w + pads[1] + pads[3] < (kw - 1) * dil + 1:
                continue
            inits[f"w{k}"] = rng.standard_normal((cout, c // group, kh, kw)).astype(np.float32)
            inits[f"b{k}"] = rng.standard_normal(cout).astype(np.float32)
            add(Node("Conv", [cur, f"w{k}", f"b{k}"], [f"c{k}"],
                              {"kernel_shape": [kh, kw], "strides": [stride, stride],
                               "dilations": [dil, dil], "pads": pads, "group": group},
                              f"conv{k}"))
            if rng.random() < 0.5:
                inits[f"s{k}"] = (0.25 * rng.standard_normal((cout, 1, 1))).astype(np.float32)
                add(Node("PRelu", [f"c{k}", f"s{k}"], [out], {}, f"prelu{k}"))
            else:
                add(Node("Relu", [f"c{k}"], [out], {}, f"relu{k}"))
        elif kind in ("maxpool", "avgpool"):
            kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            stride = int(rng.integers(1, 3))
            pads = [int(rng.integers(0, kh)), int(rng.integers(0, kw)),
                    int(rng.integers(0, kh)), int(rng.integers(0, kw))]
            if h + pads[0] + pads[2] < kh or w + pads[1] + pads[3] < kw:
                continue
            attrs = {"kernel_shape": [kh, kw], "strides": [stride, stride], "pads": pads}
            if kind == "avgpool":
                attrs["count_include_pad"] = int(rng.integers(0, 2))
            add(Node("MaxPool" if kind == "maxpool" else "AveragePool", [cur], [out], attrs,
                     f"pool{k}"))
        else:
            op = str(rng.choice(["Sigmoid", "Tanh", "LeakyRelu"]))
            add(Node(op, [cur], [out], {}, f"act{k}"))
        cur = out
    nodes.append(Node("Identity", [cur], ["y"], {}, "out"))
    graph = Graph(nodes, [ValueInfo("x", input_shape)], [ValueInfo("y", shape)], inits,
                  name=f"chain{seed}")
    return graph, input_shape


def stream_names(session: Session) -> list[str]:
    """The nodes of the session's graph (after rewrites) that can be one group."""
    return [n.name for n in session.graph.nodes if n.op != "Identity"]


CHAIN_KERNELS = [
    "auto",
    {"Conv": "conv.im2col"},
    {"Conv": "conv.depthwise.rows", "conv.im2col": "conv.im2col",
     "conv.pointwise.gemm": "conv.pointwise.gemm", "conv.pointwise.skinny": "conv.pointwise.skinny",
     "conv.pointwise.batched": "conv.pointwise.gemm"},
    {"conv.dw3x3.plane": "conv.dw3x3.padded", "conv.depthwise.nhwc": "conv.dw3x3.plane",
     "pool.max2x2": "pool.window"},
    {"conv.pointwise.gemm": "conv.pointwise.tiled", "conv.pointwise.batched": "conv.pointwise.tiled",
     "conv.pointwise.skinny": "conv.pointwise.tiled"},
]


@pytest.mark.parametrize("seed", range(40))
def test_random_chains_stream_bit_for_bit(seed):
    graph, shape = random_chain(seed)
    x = np.random.default_rng(100 + seed).standard_normal(shape).astype(np.float32)
    feed = {"x": x}
    kernels = CHAIN_KERNELS[seed % len(CHAIN_KERNELS)]
    try:
        session = Session(graph, kernels=kernels, streaming=False)
        plain = compiled(session, {"x": shape}, streaming=False)
    except GraphError:  # a forced variant that does not apply to this chain
        session = Session(graph, streaming=False)
        plain = compiled(session, {"x": shape}, streaming=False)
    want = run_program(plain, feed)
    assert_close(want, ort_run(graph, feed)[0], rel=2e-4)
    names = stream_names(session)
    if len(names) < 2:
        return
    streamed = 0
    for band in (1, 2, 3, 5):
        for policy in ("uniform", "cadence"):
            try:
                program = compiled(session, {"x": shape},
                                   groups=[GroupSpec(names[0], names[-1], band, policy)])
            except GraphError:
                continue  # not all of it streams (e.g. a variant with no row block)
            streamed += 1
            got = run_program(program, feed)
            assert np.array_equal(bits(got), bits(want)), (band, policy, program.groups)
    smallest = smallest_program(session.graph, session._consts, {"x": shape},
                                session._kernel_choice)
    assert np.array_equal(bits(run_program(smallest, feed)), bits(want))


def test_most_random_chains_stream():
    """The sweep above is not vacuous: most chains do stream as one group."""
    count = 0
    for seed in range(40):
        graph, shape = random_chain(seed)
        session = Session(graph, streaming=False)
        names = stream_names(session)
        try:
            compiled(session, {"x": shape}, groups=[GroupSpec(names[0], names[-1], 2)])
            count += 1
        except (GraphError, IndexError):
            pass
    assert count >= 30, count


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 67, 45), (2, 3, 96, 80)])
def test_quicknet_streams_bit_for_bit(shape):
    session = Session(MODEL, streaming=False)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = session.run(None, {"input": x})[0]
    names = [n.name for n in session.graph.nodes]
    pool3 = names.index("pool3")
    for band, policy in ((1, "uniform"), (2, "cadence"), (4, "uniform")):
        program = compiled(session, {"input": shape}, groups=[
            GroupSpec(names[0], names[pool3], band, policy),
            GroupSpec(names[pool3 + 1], "pool6", band, policy)])
        assert len(program.groups) == 2
        got = run_program(program, {"input": x})
        assert np.array_equal(bits(got), bits(want)), (band, policy)
    try:
        compile_program(session.graph, session._consts, {"input": shape}, arena_limit=1)
    except ArenaLimitError as exc:
        smallest = exc.smallest
    low = Session(MODEL, arena_limit=smallest)
    assert low.prepare({"input": shape}).memory.arena_bytes <= smallest
    assert np.array_equal(bits(low.run(None, {"input": x})[0]), bits(want))
    assert np.array_equal(bits(Session(MODEL).run(None, {"input": x})[0]), bits(want))


def test_arena_limit_fits_or_names_the_smallest():
    shape = {"input": (1, 3, 96, 96)}
    unfused = Session(MODEL, streaming=False).prepare(shape).memory
    with pytest.raises(ArenaLimitError, match="smallest arena reachable is") as err:
        Session(MODEL, arena_limit=1000).prepare(shape)
    smallest = err.value.smallest
    assert 0 < smallest < unfused.lower_bound  # below what any tensor-by-tensor plan needs
    for limit in (smallest, (smallest + unfused.arena_bytes) // 2, unfused.arena_bytes):
        assert Session(MODEL, arena_limit=limit).prepare(shape).memory.arena_bytes <= limit
    with pytest.raises(ValueError, match="arena_limit"):
        Session(MODEL, arena_limit=-5)


def test_streamed_group_is_one_step_and_keeps_node_names():
    session = Session(MODEL)
    shape = {"input": (1, 3, 96, 96)}
    program = compiled(session, shape, groups=[GroupSpec("stem.conv", "pool3", 2)])
    ops = [s.op for s in program.steps]
    assert ops.count("Stream") == 1
    names = [name for s in program.steps for name, _ in s.members]
    assert names == [n.name for n in session.graph.nodes]
    assert program.memory.arena_bytes < program.unfused.arena_bytes


def test_bad_group_specs_are_graph_errors():
    session = Session(MODEL)
    with pytest.raises(GraphError, match="not one streamable chain"):
        compiled(session, {"input": (1, 3, 32, 32)}, groups=[GroupSpec("stem.conv", "nope", 2)])
    with pytest.raises(GraphError):  # softmax has no row window
        compiled(session, {"input": (1, 3, 32, 32)},
                 groups=[GroupSpec("head.conv", "head.softmax", 1)])


# --- in place -------------------------------------------------------------------

def _conv_kernel(variant, x_shape, w, pads, group, cin_eq_cout=True):
    node = Node("Conv", ["x", "w", "b"], ["y"], {"kernel_shape": list(w.shape[2:]),
                                                  "pads": pads, "group": group}, "c")
    consts = {"w": w, "b": np.linspace(-1, 1, w.shape[0]).astype(np.float32)}
    op = get_op("Conv")
    out = op.infer(node, [x_shape, w.shape, (w.shape[0],)], consts)[0]
    spec = op.spec(node, [x_shape, w.shape, (w.shape[0],)], [out], consts)
    return op.build(node, spec, variant), consts, out


@pytest.mark.parametrize("variant,kernel,pads,group", [
    ("conv.dw3x3.plane", 3, [1, 1, 1, 1], "dw"),
    ("conv.dw3x3.padded", 3, [1, 1, 1, 1], "dw"),
    ("conv.depthwise.nhwc", 3, [1, 1, 1, 1], "dw"),
    ("conv.depthwise.nhwc", 5, [2, 2, 2, 2], "dw"),
    ("conv.pointwise.gemm", 1, [0, 0, 0, 0], 1),
    ("conv.pointwise.tiled", 1, [0, 0, 0, 0], 1),
])
@pytest.mark.parametrize("shape", [(1, 8, 13, 30), (2, 5, 7, 3)])
def test_inplace_kernels_match_out_of_place_bit_for_bit(variant, kernel, pads, group, shape):
    rng = np.random.default_rng(3)
    c = shape[1]
    g = c if group == "dw" else group
    w = rng.standard_normal((c, c // g, kernel, kernel)).astype(np.float32)
    k, consts, out = _conv_kernel(variant, shape, w, pads, g)
    assert k.inplace, variant
    x = rng.standard_normal(shape).astype(np.float32)
    ws = np.zeros(max(k.workspace, 1), np.uint8)
    separate = np.empty(out, np.float32)
    k.run([x.copy(), consts["w"], consts["b"]], [separate], ws)
    buf = x.copy()
    k.run([buf, consts["w"], consts["b"]], [buf], ws)
    assert np.array_equal(bits(buf), bits(separate))


def test_inplace_steps_lower_the_unfused_arena():
    """Depthwise and same-width pointwise steps take over their input's buffer."""
    session = Session(MODEL, streaming=False)
    program = session.prepare({"input": (1, 3, 64, 64)})
    buffer_of = program.tensor_buffer
    dw_in_place = [n for n in session.graph.nodes
                   if n.name.endswith(".dw") and buffer_of[n.outputs[0]] == buffer_of[n.inputs[0]]]
    assert len(dw_in_place) >= 10
    pw = [n for n in session.graph.nodes if n.name in ("sep5.pw", "sep6.pw")]
    assert all(buffer_of[n.outputs[0]] == buffer_of[n.inputs[0]] for n in pw)
    # split by output channels (sep8: 512 channels of 8x8), a range would
    # overwrite input rows another range still reads: not in place
    sep8 = next(n for n in session.graph.nodes if n.name == "sep8.pw")
    assert buffer_of[sep8.outputs[0]] != buffer_of[sep8.inputs[0]]


def test_kernel_choice_is_kept_inside_groups():
    session = Session(MODEL, kernels={"Conv": "conv.im2col"})
    program = compiled(session, {"input": (1, 3, 48, 48)},
                       groups=[GroupSpec("stem.conv", "pool3", 3)])
    variants = {v for s in program.steps for _, v in s.members}
    assert "conv.im2col" in variants and "conv.pointwise.gemm" not in variants
    assert KernelChoice.parse("auto") == KernelChoice()


# --- the schedule cache ------------------------------------------------------------

def test_schedule_cache_reuses_checks_and_recovers(tmp_path, monkeypatch):
    from qnrt import plan_cache, streaming

    monkeypatch.setenv("QNRT_PLAN_DIR", str(tmp_path))
    shape = {"input": (1, 3, 160, 160)}
    first = Session(MODEL).prepare(shape)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and first.groups
    searched = []
    monkeypatch.setattr(streaming, "choose_schedule",
                        lambda *a, **k: searched.append(1) or streaming.Schedule((), 0))
    again = Session(MODEL).prepare(shape)  # from the cache: no search
    assert not searched
    assert [(g.links[0].node.name, g.rows) for g in again.groups] == \
        [(g.links[0].node.name, g.rows) for g in first.groups]
    assert again.memory.arena_bytes == first.memory.arena_bytes
    files[0].write_text('{"groups": [{"first": "stem.conv", "last": "nope", "band": 2, '
                        '"rows": [1]}]}')  # stale or edited: searched again, never trusted
    Session(MODEL).prepare(shape)
    assert searched
    files[0].write_text("not json")
    monkeypatch.undo()
    monkeypatch.setenv("QNRT_PLAN_DIR", str(tmp_path))
    assert Session(MODEL).prepare(shape).memory.arena_bytes == first.memory.arena_bytes
    assert plan_cache.load("0" * 32) is None
    monkeypatch.setenv("QNRT_PLAN_CACHE", "0")
    for f in tmp_path.iterdir():
        f.unlink()
    Session(MODEL).prepare({"input": (1, 3, 176, 176)})
    assert list(tmp_path.iterdir()) == []
