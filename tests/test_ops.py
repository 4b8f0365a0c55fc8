"""Every op against onnxruntime, tinygrad test_ops style: hypothesis draws
shapes and attributes, our kernel runs through the op contract (infer ->
allocate -> prepare -> run) and must match ORT's one-node model."""
from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from helpers import assert_close, one_node, ort_run_nodes
from qnrt.graph import GraphError, Node
from qnrt.ops import all_variants, get_op, supported_ops

FAST = settings(max_examples=40, deadline=None)
SOME = settings(max_examples=20, deadline=None)


# --- harness -----------------------------------------------------------------

def readonly(a):
    a = np.array(a)
    a.flags.writeable = False  # like a memory-mapped initializer
    return a


def one_op(op, inputs, consts=None, attrs=None, names=None):
    """(OpDef, node, input shapes, output shapes, consts, input values) for one
    node of `op`; consts are read-only, like memory-mapped initializers."""
    consts = {k: readonly(v) for k, v in (consts or {}).items()}
    names = names if names is not None else [*inputs, *consts]
    node = Node(op, list(names), ["y"], dict(attrs or {}), "under_test")
    values = {**inputs, **consts}
    shapes = [tuple(values[n].shape) if n else None for n in names]
    opdef = get_op(op)
    return opdef, node, shapes, opdef.infer(node, shapes, consts), consts, [
        values[n] if n else None for n in names]


def prepare(op, inputs, consts=None, attrs=None, names=None, variant=None):
    """infer + prepare one node (the named kernel variant, else the one the
    registry chooses); returns (kernel, ins, out shapes)."""
    opdef, node, shapes, out_shapes, consts, ins = one_op(op, inputs, consts, attrs, names)
    return opdef.prepare(node, shapes, out_shapes, consts, variant=variant), ins, out_shapes


def applicable_variants(op, inputs, consts=None, attrs=None, names=None):
    """Names of the variants of `op` whose predicate holds for this node, in order."""
    opdef, node, shapes, out_shapes, consts, _ = one_op(op, inputs, consts, attrs, names)
    return [v.name for v in opdef.applicable(opdef.spec(node, shapes, out_shapes, consts))]


def run_qnrt(op, inputs, consts=None, attrs=None, names=None, variant=None):
    kernel, ins, out_shapes = prepare(op, inputs, consts, attrs, names, variant)
    outs = [np.full(s, np.nan, np.float32) for s in out_shapes]
    kernel.run(ins, outs, np.empty(kernel.workspace, np.uint8))
    return outs


def run_variants(op, inputs, consts=None, attrs=None, names=None):
    """{variant name: outputs} for every variant that applies, reference last."""
    return {v: run_qnrt(op, dict(inputs), consts, attrs, names, variant=v)
            for v in applicable_variants(op, inputs, consts, attrs, names)}


def close(ours, ref):
    assert_close(ours, np.asarray(ref, np.float32))


def close_variants(op, results, ref):
    """results (from run_variants): the reference against `ref` (ONNX Runtime's
    answer), every other variant against the reference."""
    results = dict(results)
    reference = results.pop(get_op(op).reference.name)[0]
    close(reference, ref)
    for outs in results.values():
        close(outs[0], reference)


def check(op, inputs, consts=None, attrs=None, names=None, ref_attrs=None, opset=17):
    """The op's reference against ONNX Runtime, every other variant that applies
    against the reference, and the chosen one against ONNX Runtime."""
    ref = one_node(op, inputs, consts, ref_attrs if ref_attrs is not None else attrs, names,
                   opset=opset)[0]
    close_variants(op, run_variants(op, inputs, consts, attrs, names), ref)
    ours = run_qnrt(op, inputs, consts, attrs, names)[0]
    close(ours, ref)
    return ours


