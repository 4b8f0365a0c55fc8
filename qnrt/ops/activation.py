"""Elementwise activations: Relu, LeakyRelu, PRelu, Clip, Sigmoid,
HardSigmoid, HardSwish, Tanh, SiLU (all may run in place).

SiLU (x * sigmoid(x), our IR name; ONNX spells it Sigmoid + Mul) has its own
kernel: it is not in ACT_CODES, so Conv cannot fuse it yet."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import (ACT_CODES, activation_params, bcast_strides, binary6, broadcast_shapes,
                      c_strides, coalesce, const_of, fail, has_input, njit, numba_const, unary)


def infer(node, in_shapes, consts):
    x = in_shapes[0]
    if x is None:
        fail(node, "needs an input")
    if node.op == "PRelu":
        if len(in_shapes) < 2 or in_shapes[1] is None:
            fail(node, "needs a slope input")
        if broadcast_shapes(node, x, in_shapes[1]) != tuple(x):
            fail(node, f"slope {in_shapes[1]} does not broadcast to the input {x}")
    return [tuple(x)]


def _clip_bound(node, i, consts, default):
    """Clip's min/max: a const input (opset 11+), an attr (older), or None when
    it comes at run time."""
    if has_input(node, i):
        c = const_of(node, i, consts)
        return None if c is None else float(np.asarray(c).reshape(-1)[0])
    return float(node.attrs.get("min" if i == 1 else "max", default))


def prepare(node, in_shapes, out_shapes, consts):
    x = infer(node, in_shapes, consts)[0]
    if node.op == "PRelu":
        return _prepare_prelu(node, in_shapes, consts)
    if node.op == "SiLU":
        return _prepare_silu(node, x, consts)
    code = ACT_CODES[node.op]
    if node.op == "Clip":
        lo = _clip_bound(node, 1, consts, -np.inf)
        hi = _clip_bound(node, 2, consts, np.inf)

        def run(ins, outs, workspace):  # bounds given at run time are read here
            a = lo if lo is not None else float(ins[1].reshape(-1)[0])
            b = hi if hi is not None else float(ins[2].reshape(-1)[0])
            unary(ins[0].reshape(-1), outs[0].reshape(-1), code, a, b)
        return Kernel(run)
    a, b = activation_params(node.op, node.attrs.get("alpha"), node.attrs.get("beta"))
    size = int(np.prod(x))

    def run(ins, outs, workspace):
        unary(ins[0].reshape(size), outs[0].reshape(size), code, a, b)
    return Kernel(run)


def _prepare_prelu(node, in_shapes, consts):
    x, s = tuple(in_shapes[0]), tuple(in_shapes[1])
    if len(x) > 6:
        fail(node, f"rank {len(x)} > 6 is not supported")
    dims = coalesce(x, c_strides(x), bcast_strides(s, x))
    shape, sa, sb = dims
    slope = const_of(node, 1, consts)
    slope = numba_const(slope).reshape(-1) if slope is not None else None
    size = int(np.prod(x))

    def run(ins, outs, workspace):
        sl = slope if slope is not None else ins[1].reshape(-1)
        binary6(ins[0].reshape(size), sa, sl, sb, outs[0].reshape(size), shape, 4)
    return Kernel(run)


def _prepare_silu(node, x, consts):
    size = int(np.prod(x))
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None

    def run(ins, outs, workspace):
        _silu(cx if cx is not None else ins[0].reshape(size), outs[0].reshape(size))
    return Kernel(run)


@njit(cache=True)
def _silu(x, y):
    """y = x * sigmoid(x) = x / (1 + exp(-x)) over flat arrays (y may be x)."""
    one = np.float32(1)
    for i in range(x.size):
        v = x[i]
        y[i] = v / (one + np.exp(-v))


register(["Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
          "SiLU"], infer, prepare, inplace=True)
