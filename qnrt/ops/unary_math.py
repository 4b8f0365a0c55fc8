"""Elementwise math: Sqrt, Exp, Log, Abs, Neg, Reciprocal (unary) and Pow
(numpy broadcasting, rank <= 6; the exponent a const or a run-time tensor).
All may run in place. IEEE results outside the domain (Sqrt/Log of negatives,
Pow of a negative base to a non-integer power) are NaN, as in onnxruntime.

Variants: unary_math.flat (the unary ops: one loop over the flat tensor),
unary_math.pow_scalar (one const exponent, the base not broadcast: x*x, x*x*x,
sqrt, 1/x, x and 1 skip powf), unary_math.pow6 (any broadcast, at most 6
coalesced dims), unary_math.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import (bcast_strides, broadcast_shapes, c_strides, coalesce, const_of, fail,
                      njit, numba_const)

UNARY = {"Sqrt": 0, "Exp": 1, "Log": 2, "Abs": 3, "Neg": 4, "Reciprocal": 5}
# Pow with a scalar const exponent: x*x, x*x*x, sqrt(x), 1/x, x, 1 skip powf
POW_SPECIAL = {2.0: 1, 3.0: 2, 0.5: 3, -1.0: 4, 1.0: 5, 0.0: 6}
NUMPY = {"Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log, "Abs": np.abs, "Neg": np.negative,
         "Reciprocal": np.reciprocal}


def infer(node, in_shapes, consts):
    if node.op == "Pow":
        if len(in_shapes) != 2 or None in in_shapes:
            fail(node, "needs two inputs")
        return [broadcast_shapes(node, *in_shapes)]
    if not in_shapes or in_shapes[0] is None:
        fail(node, "needs an input")
    return [tuple(in_shapes[0])]


@dataclass(frozen=True, eq=False)
class UnaryMathSpec:
    op: str
    size: int
    cx: np.ndarray | None  # const input 0 (the base for Pow), flat
    ce: np.ndarray | None = None  # Pow: const exponent, flat float32
    x_is_y: bool = False  # Pow: the base has the output's shape
    dims: tuple | None = None  # Pow: (shape, base strides, exponent strides) over 6 dims


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    size = int(np.prod(y))
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    if node.op != "Pow":
        return UnaryMathSpec(node.op, size, cx)
    ce = const_of(node, 1, consts)
    if ce is not None and np.asarray(ce).dtype.kind not in "fiub":
        fail(node, f"exponent dtype {np.asarray(ce).dtype} is not supported")
    ce = numba_const(ce).reshape(-1) if ce is not None else None
    dims = coalesce(y, c_strides(y), bcast_strides(in_shapes[0], y),
                    bcast_strides(in_shapes[1], y))
    if dims is None:
        fail(node, f"broadcasting {in_shapes} needs more than 6 dims")
    shape, _, sa, sb = dims
    return UnaryMathSpec("Pow", size, cx, ce, tuple(in_shapes[0]) == y, (shape, sa, sb))


# --- unary_math.flat -----------------------------------------------------------------

def _build_flat(s: UnaryMathSpec) -> Kernel:
    cx, size, code = s.cx, s.size, UNARY[s.op]

    def run(ins, outs, workspace):
        _unary_math(cx if cx is not None else ins[0].reshape(size), outs[0].reshape(size), code)
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


# --- unary_math.pow_scalar ------------------------------------------------------------

def _is_pow_scalar(s: UnaryMathSpec) -> bool:
    return s.ce is not None and s.ce.size == 1 and s.x_is_y


def _build_pow_scalar(s: UnaryMathSpec) -> Kernel:
    cx, size = s.cx, s.size
    e = float(s.ce[0])
    mode = POW_SPECIAL.get(e, 0)

    def run(ins, outs, workspace):
        _pow_scalar(cx if cx is not None else ins[0].reshape(size), outs[0].reshape(size),
                    np.float32(e), mode)
    return Kernel(run)


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


# --- unary_math.pow6 --------------------------------------------------------------------

def _build_pow6(s: UnaryMathSpec) -> Kernel:
    cx, ce, size, (shape, sa, sb) = s.cx, s.ce, s.size, s.dims

    def run(ins, outs, workspace):
        a = cx if cx is not None else ins[0].reshape(-1)
        b = ce if ce is not None else ins[1].reshape(-1)
        _pow6(a, sa, b, sb, outs[0].reshape(size), shape)
    return Kernel(run)


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


# --- unary_math.reference ------------------------------------------------------------------

def _build_reference(s: UnaryMathSpec) -> Kernel:
    """numpy's ufunc; Pow's exponent is taken as float32 (the base's type)."""
    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float32)
        with np.errstate(all="ignore"):
            if s.op == "Pow":
                outs[0][...] = np.power(x, np.asarray(ins[1]).astype(np.float32))
            else:
                outs[0][...] = NUMPY[s.op](x)
    return Kernel(run)


REFERENCE = Variant("unary_math.reference", _build_reference)

register(list(UNARY), infer, [Variant("unary_math.flat", _build_flat), REFERENCE],
         analyse=analyse, inplace=True)
register("Pow", infer, [Variant("unary_math.pow_scalar", _build_pow_scalar, _is_pow_scalar),
                        Variant("unary_math.pow6", _build_pow6), REFERENCE],
         analyse=analyse, inplace=True)