def rand(rng, shape, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


seeds = st.integers(0, 2**31 - 1)
dim = st.integers(1, 5)


def out_size(n, k, s, d, pb, pe):
    return (n + pb + pe - (d * (k - 1) + 1)) // s + 1


# --- Conv --------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    path = draw(st.sampled_from(["pointwise", "depthwise3x3", "depthwise", "grouped", "dense"]))
    n = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if path == "pointwise":
        cin, cout, g, k, s, d, pads = draw(dim), draw(dim), 1, (1, 1), (1, 1), (1, 1), [0] * 4
    elif path == "depthwise3x3":
        cin = draw(dim)
        cout, g, k, s, d, pads = cin, cin, (3, 3), (1, 1), (1, 1), [1] * 4
    else:
        g = 1 if path == "dense" else draw(st.integers(2, 3))
        cin = g * (1 if path == "depthwise" else draw(st.integers(1, 3)))
        cout = g * draw(st.integers(1, 2))
        k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        pads = [draw(st.integers(0, 2)) for _ in range(4)]
    attrs = {"group": g, "strides": list(s), "dilations": list(d), "kernel_shape": list(k)}
    auto = draw(st.sampled_from(["NOTSET"] * 4 + ["VALID", "SAME_UPPER", "SAME_LOWER"]))
    if path.startswith(("pointwise", "depthwise3x3")) or auto == "NOTSET":
        attrs["pads"] = pads
        assume(all(out_size(*a) >= 1 for a in [(h, k[0], s[0], d[0], pads[0], pads[2]),
                                              (w, k[1], s[1], d[1], pads[1], pads[3])]))
    else:
        attrs["auto_pad"] = auto
        if auto != "VALID":  # ORT refuses dilations with SAME_*
            attrs["dilations"] = [1, 1]
        else:
            assume(h >= d[0] * (k[0] - 1) + 1 and w >= d[1] * (k[1] - 1) + 1)
    rng = np.random.default_rng(draw(seeds))
    x = rand(rng, (n, cin, h, w))
    wt = rand(rng, (cout, cin // g) + k)
    bias = rand(rng, (cout,)) if draw(st.booleans()) else None
    return x, wt, bias, attrs


@FAST
@given(conv_cases())
def test_conv(case):
    x, wt, bias, attrs = case
    consts = {"w": wt} if bias is None else {"w": wt, "b": bias}
    check("Conv", {"x": x}, consts, attrs)


ACTIVATIONS = [("Relu", {}), ("PRelu", {}), ("Clip", {"min": -0.5, "max": 1.5}),
               ("Sigmoid", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("HardSwish", {}),
               ("LeakyRelu", {"alpha": 0.07}), ("HardSigmoid", {}), ("LeakyRelu", {}), ("Tanh", {}),
               ("", {})]


@FAST
@given(conv_cases(), st.sampled_from(ACTIVATIONS), st.booleans())
def test_conv_fused_activation(case, act, slope_is_scalar):
    """Conv with `activation` attrs == ORT Conv followed by the activation node."""
    x, wt, bias, attrs = case
    kind, params = act
    cout = wt.shape[0]
    rng = np.random.default_rng(cout)
    slope = rand(rng, (cout,), -0.5, 0.5)
    if slope_is_scalar:
        slope = np.full(cout, 0.2, np.float32)
    fused = dict(attrs, activation=kind)
    for ours, onnx_name in (("activation_alpha", "alpha"), ("activation_beta", "beta"),
                            ("activation_min", "min"), ("activation_max", "max")):
        if onnx_name in params:
            fused[ours] = params[onnx_name]
    inits = {"w": wt} if bias is None else {"w": wt, "b": bias}
    consts, names = dict(inits), ["x", "w", "b" if bias is not None else ""]
    if kind == "PRelu":  # input 3, after a possibly omitted bias
        consts["slope"] = slope
        names.append("slope")
    ours = run_qnrt("Conv", {"x": x}, consts, fused, names)[0]
    variants = run_variants("Conv", {"x": x}, consts, fused, names)

    nodes = [helper.make_node("Conv", ["x", *inits], ["c" if kind else "y"], **attrs)]
    if kind == "PRelu":
        inits["slope"] = slope.reshape(cout, 1, 1)
        nodes.append(helper.make_node("PRelu", ["c", "slope"], ["y"]))
    elif kind == "Clip":
        inits.update(lo=np.float32(params["min"]), hi=np.float32(params["max"]))
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    elif kind:
        nodes.append(helper.make_node(kind, ["c"], ["y"], **params))
    ref = ort_run_nodes(nodes, {"x": x}, inits)[0]
    close(ours, ref)
    close_variants("Conv", variants, ref)


def test_conv_quicknet_shapes():
    """The exact fast-path shapes QuickNet runs (bigger than the hypothesis ones)."""
    rng = np.random.default_rng(0)
    cases = [((1, 3, 32, 32), (32, 3, 3, 3), 1, 1), ((1, 32, 32, 32), (32, 1, 3, 3), 32, 1),
             ((1, 32, 16, 16), (64, 32, 1, 1), 1, 0), ((2, 16, 33, 31), (16, 1, 3, 3), 16, 1),
             ((1, 64, 20, 20), (64, 64, 3, 3), 1, 1), ((1, 8, 30, 30), (16, 1, 3, 3), 8, 1)]
    for xs, ws, g, p in cases:
        x, wt, b = rand(rng, xs), rand(rng, ws, -0.3, 0.3), rand(rng, (ws[0],))
        for attrs in ({"group": g, "pads": [p] * 4}, {"group": g, "pads": [p] * 4,
                                                       "strides": [2, 2]}):
            check("Conv", {"x": x}, {"w": wt, "b": b}, attrs)


@pytest.mark.parametrize("xshape, cout", [
    ((1, 1024, 2, 2), 1024), ((1, 512, 1, 3), 300), ((4, 256, 1, 1), 257),  # <= 4 columns
    ((8, 64, 4, 4), 96), ((5, 128, 2, 3), 64), ((3, 32, 5, 5), 48),        # batched small images
    ((1, 512, 4, 4), 512), ((1, 64, 7, 9), 70), ((1, 40, 3, 5), 13),       # register tiles: wide,
    ((2, 24, 1, 7), 5), ((1, 256, 8, 8), 256),                              # overlapping, narrow,
])                                                                          # one column, < 6 rows
@pytest.mark.parametrize("act", ["PRelu", "Relu", ""])
def test_pointwise_fast_paths(xshape, cout, act):
    """The few-column, batched-images and register-tile pointwise kernels (every
    variant that applies) against ONNX Runtime's Conv+act."""
    rng = np.random.default_rng(cout)
    x, w = rand(rng, xshape), rand(rng, (cout, xshape[1], 1, 1), -0.1, 0.1)
    b, slope = rand(rng, (cout,)), rand(rng, (cout,), 0.0, 0.5)
    attrs = {"activation": act} if act else {}
    names = ["x", "w", "b"] + (["s"] if act == "PRelu" else [])
    consts = {"w": w, "b": b, "s": slope} if act == "PRelu" else {"w": w, "b": b}
    ours = run_qnrt("Conv", {"x": x}, consts, attrs, names)[0]
    variants = run_variants("Conv", {"x": x}, consts, attrs, names)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"])]
    inits = {"w": w, "b": b}
    if act == "PRelu":
        nodes.append(helper.make_node("PRelu", ["c", "s"], ["y"]))
        inits["s"] = slope.reshape(cout, 1, 1)
    elif act:
        nodes.append(helper.make_node(act, ["c"], ["y"]))
    else:
        nodes[0].output[0] = "y"
    ref = ort_run_nodes(nodes, {"x": x}, inits)[0]
    close(ours, ref)
    close_variants("Conv", variants, ref)


@pytest.mark.parametrize("xshape, wshape, group", [((1, 4, 9, 9), (6, 4, 3, 3), 1),
                                                   ((2, 8, 7, 7), (8, 1, 3, 3), 8),
                                                   ((1, 16, 5, 5), (24, 16, 1, 1), 1)])
def test_conv_fused_silu(xshape, wshape, group):
    """SiLU (x * sigmoid(x)) fused into each conv path, against ORT's Conv, Sigmoid, Mul."""
    rng = np.random.default_rng(wshape[0])
    x, w, b = rand(rng, xshape), rand(rng, wshape, -0.5, 0.5), rand(rng, (wshape[0],))
    attrs = {"group": group, "pads": [wshape[2] // 2] * 4}
    variants = run_variants("Conv", {"x": x}, {"w": w, "b": b}, {**attrs, "activation": "SiLU"})
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    close_variants("Conv", variants, ort_run_nodes(nodes, {"x": x}, {"w": w, "b": b})[0])


@pytest.mark.parametrize("width", [12, 17, 23, 24, 40])
def test_depthwise_widths(width):
    """Each width band of the 3x3 depthwise kernels (padded-plane, flat-loop, channels-last)."""
    rng = np.random.default_rng(width)
    x, w, b = rand(rng, (2, 6, width - 3, width)), rand(rng, (6, 1, 3, 3)), rand(rng, (6,))
    check("Conv", {"x": x}, {"w": w, "b": b}, {"group": 6, "pads": [1, 1, 1, 1]})


def test_conv_runtime_weights():
    """W, B and a fused PRelu slope may also arrive at run time (not consts)."""
    rng = np.random.default_rng(3)
    for xs, ws, g, p in [((1, 6, 5, 5), (4, 6, 1, 1), 1, 0), ((2, 6, 5, 7), (6, 1, 3, 3), 6, 1),
                         ((1, 6, 5, 5), (12, 1, 3, 3), 6, 1), ((1, 6, 6, 5), (4, 3, 2, 3), 2, 1)]:
        inputs = {"x": rand(rng, xs), "w": rand(rng, ws), "b": rand(rng, (ws[0],))}
        attrs = {"group": g, "pads": [p] * 4}
        ref = check("Conv", dict(inputs), attrs=attrs)
        slope = rand(rng, (ws[0],))
        prelu = np.where(ref >= 0, ref, ref * slope[:, None, None])
        for outs in run_variants("Conv", dict(inputs, s=slope),
                                 attrs=dict(attrs, activation="PRelu")).values():
            close(outs[0], prelu)


def test_conv_no_big_allocations():
    """run() allocates no activation-sized memory on any of the three paths."""
    rng = np.random.default_rng(0)
    for xs, ws, g, pads in [((1, 64, 64, 64), (64, 64, 1, 1), 1, 0),
                            ((1, 64, 64, 64), (64, 1, 3, 3), 64, 1),
                            ((1, 64, 64, 64), (64, 1, 3, 3), 64, 0),
                            ((1, 256, 8, 8), (256, 1, 3, 3), 256, 1),
                            ((1, 3, 64, 64), (6, 1, 3, 3), 3, 1),
                            ((1, 16, 64, 64), (32, 16, 3, 3), 1, 1),
                            ((2, 16, 64, 64), (32, 4, 3, 3), 4, 1)]:
        x, wt, b = rand(rng, xs), rand(rng, ws), rand(rng, (ws[0],))
        kernel, ins, out_shapes = prepare("Conv", {"x": x}, {"w": wt, "b": b},
                                          {"group": g, "pads": [pads] * 4, "activation": "Relu"})
        assert kernel.workspace <= 2 * 1024 * 1024
        outs = [np.empty(out_shapes[0], np.float32)]
        ws = np.empty(kernel.workspace, np.uint8)
        kernel.run(ins, outs, ws)  # compile
        tracemalloc.start()
        kernel.run(ins, outs, ws)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * 1024, (xs, ws, peak)


# --- pools ---------------------------------------------------------------------

@st.composite
def pool_cases(draw):
    op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    s = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    d = [draw(st.integers(1, 2)), draw(st.integers(1, 2))] if op == "MaxPool" else [1, 1]
    attrs = {"kernel_shape": k, "strides": s, "ceil_mode": draw(st.integers(0, 1))}
    if op == "MaxPool":
        attrs["dilations"] = d
    else:
        attrs["count_include_pad"] = draw(st.integers(0, 1))
    auto = draw(st.sampled_from(["NOTSET"] * 4 + ["VALID", "SAME_UPPER", "SAME_LOWER"]))
    if auto == "NOTSET":
        pads = [draw(st.integers(0, k[i % 2] - 1)) for i in range(4)]
        attrs["pads"] = pads
        assume(out_size(h, k[0], s[0], d[0], pads[0], pads[2]) >= 1)
        assume(out_size(w, k[1], s[1], d[1], pads[1], pads[3]) >= 1)
    else:
        attrs["auto_pad"] = auto
        attrs["ceil_mode"] = 0
        assume(h >= d[0] * (k[0] - 1) + 1 and w >= d[1] * (k[1] - 1) + 1)
        if auto != "VALID":  # ORT refuses negative SAME pads (we clamp them to 0) and
            # pads >= kernel (as we do); it ignores dilations when sizing SAME pads
            d = [1, 1]
            attrs.pop("dilations", None)
            need = [(-(-x // st_) - 1) * st_ + dd * (kk - 1) + 1 - x
                    for x, st_, dd, kk in zip((h, w), s, d, k)]
            assume(all(0 <= p < kk for p, kk in zip(need, k)))
    x = rand(np.random.default_rng(draw(seeds)), (n, c, h, w))
    return op, x, attrs


@settings(max_examples=60, deadline=None)
@given(pool_cases())
def test_pool(case):
    op, x, attrs = case
    check(op, {"x": x}, attrs=attrs)


def test_pool_quicknet_shapes():
    rng = np.random.default_rng(0)
    for shape in [(1, 8, 32, 32), (2, 3, 7, 9), (1, 4, 3, 5), (1, 16, 2, 2)]:
        x = rand(rng, shape)
        for ceil in (0, 1):
            for op in ("MaxPool", "AveragePool"):
                check(op, {"x": x}, attrs={"kernel_shape": [2, 2], "strides": [2, 2],
                                           "ceil_mode": ceil})
        check("MaxPool", {"x": x}, attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                          "pads": [1, 1, 1, 1]})


@SOME
@given(st.sampled_from(["GlobalAveragePool", "GlobalMaxPool"]),
       st.lists(st.integers(1, 6), min_size=3, max_size=5), seeds)
def test_global_pool(op, shape, seed):
    check(op, {"x": rand(np.random.default_rng(seed), shape)})


# --- elementwise -------------------------------------------------------------

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@FAST
@given(st.sampled_from([("Relu", {}), ("LeakyRelu", {}), ("LeakyRelu", {"alpha": 0.3}),
                        ("Sigmoid", {}), ("HardSigmoid", {}),
                        ("HardSigmoid", {"alpha": 0.4, "beta": 0.3}), ("HardSwish", {}),
                        ("Tanh", {})]), shapes, seeds)
def test_unary(act, shape, seed):
    op, attrs = act
    check(op, {"x": rand(np.random.default_rng(seed), shape, -8, 8)}, attrs=attrs)


@FAST
@given(shapes, st.booleans(), st.booleans(), seeds)
def test_clip(shape, has_min, has_max, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, -3, 3)
    lo, hi = np.float32(rng.uniform(-2, 0)), np.float32(rng.uniform(0, 2))
    consts = {k: v for k, v, use in (("lo", lo, has_min), ("hi", hi, has_max)) if use}
    names = ["x", "lo" if has_min else "", "hi" if has_max else ""]
    ours = check("Clip", {"x": x}, consts, names=names)
    # bounds arriving at run time
    close(run_qnrt("Clip", {"x": x, **consts}, names=names)[0], ours)
    # opset 6 form: bounds as attributes
    attrs = {k: float(v) for k, v, use in (("min", lo, has_min), ("max", hi, has_max)) if use}
    close(run_qnrt("Clip", {"x": x}, attrs=attrs)[0], ours)


@st.composite
def broadcast_pair(draw, max_rank=6):
    """(shape_a, shape_b) that broadcast multidirectionally."""
    out = draw(st.lists(st.integers(1, 4), min_size=0, max_size=max_rank))

    def operand():
        rank = draw(st.integers(0, len(out)))
        return tuple(1 if draw(st.booleans()) else d for d in out[len(out) - rank:])
    return operand(), operand()


@FAST
@given(st.sampled_from(["Add", "Sub", "Mul", "Div"]), broadcast_pair(),
       st.sampled_from(["none", "a", "b"]), seeds)
def test_binary(op, pair, const, seed):
    rng = np.random.default_rng(seed)
    a, b = rand(rng, pair[0]), rand(rng, pair[1])
    if op == "Div":
        b = np.where(np.abs(b) < 0.1, 0.5, b).astype(np.float32)
    inputs = {"a": a, "b": b}
    consts = {k: inputs.pop(k) for k in ([const] if const != "none" else [])}
    check(op, inputs, consts, names=["a", "b"])


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.data())
def test_prelu(xshape, data):
    """Slope broadcast unidirectionally to X; slope const or run-time."""
    rank = data.draw(st.integers(0, len(xshape)))
    sshape = tuple(1 if data.draw(st.booleans()) else d for d in xshape[len(xshape) - rank:])
    rng = np.random.default_rng(data.draw(seeds))
    x, slope = rand(rng, xshape), rand(rng, sshape, -1, 1)
    if data.draw(st.booleans()):
        check("PRelu", {"x": x}, {"slope": slope})
    else:
        check("PRelu", {"x": x, "slope": slope})


def test_inplace_elementwise():
    """Ops marked inplace give the same result when the output is input 0."""
    rng = np.random.default_rng(1)
    x = rand(rng, (2, 3, 4, 5))
    for op, consts in [("Relu", {}), ("Sigmoid", {}), ("Add", {"b": rand(rng, (3, 1, 1))}),
                       ("PRelu", {"s": rand(rng, (3, 1, 1))}),
                       ("BatchNormalization", {k: rand(rng, (3,), 0.5, 1.5) for k in "sbmv"})]:
        assert get_op(op).inplace
        want = run_qnrt(op, {"x": x.copy()}, consts)[0]
        kernel, ins, _ = prepare(op, {"x": x.copy()}, consts)
        kernel.run(ins, [ins[0]], None)
        np.testing.assert_array_equal(ins[0], want)


@SOME
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4), seeds)
def test_batchnorm(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    consts = {"s": rand(rng, (c,)), "b": rand(rng, (c,)), "m": rand(rng, (c,)),
              "v": rand(rng, (c,), 0.1, 2)}
    check("BatchNormalization", {"x": rand(rng, shape)}, consts, {"epsilon": 1e-3})


# --- linear algebra ------------------------------------------------------------

@FAST
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(),
       st.sampled_from([None, "N", "1N", "M1", "MN", "scalar"]), st.booleans(),
       st.sampled_from([1.0, 0.5]), st.sampled_from([1.0, 2.0, 0.0]), seeds)
def test_gemm(m, k, n, ta, tb, cshape, c_const, alpha, beta, seed):
    rng = np.random.default_rng(seed)
    a = rand(rng, (k, m) if ta else (m, k))
    b = rand(rng, (n, k) if tb else (k, n))
    inputs, consts = {"a": a}, {"b": b}
    if cshape:
        shape = {"N": (n,), "1N": (1, n), "M1": (m, 1), "MN": (m, n), "scalar": ()}[cshape]
        (consts if c_const else inputs)["c"] = rand(rng, shape)
    names = ["a", "b"] + (["c"] if cshape else [])
    check("Gemm", inputs, consts, {"transA": int(ta), "transB": int(tb), "alpha": alpha,
                                   "beta": beta}, names)


@FAST
@given(st.lists(st.integers(1, 3), max_size=3), st.lists(st.integers(1, 3), max_size=3),
       st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.booleans(), st.booleans(),
       st.booleans(), seeds)
def test_matmul(batch_a, batch_b, m, k, n, vec_a, vec_b, b_const, seed):
    rng = np.random.default_rng(seed)
    # make the batch dims broadcast: align right, replace clashes by 1
    la, lb = len(batch_a), len(batch_b)
    batch_b = [1 if i >= lb - la and batch_a[i - (lb - la)] != d else d
               for i, d in enumerate(batch_b)] if lb >= la else batch_b
    batch_a = [1 if i >= la - lb and batch_b[i - (la - lb)] != d else d
               for i, d in enumerate(batch_a)] if la > lb else batch_a
    a = rand(rng, (k,) if vec_a else (*batch_a, m, k))
    b = rand(rng, (k,) if vec_b else (*batch_b, k, n))
    inputs = {"a": a, "b": b}
    consts = {"b": inputs.pop("b")} if b_const else {}
    check("MatMul", inputs, consts, names=["a", "b"])


# --- softmax, layout ---------------------------------------------------------------

@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_softmax(shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape, -5, 5)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    if data.draw(st.booleans()):
        check("Softmax", {"x": x}, attrs={"axis": axis})
    else:  # opset < 13: flatten to 2-D at axis
        ours = run_qnrt("Softmax", {"x": x}, attrs={"axis": axis, "legacy_axis_semantics": True})
        close(ours[0], one_node("Softmax", {"x": x}, attrs={"axis": axis}, opset=11)[0])


def test_softmax_defaults():
    x = rand(np.random.default_rng(0), (2, 3, 4))
    check("Softmax", {"x": x})
    ours = run_qnrt("Softmax", {"x": x}, attrs={"legacy_axis_semantics": True})[0]
    close(ours, one_node("Softmax", {"x": x}, opset=11)[0])


@FAST
@given(st.lists(st.integers(1, 4), min_size=0, max_size=6), st.data())
def test_transpose(shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape)
    attrs = {}
    if shape and data.draw(st.booleans()):
        attrs["perm"] = data.draw(st.permutations(range(len(shape))))
    if data.draw(st.booleans()):
        check("Transpose", {"x": x}, attrs=attrs)
    else:
        check("Transpose", {}, {"x": x}, attrs=attrs)


def test_transpose_larger():
    """Shapes big enough for the blocked (8-line strip) transpose loop."""
    rng = np.random.default_rng(0)
    for shape in [(1, 16, 9, 13), (3, 20, 9), (2, 3, 17, 4, 5)]:
        x = rand(rng, shape)
        for perm in itertools.islice(itertools.permutations(range(len(shape))), 30):
            check("Transpose", {"x": x}, attrs={"perm": list(perm)})


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_concat(shape, data):
    rng = np.random.default_rng(data.draw(seeds))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    k = data.draw(st.integers(1, 3))
    xs = {}
    for i in range(k):
        s = list(shape)
        s[axis] = data.draw(st.integers(1, 3))
        xs[f"x{i}"] = rand(rng, s)
    const = data.draw(st.sampled_from([None] + list(xs)))
    consts = {const: xs.pop(const)} if const else {}
    check("Concat", xs, consts, {"axis": axis}, names=[f"x{i}" for i in range(k)])


def check_alias(op, x, consts=None, attrs=None, names=None, opset=17, ref_attrs=None):
    """Alias ops: correct both when the planner aliased (out views in) and not."""
    ours = check(op, {"x": x}, consts, attrs, names, opset=opset, ref_attrs=ref_attrs)
    kernel, ins, out_shapes = prepare(op, {"x": x.copy()}, consts, attrs, names)
    out = ins[0].reshape(out_shapes[0])
    kernel.run(ins, [out], None)
    np.testing.assert_array_equal(out, ours)


@FAST
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_reshape(shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape)
    perm = data.draw(st.permutations(shape))  # same element count
    target = [d if data.draw(st.booleans()) else 0 if i < len(shape) and shape[i] == d else d
              for i, d in enumerate(perm)]
    if data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    check_alias("Reshape", x, {"shape": np.array(target, np.int64)}, names=["x", "shape"])


def test_reshape_allowzero():
    x = np.zeros((0, 3), np.float32)
    ours = run_qnrt("Reshape", {"x": x}, {"shape": np.array([3, 0], np.int64)},
                    {"allowzero": 1}, ["x", "shape"])[0]
    assert ours.shape == (3, 0)


@SOME
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_flatten(shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape)
    axis = data.draw(st.integers(-len(shape), len(shape)))
    check_alias("Flatten", x, attrs={"axis": axis})


@SOME
@given(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=1, max_size=5), st.data())
def test_squeeze_unsqueeze(shape, data):
    x = rand(np.random.default_rng(data.draw(seeds)), shape)
    ones = [i for i, d in enumerate(shape) if d == 1]
    axes = data.draw(st.lists(st.sampled_from(ones), unique=True)) if ones else []
    axes = [a - len(shape) if data.draw(st.booleans()) else a for a in axes]
    if axes:
        check_alias("Squeeze", x, {"axes": np.array(axes, np.int64)}, names=["x", "axes"])
        check_alias("Squeeze", x, attrs={"axes": axes}, opset=11)
    else:
        check_alias("Squeeze", x)
    rank = len(shape) + data.draw(st.integers(1, 2))
    ua = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=rank - len(shape),
                            max_size=rank - len(shape), unique_by=lambda a: a % rank))
    check_alias("Unsqueeze", x, {"axes": np.array(ua, np.int64)}, names=["x", "axes"])


def test_identity_dropout():
    x = rand(np.random.default_rng(0), (2, 3, 4))
    check_alias("Identity", x)
    check_alias("Dropout", x, attrs={"ratio": 0.5}, ref_attrs={}, opset=17)
    assert get_op("Dropout").alias and get_op("Reshape").alias


# --- refusals --------------------------------------------------------------------

def raises(op, inputs, consts=None, attrs=None, names=None, match=None):
    with pytest.raises(GraphError, match=match or "under_test"):
        run_qnrt(op, inputs, consts, attrs, names)


def test_bad_graphs_raise_named_errors():
    x4, w = np.zeros((1, 4, 5, 5), np.float32), np.zeros((6, 2, 3, 3), np.float32)
    raises("Conv", {"x": x4}, {"w": np.zeros((6, 4, 3, 3), np.float32)}, {"group": 3})
    raises("Conv", {"x": x4}, {"w": np.zeros((5, 2, 3, 3), np.float32)}, {"group": 2})
    raises("Conv", {"x": x4}, {"w": np.zeros((6, 3, 3, 3), np.float32)}, {"group": 2})
    raises("Conv", {"x": x4}, {"w": w}, {"group": 2, "auto_pad": "SAME_MIDDLE"}, match="auto_pad")
    raises("Conv", {"x": x4}, {"w": w}, {"group": 2, "kernel_shape": [2, 2]})
    raises("Conv", {"x": x4}, {"w": w}, {"group": 2, "pads": [1, 1, -1, 0]})
    raises("Conv", {"x": x4}, {"w": w}, {"group": 2, "strides": [0, 1]})
    raises("Conv", {"x": x4}, {"w": w, "b": np.zeros(5, np.float32)}, {"group": 2})
    raises("Conv", {"x": x4}, {"w": w}, {"group": 2, "activation": "Swish"})
    raises("Conv", {"x": x4}, {"w": w}, {"group": 2, "activation": "PRelu"})
    raises("Conv", {"x": np.zeros((1, 4, 5), np.float32)}, {"w": np.zeros((6, 4, 3), np.float32)})
    raises("Conv", {"x": np.zeros((1, 4, 2, 2), np.float32)}, {"w": np.zeros((6, 4, 3, 3),
                                                                             np.float32)})
    raises("MaxPool", {"x": x4}, attrs={"kernel_shape": [2, 2], "pads": [2, 0, 0, 0]})
    raises("MaxPool", {"x": x4}, attrs={})
    raises("AveragePool", {"x": x4}, attrs={"kernel_shape": [2, 2], "auto_pad": "FOO"})
    raises("Add", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((4,), np.float32)})
    raises("PRelu", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 1, 3), np.float32)})
    raises("MatMul", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.float32)})
    raises("Gemm", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.float32)})
    raises("Concat", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)},
           attrs={"axis": 1})
    raises("Softmax", {"x": np.zeros((2, 3), np.float32)}, attrs={"axis": 2})
    raises("Transpose", {"x": np.zeros((2, 3), np.float32)}, attrs={"perm": [0, 0]})
    raises("Reshape", {"x": np.zeros((2, 3), np.float32)}, {"s": np.array([4, -1], np.int64)})
    raises("Reshape", {"x": np.zeros((2, 3), np.float32),
                       "s": np.array([3, 2], np.int64)})  # run-time shape
    raises("Squeeze", {"x": np.zeros((2, 3), np.float32)}, {"a": np.array([0], np.int64)})
    raises("BatchNormalization", {"x": x4}, {k: np.ones(3, np.float32) for k in "sbmv"})


