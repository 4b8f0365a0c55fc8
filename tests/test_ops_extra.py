"""The ops beyond QuickNet's (Pad, ConvTranspose, Resize/Upsample, Split,
Slice, Pow and unary math, Reduce*, SiLU) against onnxruntime, in the style
of test_ops.py: hypothesis draws shapes and attributes, our kernel runs
through the op contract and must match ORT's one-node model."""
from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from helpers import one_node, ort_run_nodes, ort_session
from test_ops import (applicable_variants, broadcast_pair, check, close, prepare, raises, rand,
                      readonly, run_qnrt, seeds)
from qnrt.graph import Graph, Node, ValueInfo
from qnrt.ops import get_op, supported_ops

SOME = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=15, deadline=None)
I64 = np.int64


def ints(v):
    return np.array(v, I64)


# --- Pad -----------------------------------------------------------------------

@st.composite
def pad_cases(draw):
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    mode = draw(st.sampled_from(["constant", "reflect", "edge", "wrap"]))
    crop = mode != "reflect" or draw(st.booleans())
    begin, end = [], []
    for n in shape:
        cb = draw(st.integers(0, n - 1)) if crop and draw(st.booleans()) else 0
        ce = draw(st.integers(0, n - 1 - cb)) if crop and draw(st.booleans()) else 0
        m = n - cb - ce  # the cropped extent, >= 1
        hi = m - 1 if mode == "reflect" else 3
        pb, pe = draw(st.integers(0, hi)), draw(st.integers(0, hi))
        begin.append(pb if pb else -cb)
        end.append(pe if pe else -ce)
    x = rand(np.random.default_rng(draw(seeds)), shape)
    return x, mode, begin, end


@SOME
@given(pad_cases(), st.sampled_from(["const", "omitted", "runtime", "attr", "axes"]), seeds)
def test_pad(case, form, seed):
    x, mode, begin, end = case
    opset = 19 if mode == "wrap" else 13
    value = np.array(np.random.default_rng(seed).uniform(-3, 3), np.float32)
    attrs = {"mode": mode}
    if form == "attr":  # opset < 11: pads and value are attributes, no negative pads
        assume(mode != "wrap")
        begin, end = [max(0, p) for p in begin], [max(0, p) for p in end]
        attrs.update(pads=begin + end, value=float(value))
        check("Pad", {"x": x}, attrs=attrs, opset=10)
        return
    if form == "axes":  # opset 18: pads for a subset of (negative) axes only
        axes = [a for a in range(x.ndim) if begin[a] or end[a]] or [0]
        axes_in = [a - x.ndim if a % 2 else a for a in axes]
        consts = {"pads": ints([begin[a] for a in axes] + [end[a] for a in axes]),
                  "cv": value, "axes": ints(axes_in)}
        check("Pad", {"x": x}, consts, attrs, ["x", "pads", "cv", "axes"], opset=max(opset, 18))
        return
    consts, inputs = {"pads": ints(begin + end)}, {"x": x}
    if form == "const":
        consts["cv"] = value
    elif form == "runtime":
        inputs["cv"] = value
    names = ["x", "pads", "" if form == "omitted" else "cv"]
    check("Pad", inputs, consts, attrs, names, opset=opset)


def test_pad_nchw_spatial():
    """The common CNN case: 4-D, only H and W padded, larger planes (row fast path)."""
    rng = np.random.default_rng(0)
    x = rand(rng, (2, 3, 17, 19))
    for mode in ("constant", "reflect", "edge"):
        for pads in ([0, 0, 1, 2, 0, 0, 3, 1], [0, 1, 2, 0, 0, 2, 0, 3],
                     [0, 0, -2, 1, 0, 0, 1, -3]):
            check("Pad", {"x": x}, {"pads": ints(pads)}, {"mode": mode}, opset=13)


# --- ConvTranspose -------------------------------------------------------------

