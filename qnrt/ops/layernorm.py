"""LayerNormalization (ONNX opset 17): normalize over the axes from `axis` to
the last, y = (x - mean) / sqrt(var + epsilon) * scale + bias, var the biased
variance. Scale and bias broadcast to the normalized shape (trailing-aligned,
as ONNX Runtime allows); the optional Mean and InvStdDev outputs (training
only) are not produced. The exporters' clean-up fuses the spelled-out form
(ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) into this op.

Variants: layernorm.rows (one pass for the mean, one for the variance, one
to write, float64 sums, per row of the normalized size), layernorm.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import const_of, fail, has_input, njit, norm_axis, numba_const


def _axis(node, rank):
    if rank < 1:
        fail(node, "input must have rank >= 1")
    return norm_axis(node, int(node.attrs.get("axis", -1)), rank)


def infer(node, in_shapes, consts):
    if len(in_shapes) < 2 or in_shapes[0] is None or in_shapes[1] is None:
        fail(node, "needs an input and a scale")
    if len(node.outputs) > 1:
        fail(node, "the Mean and InvStdDev outputs (training) are not supported")
    x = tuple(in_shapes[0])
    axis = _axis(node, len(x))
    norm = x[axis:]
    for k, name in ((1, "scale"), (2, "bias")):
        s = in_shapes[k] if len(in_shapes) > k else None
        if s is None:
            continue
        s = tuple(s)
        if len(s) > len(norm) or any(a not in (1, b) for a, b in zip(s[::-1], norm[::-1])):
            fail(node, f"{name} {s} does not broadcast to the normalized shape {norm}")
    return [x]


@dataclass(frozen=True, eq=False)
class LayerNormSpec:
    x: tuple
    rows: int  # number of normalized rows
    size: int  # elements per row (the normalized shape's size)
    norm: tuple  # the normalized shape
    epsilon: float
    cscale: np.ndarray | None  # const scale / bias broadcast to (size,), float32
    cbias: np.ndarray | None
    scale_shape: tuple
    bias_shape: tuple | None  # None: no bias


def analyse(node, in_shapes, out_shapes, consts):
    x = tuple(int(d) for d in infer(node, in_shapes, consts)[0])
    if tuple(out_shapes[0]) != x:
        fail(node, f"output shape {out_shapes[0]} != {x}")
    axis = _axis(node, len(x))
    norm = x[axis:]
    size = int(np.prod(norm))
    if size < 1:
        fail(node, f"normalizing over the empty shape {norm}")
    epsilon = float(node.attrs.get("epsilon", 1e-5))

    def flat(k):
        c = const_of(node, k, consts)
        if c is None:
            return None
        return numba_const(np.broadcast_to(np.asarray(c, np.float32), norm)).reshape(-1)

    bias = has_input(node, 2)
    return LayerNormSpec(x, int(np.prod(x[:axis])), size, norm, epsilon, flat(1),
                         flat(2) if bias else None, tuple(in_shapes[1]),
                         tuple(in_shapes[2]) if bias else None)


def _full(v, shape, norm):
    """A run-time scale/bias (of `shape`) as (size,) float32: a free reshape when it
    already has the normalized size, else a broadcast copy."""
    if int(np.prod(shape)) == int(np.prod(norm)):
        return v.reshape(-1)
    return np.ascontiguousarray(np.broadcast_to(v.reshape(shape), norm)).reshape(-1)


def _build_rows(s: LayerNormSpec) -> Kernel:
    rows, size, eps, norm = s.rows, s.size, s.epsilon, s.norm
    cscale, cbias, has_bias = s.cscale, s.cbias, s.bias_shape is not None
    zero = np.zeros(size, np.float32)

    def run(ins, outs, workspace):
        scale = cscale if cscale is not None else _full(ins[1], s.scale_shape, norm)
        if not has_bias:
            bias = zero
        else:
            bias = cbias if cbias is not None else _full(ins[2], s.bias_shape, norm)
        _layer_norm(ins[0].reshape(rows, size), outs[0].reshape(rows, size), scale, bias, eps)
    return Kernel(run)


@njit(cache=True)
def _layer_norm(x, y, scale, bias, eps):
    """Each row of x normalized into y (y may be x: a row is read before it is
    written): float64 mean and biased variance, then one float32 pass."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        row, out = x[r], y[r]
        acc = 0.0
        for j in range(n):
            acc += row[j]
        mean = acc / n
        acc = 0.0
        for j in range(n):
            d = row[j] - mean
            acc += d * d
        inv = np.float32(1.0 / np.sqrt(acc / n + eps))
        m = np.float32(mean)
        for j in range(n):
            out[j] = (row[j] - m) * inv * scale[j] + bias[j]


def _build_reference(s: LayerNormSpec) -> Kernel:
    """ONNX's definition in float64: mean and variance over the trailing axes,
    (x - mean) / sqrt(var + epsilon) * scale + bias, rounded to float32."""
    axes = tuple(range(len(s.x) - len(s.norm), len(s.x)))

    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float64).reshape(s.x)
        scale = np.asarray(ins[1], np.float64)
        bias = np.asarray(ins[2], np.float64) if s.bias_shape is not None else 0.0
        with np.errstate(all="ignore"):
            mean = x.mean(axis=axes, keepdims=True)
            var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
            y = (x - mean) / np.sqrt(var + s.epsilon) * scale + bias
        outs[0][...] = y.astype(np.float32)
    return Kernel(run)


register("LayerNormalization", infer, [
    Variant("layernorm.rows", _build_rows),
    Variant("layernorm.reference", _build_reference),
], analyse=analyse, inplace=True)