def test_registry_covers_the_brief():
    want = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu",
            "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add",
            "Mul", "Sub", "Div", "BatchNormalization", "Gemm", "MatMul", "Softmax",
            "Transpose", "Concat", "Reshape", "Flatten", "Identity", "Dropout", "Squeeze",
            "Unsqueeze"}
    assert want <= set(supported_ops())


def test_op_module_table_matches_registrations():
    """get_op imports only the file OP_MODULES names: the table must be exact."""
    from qnrt.ops import OP_MODULES, REGISTRY

    all_variants()  # imports every kernel file
    for module, ops in OP_MODULES.items():
        for op in ops:
            where = REGISTRY[op].reference.build.__module__
            assert where == f"qnrt.ops.{module}" or where.startswith(f"qnrt.ops.{module}."), op
    assert sorted(REGISTRY) == sorted(op for ops in OP_MODULES.values() for op in ops)


@pytest.mark.parametrize("op, names", [("Div", ["a", "b"]), ("Reciprocal", ["b"]),
                                       ("Pow", ["b", "e"])])
def test_division_by_zero_gives_ieee_inf_and_nan(op, names):
    """x / 0 is inf, -inf or NaN in every variant, as in NumPy and ONNX Runtime
    (not a ZeroDivisionError from inside a kernel)."""
    values = {"a": np.array([1, -1, 0, 2], np.float32), "b": np.array([0, 0, 0, 1], np.float32)}
    inputs = {k: values[k] for k in names if k in values}
    consts = {"e": np.array(-1, np.float32)} if op == "Pow" else None
    with np.errstate(all="ignore"):
        want = {"Div": values["a"] / values["b"], "Reciprocal": 1 / values["b"],
                "Pow": values["b"] ** np.float32(-1)}[op]
    results = run_variants(op, inputs, consts, names=names)
    assert len(results) >= 2
    for name, (got,) in results.items():
        np.testing.assert_array_equal(got, want, err_msg=name)