@st.composite
def conv_transpose_cases(draw):
    rank = draw(st.sampled_from([2, 2, 2, 1]))
    n, g = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    cin, mg = g * draw(st.integers(1, 3)), draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 6)) for _ in range(rank)]
    k = [draw(st.integers(1, 4)) for _ in range(rank)]
    s = [draw(st.integers(1, 3)) for _ in range(rank)]
    d = [draw(st.integers(1, 2)) for _ in range(rank)]
    op = [draw(st.integers(0, a - 1)) for a in s]  # ORT refuses output_padding >= stride
    full = [st_ * (i - 1) + p + (kk - 1) * dd + 1
            for i, st_, p, kk, dd in zip(spatial, s, op, k, d)]
    attrs = {"group": g, "strides": s, "dilations": d, "kernel_shape": k, "output_padding": op}
    form = draw(st.sampled_from(["pads", "pads", "output_shape", "SAME_UPPER", "SAME_LOWER",
                                 "VALID"]))
    if form == "pads":
        pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
        assume(all(f - pads[i] - pads[rank + i] >= 1 for i, f in enumerate(full)))
        attrs["pads"] = pads
    elif form == "output_shape":
        attrs["output_shape"] = [draw(st.integers(max(1, f - 3), f)) for f in full]
        if draw(st.booleans()):
            attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "NOTSET"]))
    else:
        attrs["auto_pad"] = form
    rng = np.random.default_rng(draw(seeds))
    x = rand(rng, (n, cin, *spatial))
    w = rand(rng, (cin, mg, *k))
    b = rand(rng, (mg * g,)) if draw(st.booleans()) else None
    return x, w, b, attrs


@settings(max_examples=40, deadline=None)
@given(conv_transpose_cases(), st.booleans())
def test_conv_transpose(case, w_const):
    x, w, b, attrs = case
    inputs, consts = {"x": x}, {}
    (consts if w_const else inputs)["w"] = w
    if b is not None:
        (consts if w_const else inputs)["b"] = b
    names = ["x", "w"] + (["b"] if b is not None else [])
    check("ConvTranspose", inputs, consts, attrs, names)


def test_conv_transpose_tiles_and_allocations():
    """Bigger than one workspace tile; run() allocates no activation-sized memory."""
    import tracemalloc
    rng = np.random.default_rng(0)
    for xs, ws, attrs in [((1, 16, 24, 24), (16, 8, 4, 4), {"strides": [2, 2], "pads": [1] * 4}),
                          ((2, 8, 40, 40), (8, 16, 3, 3), {"group": 2, "strides": [2, 2],
                                                          "pads": [1] * 4,
                                                          "output_padding": [1, 1]})]:
        cout = ws[1] * attrs.get("group", 1)
        x, w, b = rand(rng, xs), rand(rng, ws, -0.3, 0.3), rand(rng, (cout,))
        check("ConvTranspose", {"x": x}, {"w": w, "b": b}, attrs)
        kernel, ins, out_shapes = prepare("ConvTranspose", {"x": x}, {"w": w, "b": b}, attrs)
        assert kernel.workspace <= 512 * 1024
        outs = [np.empty(out_shapes[0], np.float32)]
        ws_ = np.empty(kernel.workspace, np.uint8)
        kernel.run(ins, outs, ws_)
        tracemalloc.start()
        kernel.run(ins, outs, ws_)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * 1024, peak


# --- Resize / Upsample -----------------------------------------------------------

SCALES = [0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
COORDS = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel",
          "half_pixel_symmetric", "tf_half_pixel_for_nn"]


@st.composite
def resize_cases(draw):
    mode = draw(st.sampled_from(["nearest", "linear"]))
    shape = [draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 7)),
             draw(st.integers(1, 7))]
    coord = draw(st.sampled_from(COORDS))
    attrs = {"mode": mode, "coordinate_transformation_mode": coord}
    if mode == "nearest":
        attrs["nearest_mode"] = draw(st.sampled_from(["round_prefer_floor", "round_prefer_ceil",
                                                      "floor", "ceil"]))
    resized = [2, 3] if mode == "linear" else [1, 2, 3]
    if draw(st.booleans()):
        sizes = [d if i not in resized else draw(st.integers(1, 12))
                 for i, d in enumerate(shape)]
        scales = None
    else:
        scales = [1.0 if i not in resized else draw(st.sampled_from(SCALES))
                  for i in range(4)]
        assume(all(int(np.floor(np.float32(s) * np.float32(d))) >= 1
                   for s, d in zip(scales, shape)))
        sizes = None
    x = rand(np.random.default_rng(draw(seeds)), shape)
    return x, attrs, scales, sizes


