"""Elementwise activations: Relu, LeakyRelu, PRelu, Clip, Sigmoid,
HardSigmoid, HardSwish, Tanh, SiLU (all may run in place).

SiLU is x * sigmoid(x) (our IR name; ONNX spells it Sigmoid + Mul). All of
these are in ACT_CODES, so Conv can also fuse them as its epilogue.

Variants: activation.flat (one loop over the flat tensor; Clip bounds given
at run time are read then), activation.prelu6 (the slope broadcast over at
most 6 dims), activation.silu, activation.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ACTIVATIONS, Kernel, RowWindow, Variant, register
from ._common import (ACT_CODES, activation_params, bcast_strides, binary6, broadcast_shapes,
                      c_strides, coalesce, const_of, fail, has_input, njit, numba_const, unary)
from ._reference import activation


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


@dataclass(frozen=True, eq=False)
class ActivationSpec:
    op: str
    size: int
    a: float | None = None  # parameters (Clip: min, max; None: read at run time)
    b: float | None = None
    slope: np.ndarray | None = None  # PRelu: the const slope, flat
    dims: tuple | None = None  # PRelu: (shape, x strides, slope strides) over 6 dims
    cx: np.ndarray | None = None  # SiLU: a const input, flat


def analyse(node, in_shapes, out_shapes, consts):
    x = infer(node, in_shapes, consts)[0]
    size = int(np.prod(x))
    if node.op == "Clip":
        return ActivationSpec("Clip", size, _clip_bound(node, 1, consts, -np.inf),
                              _clip_bound(node, 2, consts, np.inf))
    if node.op == "PRelu":
        s = tuple(in_shapes[1])
        if len(x) > 6:
            fail(node, f"rank {len(x)} > 6 is not supported")
        slope = const_of(node, 1, consts)
        slope = numba_const(slope).reshape(-1) if slope is not None else None
        return ActivationSpec("PRelu", size, slope=slope,
                              dims=tuple(coalesce(x, c_strides(x), bcast_strides(s, x))))
    if node.op == "SiLU":
        cx = const_of(node, 0, consts)
        return ActivationSpec("SiLU", size, cx=numba_const(cx).reshape(-1) if cx is not None
                              else None)
    a, b = activation_params(node.op, node.attrs.get("alpha"), node.attrs.get("beta"))
    return ActivationSpec(node.op, size, a, b)


# --- activation.flat -------------------------------------------------------------

def _build_flat(s: ActivationSpec) -> Kernel:
    code = ACT_CODES[s.op]
    if s.op == "Clip":
        lo, hi = s.a, s.b

        def run(ins, outs, workspace):  # bounds given at run time are read here
            a = lo if lo is not None else float(ins[1].reshape(-1)[0])
            b = hi if hi is not None else float(ins[2].reshape(-1)[0])
            unary(ins[0].reshape(-1), outs[0].reshape(-1), code, a, b)
        return Kernel(run, row_block=1)
    a, b, size = s.a, s.b, s.size

    def run(ins, outs, workspace):
        unary(ins[0].reshape(size), outs[0].reshape(size), code, a, b)
    return Kernel(run, row_block=1)


# --- activation.prelu6 -------------------------------------------------------------

def _build_prelu6(s: ActivationSpec) -> Kernel:
    (shape, sa, sb), slope, size = s.dims, s.slope, s.size

    def run(ins, outs, workspace):
        sl = slope if slope is not None else ins[1].reshape(-1)
        binary6(ins[0].reshape(size), sa, sl, sb, outs[0].reshape(size), shape, 4)
    return Kernel(run)


# --- activation.silu ------------------------------------------------------------------

def _build_silu(s: ActivationSpec) -> Kernel:
    cx, size = s.cx, s.size

    def run(ins, outs, workspace):
        _silu(cx if cx is not None else ins[0].reshape(size), outs[0].reshape(size))
    return Kernel(run, row_block=1)


@njit(cache=True)
def _silu(x, y):
    """y = x * sigmoid(x) = x / (1 + exp(-x)) over flat arrays (y may be x)."""
    one = np.float32(1)
    for i in range(x.size):
        v = x[i]
        y[i] = v / (one + np.exp(-v))


# --- activation.reference ----------------------------------------------------------

def _build_reference(s: ActivationSpec) -> Kernel:
    """_reference.activation of the op (the slope broadcast to X for PRelu)."""
    def run(ins, outs, workspace):
        a, b, slope = s.a, s.b, None
        if s.op == "Clip":  # bounds given at run time
            a = a if a is not None else float(np.asarray(ins[1]).reshape(-1)[0])
            b = b if b is not None else float(np.asarray(ins[2]).reshape(-1)[0])
        elif s.op == "PRelu":
            slope = ins[1]
        outs[0][...] = activation(s.op, ins[0], slope, 0.0 if a is None else a,
                                  0.0 if b is None else b)
    return Kernel(run)


def rows(s: ActivationSpec) -> RowWindow | None:
    """Elementwise: row o reads row o (PRelu's broadcast slope is not streamed)."""
    return RowWindow(1, 1, 0) if s.op != "PRelu" and s.cx is None else None


REFERENCE = Variant("activation.reference", _build_reference)
FLAT = Variant("activation.flat", _build_flat)

register([a for a in ACTIVATIONS if a not in ("PRelu", "SiLU")], infer, [FLAT, REFERENCE],
         analyse=analyse, inplace=True, rows=rows)
register("PRelu", infer, [Variant("activation.prelu6", _build_prelu6), REFERENCE],
         analyse=analyse, inplace=True, rows=rows)
register("SiLU", infer, [Variant("activation.silu", _build_silu), REFERENCE],
         analyse=analyse, inplace=True, rows=rows)
