"""Session(weights="int8"): int8 per-output-channel pointwise weights."""
from __future__ import annotations

import numpy as np
import pytest

import qnrt
from qnrt.ops.conv.pointwise import SKINNY_COLS, _pw_skinny
from qnrt.ops._common import ACT_CODES
from qnrt.rewrite import WEIGHTS_INT8_INPUT, optimize, quantize_pointwise_int8

from helpers import assert_close, ort_run


def _quantize(w):
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


@pytest.mark.parametrize("kind", ["", "Relu", "PRelu"])
@pytest.mark.parametrize("n,hw", [(1, 1), (1, 2), (3, 1), (1, 4), (2, 2)])
def test_skinny_int8_kernel_matches_numpy(kind, n, hw):
    rng = np.random.default_rng(n * 10 + hw)
    cin, cout = 96, 80
    w = rng.standard_normal((cout, cin)).astype(np.float32)
    q, scale = _quantize(w)
    q.flags.writeable = False
    x = rng.standard_normal((n, cin, hw)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    slope = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    y = np.empty((n, cout, hw), np.float32)
    xs = np.empty((SKINNY_COLS, cin), np.float32)
    yt = np.empty((SKINNY_COLS, cout), np.float32)
    ranges = np.array([[0, 16], [16, 48], [48, cout]], np.int64)
    _pw_skinny(x, q, scale, xs, yt, y, bias, slope, ACT_CODES[kind], 0.0, 0.0, ranges, 0, 3)
    part = np.full_like(y, np.nan)  # one part: output channels 16 .. 47 only
    _pw_skinny(x, q, scale, xs, yt, part, bias, slope, ACT_CODES[kind], 0.0, 0.0, ranges, 1, 2)
    assert np.array_equal(part[:, 16:48], y[:, 16:48]) and np.isnan(part[:, :16]).all()
    assert np.isnan(part[:, 48:]).all()
    wd = q.astype(np.float64) * scale[:, None]
    ref = np.einsum("oc,ncp->nop", wd, x.astype(np.float64)) + bias[None, :, None]
    if kind == "Relu":
        ref = np.maximum(ref, 0)
    elif kind == "PRelu":
        ref = np.where(ref >= 0, ref, ref * slope[None, :, None])
    assert_close(y, ref)


def _dequantized(graph):
    """The same graph with each int8 weight replaced by q * scale (float32)."""
    g = graph.copy()
    for node in g.nodes:
        if node.attrs.get("weights_int8"):
            q = g.initializers[node.inputs[1]]
            s = g.initializers[node.inputs[WEIGHTS_INT8_INPUT]]
            name = g.fresh_name(node.inputs[1] + ".dq")
            g.initializers[name] = (q.astype(np.float32) * s.reshape(-1, 1, 1, 1)).astype(np.float32)
            node.inputs = [node.inputs[0], name] + [i for i in node.inputs[2:WEIGHTS_INT8_INPUT]]
            while node.inputs and not node.inputs[-1]:
                node.inputs.pop()
            node.attrs = {k: v for k, v in node.attrs.items() if k != "weights_int8"}
    return g


@pytest.fixture(scope="module")
def quicknet_int8():
    from qnrt.models import quicknet
    graph = optimize(quicknet.build(input_size=None))
    qgraph = quantize_pointwise_int8(graph.copy())
    n = sum(1 for nd in qgraph.nodes if nd.attrs.get("weights_int8"))
    assert n >= 2
    assert all(qgraph.initializers[nd.inputs[1]].dtype == np.int8
               for nd in qgraph.nodes if nd.attrs.get("weights_int8"))
    return graph, _dequantized(qgraph)


@pytest.mark.parametrize("size", [32, 224])
def test_quicknet_int8_matches_ort_on_dequantized(quicknet_int8, size):
    graph, ref_graph = quicknet_int8
    ref_graph = ref_graph.copy()
    ref_graph.inputs[0].shape = ("N", 3, "H", "W")
    x = np.random.default_rng(size).standard_normal((1, 3, size, size), dtype=np.float32)
    s = qnrt.Session(graph, weights="int8")
    name = s.get_inputs()[0].name
    ours = s.run(None, {name: x})[0]
    ref = ort_run(ref_graph, {name: x})[0]
    assert_close(ours, ref)


def test_int8_rewrite_is_idempotent_and_default_unchanged(quicknet_int8):
    graph, _ = quicknet_int8
    once = quantize_pointwise_int8(graph.copy())
    twice = quantize_pointwise_int8(once.copy())
    assert [n.inputs for n in once.nodes] == [n.inputs for n in twice.nodes]
    s = qnrt.Session(graph)
    assert not any(n.attrs.get("weights_int8") for n in s.graph.nodes)
    assert all(v.dtype != np.int8 for v in s.graph.initializers.values())


def test_bad_weights_value():
    from qnrt.models import quicknet
    with pytest.raises(ValueError, match="weights"):
        qnrt.Session(quicknet.build(width=0.125), weights="int4")