@settings(max_examples=40, deadline=None)
@given(resize_cases(), st.booleans())
def test_resize(case, axes_form):
    x, attrs, scales, sizes = case
    opset = 19 if attrs["coordinate_transformation_mode"] == "half_pixel_symmetric" else 13
    given_ = np.array(scales, np.float32) if scales is not None else ints(sizes)
    if axes_form:  # opset 18: scales/sizes for the spatial axes only, negative axes
        attrs = dict(attrs, axes=[-2, -1])
        given_ = given_[2:]
        opset = max(opset, 18)
    consts = {"scales": given_} if scales is not None else {"sizes": given_}
    names = ["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"]
    check("Resize", {"x": x}, consts, attrs, names, opset=opset)


def test_resize_forms():
    """Resize-10 (X, scales), Upsample-9 (scales input) and -7 (scales attr),
    empty scales beside sizes (opset 11), linear on a 2-D input."""
    rng = np.random.default_rng(0)
    x = rand(rng, (1, 2, 5, 7))
    for mode in ("nearest", "linear"):
        for sc in ([1, 1, 2, 3], [1, 1, 0.5, 0.6], [1, 1, 1.5, 2.5]):
            scales = np.array(sc, np.float32)
            check("Resize", {"x": x}, {"scales": scales}, {"mode": mode}, opset=10)
            if min(sc) >= 1:
                check("Upsample", {"x": x}, {"scales": scales}, {"mode": mode}, opset=9)
                check("Upsample", {"x": x}, attrs={"mode": mode, "scales": [float(v) for v in sc]},
                      opset=7)
    check("Resize", {"x": x}, {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32),
                               "sizes": ints([1, 2, 9, 4])},
          {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=11)
    check("Resize", {"x": x[0, 0]}, {"sizes": ints([8, 3])}, {"mode": "linear"},
          names=["x", "", "", "sizes"], opset=13)
    check("Resize", {"x": rand(rng, (2, 3, 2, 4, 3))}, {"scales": np.array([1, 2, 1.5, 1, 2],
                                                                          np.float32)},
          {"mode": "nearest"}, names=["x", "", "scales"], opset=13)


def test_resize_larger():
    """QuickNet-size planes: 2x nearest (row reuse) and bilinear, up and down."""
    rng = np.random.default_rng(1)
    x = rand(rng, (1, 8, 28, 28))
    for mode in ("nearest", "linear"):
        for sc in (2.0, 0.5, 1.75):
            check("Resize", {"x": x}, {"scales": np.array([1, 1, sc, sc], np.float32)},
                  {"mode": mode}, names=["x", "", "scales"], opset=13)


# --- Split / Slice -------------------------------------------------------------------

def multi_node(op, inputs, consts, attrs, names, k):
    """A node with k outputs (test_ops' harness has one): (opdef, node, consts, values, shapes)."""
    consts = {n: readonly(v) for n, v in consts.items()}
    node = Node(op, list(names), [f"y{i}" for i in range(k)], dict(attrs), "under_test")
    values = {**inputs, **consts}
    shapes = [tuple(values[n].shape) if n else None for n in names]
    return get_op(op), node, consts, values, shapes


def run_multi(op, inputs, consts, attrs, names, k, variant=None):
    """Our kernel (the named variant, else the chosen one) on a node with k outputs."""
    opdef, node, consts, values, shapes = multi_node(op, inputs, consts, attrs, names, k)
    out_shapes = opdef.infer(node, shapes, consts)
    kernel = opdef.prepare(node, shapes, out_shapes, consts, variant=variant)
    outs = [np.full(s, np.nan, np.float32) for s in out_shapes]
    kernel.run([values[n] if n else None for n in names], outs,
               np.empty(kernel.workspace, np.uint8))
    return outs


