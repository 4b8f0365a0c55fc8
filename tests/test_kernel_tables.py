"""No kernel table larger than its output needs: the cases the fuzzer found
(a MaxPool counts table of 2^58 entries, a Resize coordinate table of GiBs, a
depthwise convolution with a pad of 2^32-1) are refused by the validation pass
under the default limits, and with the limits raised so that they pass, they
run in bounded memory and time and give the right answer."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

import qnrt
from qnrt import Limits, Session
from qnrt.graph import Graph, Node, ValueInfo

ROOMY = Limits(max_dim=1 << 34)  # lets the absurd attributes past validation


def graph(node, x_shape, consts=None):
    return Graph([node], [ValueInfo("x", x_shape)], [ValueInfo("y", ())], consts or {}, {}, "g")


def run_bounded(g, x, limits=ROOMY, peak_mib=64, seconds=20.0):
    """Session + one run, with traced allocations and time checked."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        y = Session(g, limits=limits).run(None, {"x": x})[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    took = time.perf_counter() - start
    assert peak < peak_mib << 20, f"{peak / 2**20:.1f} MiB traced"
    assert took < seconds, f"{took:.1f} s"
    return y


BIG = 2**29


def huge_pool(op):
    return Node(op, ["x"], ["y"], {"kernel_shape": [BIG + 1, BIG + 1], "strides": [BIG, BIG],
                                   "pads": [BIG, BIG, BIG, BIG]}, "pool")


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_a_huge_pool_window_is_refused_by_validation(op):
    with pytest.raises(qnrt.GraphError, match=r"attribute 'kernel_shape' is .*allowed: 2 "
                                              r"entries, from 1 to 1,048,576"):
        Session(graph(huge_pool(op), (1, 2, 4, 5)))


def window_slices(n, out):
    """The image rows (or columns) of each window of huge_pool along one dim."""
    return [slice(max(0, o * BIG - BIG), min(n, o * BIG - BIG + BIG + 1)) for o in range(out)]


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_a_huge_pool_window_builds_no_table_of_its_size(op):
    """2x2 windows over a 4x5 image, each 2^29+1 wide: computed by slicing."""
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 5)).astype(np.float32)
    y = run_bounded(graph(huge_pool(op), x.shape), x)
    assert y.shape == (1, 2, 2, 2)
    for i, rows in enumerate(window_slices(4, 2)):
        for j, cols in enumerate(window_slices(5, 2)):
            window = x[0, :, rows, cols]
            want = window.max(axis=(1, 2)) if op == "MaxPool" else window.mean(axis=(1, 2))
            np.testing.assert_allclose(y[0, :, i, j], want, rtol=1e-6)


def test_a_pool_wider_than_its_image_is_right_and_fast():
    """Kernel 9x40 over a 3x7 image with pads: the window kernel visits only
    the taps inside the image (column by column), the reference agrees."""
    x = np.random.default_rng(1).standard_normal((1, 3, 3, 7)).astype(np.float32)
    node = Node("AveragePool", ["x"], ["y"], {"kernel_shape": [9, 40], "pads": [4, 20, 4, 19],
                                              "count_include_pad": 1}, "pool")
    fast = run_bounded(graph(node, x.shape), x, Limits())
    ref = Session(graph(node, x.shape), kernels="reference").run(None, {"x": x})[0]
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-7)
    from helpers import one_node

    np.testing.assert_allclose(fast, one_node("AveragePool", {"x": x}, attrs=node.attrs)[0],
                               rtol=1e-5, atol=1e-7)


def test_a_same_shape_resize_makes_no_table_larger_than_its_output():
    """gather6's merged table would be 48 bytes per element (6 x int64) of a
    (1, 64, 64, 64) copy; the per-axis tables of the reference do instead."""
    x = np.random.default_rng(2).standard_normal((1, 64, 64, 64)).astype(np.float32)
    node = Node("Resize", ["x", "", "s"], ["y"], {"mode": "nearest"}, "rs")
    g = graph(node, x.shape, {"s": np.ones(4, np.float32)})
    session = Session(g)
    assert session.kernel_names({"x": x.shape}) == [("rs", "resize.reference")]
    out_mib = x.nbytes / 2**20
    y = run_bounded(g, x, Limits(), peak_mib=int(4 * out_mib + 16))  # arena, copies, not 48x
    np.testing.assert_array_equal(y, x)


def test_resize_scales_must_be_finite():
    node = Node("Resize", ["x", "", "s"], ["y"], {"mode": "linear"}, "rs")
    g = graph(node, (1, 1, 4, 4), {"s": np.array([1, 1, np.inf, 2], np.float32)})
    with pytest.raises(qnrt.GraphError, match="scales .* must be positive and finite"):
        Session(g).prepare({"x": (1, 1, 4, 4)})


def dw_node(pad, stride):
    return Node("Conv", ["x", "w"], ["y"], {"kernel_shape": [3, 3], "group": 4,
                                            "pads": [pad] * 4, "strides": [stride] * 2}, "dw")


def test_a_depthwise_pad_of_2_to_the_32_is_refused_by_validation():
    w = np.ones((4, 1, 3, 3), np.float32)
    with pytest.raises(qnrt.GraphError, match=r"'dw' \(Conv\): attribute 'pads' is "
                                              r".*allowed: 4 entries, from 0 to 1,048,576"):
        Session(graph(dw_node(2**32 - 1, 2**32), (1, 4, 8, 8), {"w": w}))


def test_a_depthwise_pad_of_2_to_the_32_runs_in_bounded_memory():
    """Output 3x3: only the centre's taps reach the image (rows and columns 1-3)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    y = run_bounded(graph(dw_node(2**32 - 1, 2**32), x.shape, {"w": w}), x)
    expected = np.zeros((1, 4, 3, 3), np.float32)
    expected[0, :, 1, 1] = (w[:, 0] * x[0, :, 1:4, 1:4]).sum(axis=(1, 2))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
