"""IEEE float semantics in every op and every kernel variant: inputs holding
zeros of both signs, infinities and NaNs give what ONNX Runtime gives (NaN
where it has NaN, inf of the same sign where it has inf, the finite values
close), and no kernel raises (Numba's error_model is "numpy"). SiLU, which
is not an ONNX op, is checked against NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close, one_node
from test_ops import run_variants
from test_ops_extra import multi_variants, run_multi

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.5, -2.5, 0.25, -0.75, 3.0],
                   np.float32)


def special(shape, seed=0, values=SPECIAL):
    """An array of `shape` drawn from `values`, every value present when it fits."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    flat = np.resize(values, n)
    rng.shuffle(flat)
    return flat.reshape(shape).astype(np.float32)


def weights(shape, seed=1):
    """Finite weights with exact zeros among them (0 x inf must stay NaN)."""
    w = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    w.reshape(-1)[::5] = 0
    return w


def assert_ieee(ours, ref, what):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=f"{what}: NaNs")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref), err_msg=f"{what}: +inf")
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg=f"{what}: -inf")
    finite = np.isfinite(ref)
    assert_close(ours[finite], ref[finite])


X4 = (1, 4, 6, 6)
CASES = {  # name: (op, inputs, constants, attrs, input names)
    "conv_pointwise": ("Conv", {"x": special(X4)}, {"w": weights((3, 4, 1, 1))}, {}, None),
    "conv_pointwise_wide": ("Conv", {"x": special((1, 8, 16, 40))},
                            {"w": weights((16, 8, 1, 1))}, {}, None),
    "conv_depthwise3x3": ("Conv", {"x": special(X4)}, {"w": weights((4, 1, 3, 3))},
                          {"group": 4, "pads": [1, 1, 1, 1]}, None),
    "conv_depthwise3x3_wide": ("Conv", {"x": special((1, 4, 8, 30))},
                               {"w": weights((4, 1, 3, 3))}, {"group": 4, "pads": [1, 1, 1, 1]},
                               None),
    "conv_depthwise_strided": ("Conv", {"x": special(X4)}, {"w": weights((4, 1, 3, 3))},
                               {"group": 4, "strides": [2, 2], "pads": [1, 0, 1, 0]}, None),
    "conv_dense_bias": ("Conv", {"x": special(X4)},
                        {"w": weights((2, 4, 3, 3)), "b": weights((2,), 3)},
                        {"pads": [1, 1, 1, 1], "dilations": [1, 2]}, None),
    "conv_grouped": ("Conv", {"x": special(X4)}, {"w": weights((4, 2, 2, 2))}, {"group": 2},
                     None),
    "conv_transpose": ("ConvTranspose", {"x": special(X4)}, {"w": weights((4, 2, 3, 3))},
                       {"strides": [2, 2]}, None),
    "maxpool_2x2": ("MaxPool", {"x": special(X4)}, {}, {"kernel_shape": [2, 2],
                                                       "strides": [2, 2]}, None),
    "maxpool_3x3_pad": ("MaxPool", {"x": special(X4)}, {}, {"kernel_shape": [3, 3],
                                                           "pads": [1, 1, 1, 1]}, None),
    "averagepool": ("AveragePool", {"x": special(X4)}, {},
                    {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [1, 0, 1, 0],
                     "count_include_pad": 1}, None),
    "global_average": ("GlobalAveragePool", {"x": special(X4)}, {}, {}, None),
    "global_max": ("GlobalMaxPool", {"x": special(X4)}, {}, {}, None),
    "batchnorm": ("BatchNormalization", {"x": special(X4)},
                  {"s": weights((4,), 4), "b": weights((4,), 5), "m": weights((4,), 6),
                   "v": np.abs(weights((4,), 7)) + 0.5}, {}, None),
    "gemm": ("Gemm", {"x": special((3, 8))}, {"w": weights((8, 5)), "c": weights((5,), 2)},
             {"alpha": 0.5, "beta": 2.0}, None),
    "matmul": ("MatMul", {"x": special((2, 3, 8))}, {"w": weights((8, 4))}, {}, None),
    "softmax": ("Softmax", {"x": special((4, 10))}, {}, {"axis": -1}, None),
    "softmax_finite_rows": ("Softmax", {"x": special((3, 10), values=np.array(
        [0, -0.0, 80, -80, 1.5], np.float32))}, {}, {"axis": 1}, None),
    "transpose": ("Transpose", {"x": special(X4)}, {}, {"perm": [0, 2, 3, 1]}, None),
    "concat": ("Concat", {"x": special(X4), "z": special(X4, 2)}, {}, {"axis": 1}, None),
    "flatten": ("Flatten", {"x": special(X4)}, {}, {"axis": 1}, None),
    "identity": ("Identity", {"x": special(X4)}, {}, {}, None),
    "reshape": ("Reshape", {"x": special(X4)}, {"shape": np.array([1, -1], np.int64)}, {},
                None),
    "squeeze": ("Squeeze", {"x": special((1, 4, 1, 6))}, {"axes": np.array([2], np.int64)},
                {}, None),
    "unsqueeze": ("Unsqueeze", {"x": special(X4)}, {"axes": np.array([0], np.int64)}, {},
                  None),
    "pad_constant": ("Pad", {"x": special(X4)},
                     {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, {}, None),
    "pad_reflect": ("Pad", {"x": special(X4)},
                    {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, {"mode": "reflect"},
                    None),
    "resize_nearest": ("Resize", {"x": special(X4)},
                       {"scales": np.array([1, 1, 2, 1.5], np.float32)}, {},
                       ["x", "", "scales"]),
    "resize_linear": ("Resize", {"x": special(X4)},
                      {"scales": np.array([1, 1, 2, 1.5], np.float32)}, {"mode": "linear"},
                      ["x", "", "scales"]),
    "slice": ("Slice", {"x": special(X4)},
              {"st": np.array([1, 0], np.int64), "en": np.array([5, 6], np.int64),
               "ax": np.array([2, 3], np.int64), "sp": np.array([2, 1], np.int64)}, {}, None),
    "prelu": ("PRelu", {"x": special(X4)}, {"slope": weights((4, 1, 1))}, {}, None),
    "clip": ("Clip", {"x": special(X4)}, {"lo": np.float32(-1), "hi": np.float32(2)}, {},
             None),
    "pow_scalar": ("Pow", {"x": special(X4)}, {"p": np.array(2.0, np.float32)}, {}, None),
    "pow_tensor": ("Pow", {"x": special(X4)}, {"p": special((6,), 3)}, {}, None),
    "dropout": ("Dropout", {"x": special(X4)}, {}, {}, None),
}
UNARY = ["Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Abs", "Exp",
         "Log", "Neg", "Reciprocal", "Sqrt"]
BINARY = ["Add", "Sub", "Mul", "Div"]
REDUCE = ["ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum"]
for op in UNARY:
    CASES[op.lower()] = (op, {"x": special(X4)}, {}, {}, None)
for op in BINARY:
    CASES[op.lower()] = (op, {"x": special(X4), "z": special(X4, 5)}, {}, {}, None)
    CASES[op.lower() + "_broadcast"] = (op, {"x": special(X4)}, {"k": special((4, 1, 1), 6)}, {},
                                        None)
for op in REDUCE:
    CASES[op.lower()] = (op, {"x": special(X4)}, {}, {"axes": [2, 3], "keepdims": 1}, None)


# ONNX leaves NaN in a max or min unspecified, and ONNX Runtime's answer depends
# on where the NaN sits in the window; qnrt's is NaN, as np.maximum's (IEEE 754
# maximum): ONNX Runtime's answer with the NaNs made harmless, and NaN wherever
# a window held one (found by running the op on a NaN indicator)
NAN_PROPAGATING = {"MaxPool": "MaxPool", "GlobalMaxPool": "GlobalMaxPool",
                   "ReduceMax": "ReduceMax", "ReduceMin": "ReduceMax"}


def onnx_answer(op, inputs, consts, attrs, names, opset, n_out):
    if op not in NAN_PROPAGATING:
        return one_node(op, inputs, consts, attrs, names, opset=opset, n_outputs=n_out)
    x = inputs["x"]
    harmless = np.where(np.isnan(x), np.float32(-np.inf if op != "ReduceMin" else np.inf), x)
    ref = one_node(op, {"x": harmless}, consts, attrs, names, opset=opset)[0]
    held = one_node(NAN_PROPAGATING[op], {"x": np.isnan(x).astype(np.float32)}, consts, attrs,
                    names, opset=opset)[0]
    return [np.where(held > 0, np.float32(np.nan), ref)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_variant_follows_ieee_like_onnx_runtime(case):
    op, inputs, consts, attrs, names = CASES[case]
    opset = 11 if op.startswith("Reduce") else 17  # axes as an attribute
    ref = onnx_answer(op, inputs, consts, attrs, names, opset, 1)
    results = run_variants(op, inputs, consts, attrs, names)
    assert results, case
    for variant, outs in results.items():
        for k, (ours, expected) in enumerate(zip(outs, ref)):
            assert_ieee(ours, expected, f"{case}: {variant} output {k}")


def test_silu_follows_ieee_like_numpy():
    x = special(X4)
    with np.errstate(all="ignore"):
        expected = x / (np.float32(1) + np.exp(-x))
    for variant, outs in run_variants("SiLU", {"x": x}).items():
        assert_ieee(outs[0], expected, f"SiLU: {variant}")


def test_split_follows_ieee_like_onnx_runtime():
    x, consts, names = special(X4), {"split": np.array([1, 3], np.int64)}, ["x", "split"]
    ref = one_node("Split", {"x": x}, consts, {"axis": 1}, names, n_outputs=2)
    for variant in multi_variants("Split", {"x": x}, consts, {"axis": 1}, names, 2):
        for k, (ours, expected) in enumerate(zip(
                run_multi("Split", {"x": x}, consts, {"axis": 1}, names, 2, variant), ref)):
            assert_ieee(ours, expected, f"Split: {variant} output {k}")