def multi_variants(op, inputs, consts, attrs, names, k):
    """The variants that apply to a node with k outputs, in order (reference last)."""
    opdef, node, consts, values, shapes = multi_node(op, inputs, consts, attrs, names, k)
    spec = opdef.spec(node, shapes, opdef.infer(node, shapes, consts), consts)
    return [v.name for v in opdef.applicable(spec)]


@SOME
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_split(shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    dim = shape[axis]
    form = data.draw(st.sampled_from(["input", "attr", "equal", "num_outputs"]))
    attrs, consts, names, opset = {"axis": axis}, {}, ["x"], 13
    if form in ("input", "attr"):
        cuts = sorted(data.draw(st.lists(st.integers(0, dim), max_size=3)))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [dim])]
        if form == "input":
            consts, names = {"split": ints(sizes)}, ["x", "split"]
        else:
            attrs["split"], opset = sizes, 11
        k = len(sizes)
    elif form == "equal":
        k = data.draw(st.sampled_from([q for q in range(1, dim + 1) if dim % q == 0]))
    else:
        k = data.draw(st.integers(1, dim))
        assume(-(-dim // k) * (k - 1) < dim)  # ORT refuses an empty last chunk
        attrs["num_outputs"], opset = k, 18
    ref = one_node("Split", {"x": x}, consts, attrs, names, opset=opset, n_outputs=k)
    variants = multi_variants("Split", {"x": x}, consts, attrs, names, k)
    assert variants[-1] == get_op("Split").reference.name
    for variant in [None, *variants]:  # the chosen one, then every variant (the reference too)
        ours = run_multi("Split", {"x": x}, consts, attrs, names, k, variant)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            close(a, b)


@st.composite
def slice_cases(draw):
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    rank = len(shape)
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    bound = st.one_of(st.integers(-8, 8), st.sampled_from([2**63 - 1, -2**63, 2**31 - 1,
                                                           -2**31, 2**31]))
    starts = [draw(bound) for _ in axes]
    ends = [draw(bound) for _ in axes]
    steps = [draw(st.sampled_from([1, 1, 2, 3, -1, -2, -3])) for _ in axes]
    axes = [a - rank if draw(st.booleans()) else a for a in axes]
    x = rand(np.random.default_rng(draw(seeds)), shape)
    return x, starts, ends, axes, steps


@SOME
@given(slice_cases(), st.sampled_from(["full", "no_steps", "no_axes", "runtime_x", "attrs"]))
def test_slice(case, form):
    x, starts, ends, axes, steps = case
    consts = {"starts": ints(starts), "ends": ints(ends), "axes": ints(axes), "steps": ints(steps)}
    names = ["x", "starts", "ends", "axes", "steps"]
    if form == "attrs":  # opset < 10: attributes, step 1
        check("Slice", {"x": x}, attrs={"starts": starts, "ends": ends, "axes": axes}, opset=9)
        return
    if form == "no_steps":
        names, consts["steps"] = names[:4], None
    elif form == "no_axes":  # the default axes: 0 .. len(starts) - 1
        names, consts["axes"] = ["x", "starts", "ends", "", "steps"], None
    consts = {k: v for k, v in consts.items() if v is not None}
    if form == "runtime_x":
        check("Slice", {}, dict(consts, x=x), names=names, opset=13)
    else:
        check("Slice", {"x": x}, consts, names=names, opset=13)


def test_split_slice_are_copies():
    for op in ("Split", "Slice"):
        assert not get_op(op).alias and not get_op(op).inplace


# --- Pow and unary math ---------------------------------------------------------------

@SOME
@given(broadcast_pair(max_rank=5), st.sampled_from(["tensor", "const", "scalar"]),
       st.sampled_from([2.0, 3.0, 0.5, -1.0, 1.0, 0.0, 1.7, -2.5]), seeds)
def test_pow(pair, form, e, seed):
    rng = np.random.default_rng(seed)
    a = rand(rng, pair[0], 0.2, 2.0)
    if form == "scalar":  # one exponent: the special cases, negative bases for integers
        if float(e).is_integer():
            a = rand(rng, pair[0], -2.0, 2.0)
        if e < 0:
            a = np.where(np.abs(a) < 0.2, 0.5, a).astype(np.float32)
        check("Pow", {"a": a}, {"b": np.array(e, np.float32)}, names=["a", "b"])
        return
    b = rand(rng, pair[1], -2.0, 2.0)
    inputs = {"a": a, "b": b}
    consts = {"b": inputs.pop("b")} if form == "const" else {}
    check("Pow", inputs, consts, names=["a", "b"])


UNARY_RANGES = {"Sqrt": (0, 9), "Exp": (-8, 8), "Log": (0.01, 9), "Abs": (-5, 5),
                "Neg": (-5, 5), "Reciprocal": (0.2, 5)}


@SOME
@given(st.sampled_from(sorted(UNARY_RANGES)), st.lists(st.integers(1, 5), max_size=4), seeds,
       st.booleans())
def test_unary_math(op, shape, seed, flip):
    lo, hi = UNARY_RANGES[op]
    x = rand(np.random.default_rng(seed), shape, lo, hi)
    if op == "Reciprocal" and flip:
        x = np.negative(x, out=x)
    check(op, {"x": x})


@SOME
@given(st.lists(st.integers(1, 5), max_size=4), seeds)
def test_silu(shape, seed):
    x = rand(np.random.default_rng(seed), shape, -10, 10)
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    ref = ort_run_nodes(nodes, {"x": x})[0]
    close(run_qnrt("SiLU", {"x": x})[0], ref)
    for variant in applicable_variants("SiLU", {"x": x}):  # the reference among them
        close(run_qnrt("SiLU", {"x": x}, variant=variant)[0], ref)


def test_inplace_elementwise_extra():
    rng = np.random.default_rng(1)
    x = rand(rng, (2, 3, 4, 5), 0.1, 2)
    for op, consts in [("SiLU", {}), ("Sqrt", {}), ("Exp", {}), ("Neg", {}),
                       ("Pow", {"e": np.float32(2.0)}), ("Pow", {"e": np.float32(1.3)}),
                       ("Pow", {"e": rand(rng, (3, 1, 1))})]:
        assert get_op(op).inplace
        want = run_qnrt(op, {"x": x.copy()}, consts)[0]
        kernel, ins, _ = prepare(op, {"x": x.copy()}, consts)
        kernel.run(ins, [ins[0]], None)
        np.testing.assert_array_equal(ins[0], want)


# --- Reduce ----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"]),
       st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_reduce(op, shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape)
    rank = len(shape)
    axes = data.draw(st.lists(st.integers(-rank, rank - 1), max_size=rank,
                              unique_by=lambda a: a % rank))
    keepdims = data.draw(st.integers(0, 1))
    noop = data.draw(st.integers(0, 1)) if not axes else 0
    attrs = {"keepdims": keepdims}
    if data.draw(st.booleans()):  # opset 18 form: axes as an input
        attrs["noop_with_empty_axes"] = noop
        consts, names = ({"axes": ints(axes)}, ["x", "axes"]) if axes else ({}, ["x"])
        check(op, {"x": x}, consts, attrs, names, opset=18)
    elif op == "ReduceSum":  # opset 13: ReduceSum already takes axes as an input
        attrs["noop_with_empty_axes"] = noop
        consts, names = ({"axes": ints(axes)}, ["x", "axes"]) if axes else ({}, ["x"])
        check(op, {"x": x}, consts, attrs, names, opset=13)
    else:
        if axes:
            attrs["axes"] = axes
        check(op, {"x": x}, attrs=attrs, opset=13)


def test_reduce_larger():
    """Long rows (float64 scalar sums) and channel reductions (row accumulation)."""
    x = rand(np.random.default_rng(2), (2, 16, 40, 40), -1, 3)
    for op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        for axes in ([2, 3], [1], [0, 2], [1, 3], [0, 1, 2, 3]):
            check(op, {"x": x}, {"axes": ints(axes)}, {"keepdims": 1}, ["x", "axes"], opset=18)


# --- through qnrt.Session --------------------------------------------------------------

def test_session_pad_conv_resize_concat_reduce():
    from qnrt.exporters.onnx_export import to_onnx
    from qnrt import Session

    rng = np.random.default_rng(5)
    inits = {"pads": ints([0, 0, 1, 1, 0, 0, 1, 1]), "w": rand(rng, (4, 3, 3, 3), -0.5, 0.5),
             "b": rand(rng, (4,)), "scales": np.array([1, 1, 2, 2], np.float32),
             "sizes": ints([1, 3, 16, 16]), "axes": ints([2, 3]),
             "starts": ints([0]), "ends": ints([-1]), "saxes": ints([3]), "e": np.float32(2.0)}
    nodes = [
        Node("Pad", ["x", "pads"], ["p"], {"mode": "reflect"}, "pad"),
        Node("Conv", ["p", "w", "b"], ["c"], {"kernel_shape": [3, 3]}, "conv"),
        Node("Relu", ["c"], ["r"], {}, "relu"),
        Node("Resize", ["r", "", "scales"], ["up"], {"mode": "linear"}, "up"),
        Node("Resize", ["x", "", "", "sizes"], ["xs"], {"mode": "nearest",
                                                        "nearest_mode": "floor",
                                                        "coordinate_transformation_mode":
                                                            "asymmetric"}, "xs"),
        Node("Concat", ["up", "xs"], ["cat"], {"axis": 1}, "cat"),
        Node("Pow", ["cat", "e"], ["sq"], {}, "sq"),
        Node("Slice", ["sq", "starts", "ends", "saxes"], ["sl"], {}, "slice"),
        Node("ReduceMean", ["sl"], ["y"], {"axes": [2, 3], "keepdims": 0}, "mean"),
    ]
    graph = Graph(nodes, [ValueInfo("x", (1, 3, 8, 8))], [ValueInfo("y", (1, 7))], inits)
    x = rand(rng, (1, 3, 8, 8))
    ref = ort_session(to_onnx(graph)).run(["y"], {"x": x})[0]
    (ours,) = Session(graph).run(None, {"x": x})
    close(ours, ref)


def test_session_conv_transpose_split_reduce():
    """Multi-output Split and in-place unary ops through the planner."""
    from qnrt.exporters.onnx_export import to_onnx
    from qnrt import Session

    rng = np.random.default_rng(6)
    inits = {"w": rand(rng, (3, 4, 3, 3), -0.5, 0.5), "b": rand(rng, (4,)),
             "split": ints([1, 3]), "axes": ints([1])}
    nodes = [
        Node("ConvTranspose", ["x", "w", "b"], ["t"], {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                      "output_padding": [1, 1]}, "up"),
        Node("Split", ["t", "split"], ["s0", "s1"], {"axis": 1}, "split"),
        Node("Abs", ["s0"], ["a"], {}, "abs"),
        Node("Sqrt", ["a"], ["r"], {}, "sqrt"),
        Node("Neg", ["s1"], ["n"], {}, "neg"),
        Node("ReduceMax", ["n", "axes"], ["m"], {"keepdims": 1}, "max"),
        Node("Sub", ["r", "m"], ["y"], {}, "sub"),
    ]
    graph = Graph(nodes, [ValueInfo("x", (2, 3, 5, 6))], [ValueInfo("y", (2, 1, 10, 12))], inits)
    x = rand(rng, (2, 3, 5, 6))
    ref = ort_session(to_onnx(graph, opset=18)).run(["y"], {"x": x})[0]
    (ours,) = Session(graph).run(None, {"x": x})
    close(ours, ref)


# --- refusals ----------------------------------------------------------------------------

def test_bad_graphs_raise_named_errors_extra():
    x4 = np.zeros((1, 4, 5, 5), np.float32)
    raises("Pad", {"x": x4}, {"p": ints([0, 0, 1, 1])})  # wrong length
    raises("Pad", {"x": x4}, {"p": ints([0, 0, 5, 0, 0, 0, 0, 0])}, {"mode": "reflect"})
    raises("Pad", {"x": x4}, {"p": ints([0] * 8)}, {"mode": "mirror"}, match="mode")
    raises("Pad", {"x": x4}, {"p": ints([0, 0, -6, 0, 0, 0, 0, 0])})
    raises("Pad", {"x": x4, "p": ints([0] * 8)})  # run-time pads
    w = np.zeros((4, 2, 3, 3), np.float32)
    raises("ConvTranspose", {"x": x4}, {"w": np.zeros((3, 2, 3, 3), np.float32)})
    raises("ConvTranspose", {"x": x4}, {"w": w}, {"group": 3})
    raises("ConvTranspose", {"x": x4}, {"w": w}, {"output_padding": [2, 0], "strides": [2, 2]})
    raises("ConvTranspose", {"x": x4}, {"w": w}, {"output_shape": [20, 20]})
    raises("ConvTranspose", {"x": x4}, {"w": w}, {"pads": [4, 4, 4, 4]})
    raises("ConvTranspose", {"x": x4}, {"w": w, "b": np.zeros(3, np.float32)})
    raises("ConvTranspose", {"x": np.zeros((1, 4, 2, 2, 2), np.float32)},
           {"w": np.zeros((4, 1, 1, 1, 1), np.float32)})
    s = {"s": np.array([1, 1, 2, 2], np.float32)}
    raises("Resize", {"x": x4}, s, {"mode": "cubic"}, ["x", "", "s"], match="cubic")
    raises("Resize", {"x": x4}, s, {"coordinate_transformation_mode": "tf_crop_and_resize"},
           ["x", "", "s"])
    raises("Resize", {"x": x4}, {"s": np.array([1, 2, 2, 2], np.float32)}, {"mode": "linear"},
           ["x", "", "s"])
    raises("Resize", {"x": x4, "s": s["s"]}, names=["x", "", "s"])  # run-time scales
    raises("Resize", {"x": x4}, {"s": np.array([1, 1, 2], np.float32)}, names=["x", "", "s"])
    raises("Resize", {"x": x4}, {"s": np.array([1, 1, 0.1, 1], np.float32)}, names=["x", "", "s"])
    raises("Resize", {"x": x4}, {"s": np.array([1, 1, 0.5, 0.5], np.float32)},
           {"mode": "linear", "antialias": 1}, ["x", "", "s"])
    raises("Upsample", {"x": x4}, {"s": np.array([1, 1, 0.5, 1], np.float32)})
    raises("Split", {"x": x4}, {"s": ints([2, 3])}, {"axis": 1})
    raises("Split", {"x": x4}, attrs={"axis": 1, "num_outputs": 3})
    raises("Slice", {"x": x4}, {"s": ints([0]), "e": ints([2]), "a": ints([0]),
                                "t": ints([0])})
    raises("Slice", {"x": x4}, {"s": ints([0, 0]), "e": ints([2, 2]), "a": ints([1, -3])})
    raises("ReduceMean", {"x": x4}, attrs={"axes": [4]})
    raises("ReduceMax", {"x": x4}, attrs={"axes": [1, -3]})
    raises("ReduceSum", {"x": x4, "a": ints([1])})  # run-time axes
    raises("Pow", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((4,), np.float32)})


def test_registry_covers_the_extra_ops():
    want = {"Pad", "ConvTranspose", "Resize", "Upsample", "Split", "Slice", "Pow", "Sqrt", "Exp",
            "Log", "Abs", "Neg", "Reciprocal", "ReduceMean", "ReduceMax", "ReduceSum", "SiLU"}
    assert want <= set(supported_ops())


# --- Gather, LayerNormalization, attention-shaped MatMul / Transpose ----------------

@SOME
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_gather(shape, data):
    rng = np.random.default_rng(data.draw(seeds))
    x = rand(rng, shape)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    index_shape = data.draw(st.lists(st.integers(1, 3), max_size=2))  # [] is a 0-d index
    dtype = data.draw(st.sampled_from([np.int64, np.int32]))
    idx = rng.integers(-n, n, size=index_shape).astype(dtype)
    if data.draw(st.booleans()):
        check("Gather", {"x": x}, {"i": idx}, {"axis": axis}, names=["x", "i"])
    else:  # constant data too (folded by the importer, but the op must still run it)
        check("Gather", {}, {"x": x, "i": idx}, {"axis": axis}, names=["x", "i"])


def test_gather_refuses_what_it_cannot_index():
    x = np.zeros((2, 3), np.float32)
    raises("Gather", {"x": x}, {"i": ints([3])}, {"axis": 1}, names=["x", "i"])
    raises("Gather", {"x": x}, {"i": ints([-3])}, {"axis": 0}, names=["x", "i"])
    raises("Gather", {"x": x, "i": ints([0])}, names=["x", "i"])  # run-time indices
    raises("Gather", {"x": x}, {"i": np.array([0.0], np.float32)}, names=["x", "i"])
    raises("Gather", {"x": x}, {"i": ints([0])}, {"axis": 2}, names=["x", "i"])


@st.composite
def layer_norm_cases(draw):
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    norm = shape[axis % len(shape):]
    # scale / bias: the normalized shape, or trailing-aligned broadcasts of it
    def operand():
        k = draw(st.integers(0, len(norm)))
        return [d if draw(st.booleans()) else 1 for d in norm[len(norm) - k:]] or [1]
    rng = np.random.default_rng(draw(seeds))
    offset = draw(st.sampled_from([0.0, 0.0, 3.0]))
    x = rand(rng, shape) + np.float32(offset)
    scale, bias = rand(rng, operand()), rand(rng, operand())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    return x, axis, scale, bias, eps, draw(st.sampled_from(["const", "runtime", "no_bias"]))


@SOME
@given(layer_norm_cases())
def test_layer_norm(case):
    x, axis, scale, bias, eps, form = case
    attrs = {"axis": axis, "epsilon": eps}
    if form == "const":
        check("LayerNormalization", {"x": x}, {"s": scale, "b": bias}, attrs)
    elif form == "runtime":
        check("LayerNormalization", {"x": x, "s": scale, "b": bias}, attrs=attrs)
    else:
        check("LayerNormalization", {"x": x}, {"s": scale}, attrs)


def test_layer_norm_rows_larger():
    """Rows of a text recogniser's neck (T x C), and a constant row (variance 0)."""
    rng = np.random.default_rng(0)
    x = rand(rng, (2, 96, 64))
    x[0, 3] = 1.5
    check("LayerNormalization", {"x": x}, {"s": rand(rng, (64,)), "b": rand(rng, (64,))},
          {"epsilon": 1e-6})


def test_layer_norm_refusals():
    x = np.zeros((2, 3, 4), np.float32)
    raises("LayerNormalization", {"x": x}, {"s": np.ones(3, np.float32)}, {"axis": -1})
    raises("LayerNormalization", {"x": x}, {"s": np.ones((2, 3, 4, 1), np.float32)},
           {"axis": 0})
    raises("LayerNormalization", {"x": x}, {"s": np.ones(4, np.float32)}, {"axis": 3})


def test_matmul_over_batch_and_heads():
    """Attention's products: (N, heads, T, d) @ (N, heads, d, T), then with a
    per-head (1, heads, ...) operand and a shared constant (d, e) weight."""
    rng = np.random.default_rng(0)
    q, k = rand(rng, (2, 4, 7, 8)), rand(rng, (2, 4, 8, 7))
    check("MatMul", {"a": q, "b": k}, names=["a", "b"])
    check("MatMul", {"a": q, "b": rand(rng, (1, 4, 8, 5))}, names=["a", "b"])
    check("MatMul", {"a": q}, {"b": rand(rng, (8, 5))}, names=["a", "b"])
    check("MatMul", {"a": rand(rng, (3, 1, 6, 8)), "b": rand(rng, (4, 8, 2))}, names=["a", "b"])


def test_attention_transposes_and_softmax():
    """The permutations an attention neck uses (rank 4 and 5) and Softmax on the
    last axis of its scores."""
    rng = np.random.default_rng(1)
    qkv = rand(rng, (2, 6, 3, 4, 5))
    for perm in ([2, 0, 3, 1, 4], [0, 2, 1, 3, 4], [4, 3, 2, 1, 0]):
        check("Transpose", {"x": qkv}, attrs={"perm": perm})
    check("Transpose", {"x": rand(rng, (2, 4, 7, 8))}, attrs={"perm": [0, 1, 3, 2]})
    check("Softmax", {"x": rand(rng, (2, 4, 7, 7), -6, 6)}, attrs={"axis": -1})
