"""Elementwise math: Sqrt, Exp, Log, Abs, Neg, Reciprocal (unary) and Pow
(numpy broadcasting, rank <= 6; the exponent a const or a run-time tensor).
All may run in place. IEEE results outside the domain (Sqrt/Log of negatives,
Pow of a negative base to a non-integer power) are NaN, as in onnxruntime."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import (bcast_strides, broadcast_shapes, c_strides, coalesce, const_of, fail,
                      njit, numba_const)

UNARY = {"Sqrt": 0, "Exp": 1, "Log": 2, "Abs": 3, "Neg": 4, "Reciprocal": 5}
# Pow with a scalar const exponent: x*x, x*x*x, sqrt(x), 1/x, x, 1 skip powf
POW_SPECIAL = {2.0: 1, 3.0: 2, 0.5: 3, -1.0: 4, 1.0: 5, 0.0: 6}


def infer(node, in_shapes, consts):
    if node.op == "Pow":
        if len(in_shapes) != 2 or None in in_shapes:
            fail(node, "needs two inputs")
        return [broadcast_shapes(node, *in_shapes)]
    if not in_shapes or in_shapes[0] is None:
        fail(node, "needs an input")
    return [tuple(in_shapes[0])]


def prepare(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    size = int(np.prod(y))
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    if node.op == "Pow":
        return _prepare_pow(node, in_shapes, y, consts, cx)
    code = UNARY[node.op]

    def run(ins, outs, workspace):
        _unary_math(cx if cx is not None else ins[0].reshape(size), outs[0].reshape(size), code)
    return Kernel(run)


def _prepare_pow(node, in_shapes, y, consts, cx):
    size = int(np.prod(y))
    ce = const_of(node, 1, consts)
    if ce is not None and np.asarray(ce).dtype.kind not in "fiub":
        fail(node, f"exponent dtype {np.asarray(ce).dtype} is not supported")
    ce = numba_const(ce).reshape(-1) if ce is not None else None
    if ce is not None and ce.size == 1 and tuple(in_shapes[0]) == y:
        e = float(ce[0])
        mode = POW_SPECIAL.get(e, 0)

        def run(ins, outs, workspace):
            _pow_scalar(cx if cx is not None else ins[0].reshape(size), outs[0].reshape(size),
                        np.float32(e), mode)
        return Kernel(run)
    dims = coalesce(y, c_strides(y), bcast_strides(in_shapes[0], y),
                    bcast_strides(in_shapes[1], y))
    if dims is None:
        fail(node, f"broadcasting {in_shapes} needs more than 6 dims")
    shape, _, sa, sb = dims

    def run(ins, outs, workspace):
        a = cx if cx is not None else ins[0].reshape(-1)
        b = ce if ce is not None else ins[1].reshape(-1)
        _pow6(a, sa, b, sb, outs[0].reshape(size), shape)
    return Kernel(run)


@njit(cache=True)
def _unary_math(x, y, code):
    """y = f(x) over flat arrays (y may be x); one loop per op so each vectorizes."""
    one = np.float32(1)
    if code == 0:
        for i in range(x.size):
            y[i] = np.sqrt(x[i])
    elif code == 1:
        for i in range(x.size):
            y[i] = np.exp(x[i])
    elif code == 2:
        for i in range(x.size):
            y[i] = np.log(x[i])
    elif code == 3:
        for i in range(x.size):
            y[i] = abs(x[i])
    elif code == 4:
        for i in range(x.size):
            y[i] = -x[i]
    else:
        for i in range(x.size):
            y[i] = one / x[i]


@njit(cache=True)
def _pow_scalar(x, y, e, mode):
    """y = x ** e for one exponent (y may be x)."""
    if mode == 1:
        for i in range(x.size):
            y[i] = x[i] * x[i]
    elif mode == 2:
        for i in range(x.size):
            y[i] = x[i] * x[i] * x[i]
    elif mode == 3:
        for i in range(x.size):
            y[i] = np.sqrt(x[i])
    elif mode == 4:
        for i in range(x.size):
            y[i] = np.float32(1) / x[i]
    elif mode == 5:
        for i in range(x.size):
            y[i] = x[i]
    elif mode == 6:
        for i in range(x.size):
            y[i] = np.float32(1)
    else:
        for i in range(x.size):
            y[i] = x[i] ** e


@njit(cache=True)
def _pow6(a, sa, b, sb, y, shape):
    """y = a ** b over MAX_RANK-dim broadcast views of flat a, b (element
    strides sa, sb; 0 = broadcast); y is flat C-contiguous and may be a."""
    n5, a5, b5 = shape[5], sa[5], sb[5]
    o = 0
    for i0 in range(shape[0]):
        for i1 in range(shape[1]):
            for i2 in range(shape[2]):
                for i3 in range(shape[3]):
                    for i4 in range(shape[4]):
                        ia = i0 * sa[0] + i1 * sa[1] + i2 * sa[2] + i3 * sa[3] + i4 * sa[4]
                        ib = i0 * sb[0] + i1 * sb[1] + i2 * sb[2] + i3 * sb[3] + i4 * sb[4]
                        ar, br, row = a[ia:], b[ib:], y[o:o + n5]
                        for j in range(n5):
                            row[j] = ar[j * a5] ** br[j * b5]
                        o += n5


register(list(UNARY) + ["Pow"], infer, prepare, inplace=True)
