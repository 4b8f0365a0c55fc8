"""Add, Sub, Mul, Div with numpy (multidirectional) broadcasting, rank <= 6.

Variants: binary.broadcast6 (one loop nest over the coalesced broadcast
dims), binary.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import (bcast_strides, binary6, broadcast_shapes, c_strides, coalesce, const_of,
                      fail, numba_const)

OPS = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3}
NUMPY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def infer(node, in_shapes, consts):
    if len(in_shapes) != 2 or None in in_shapes:
        fail(node, "needs two inputs")
    return [broadcast_shapes(node, *in_shapes)]


@dataclass(frozen=True, eq=False)
class BinarySpec:
    op: str
    size: int
    dims: tuple  # (shape, a strides, b strides) over 6 coalesced dims
    ca: np.ndarray | None  # const operands, flat
    cb: np.ndarray | None


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    dims = coalesce(y, c_strides(y), bcast_strides(in_shapes[0], y),
                    bcast_strides(in_shapes[1], y))
    if dims is None:
        fail(node, f"broadcasting {in_shapes} needs more than 6 dims")
    shape, _, sa, sb = dims
    ca, cb = (const_of(node, i, consts) for i in (0, 1))
    ca = numba_const(ca).reshape(-1) if ca is not None else None
    cb = numba_const(cb).reshape(-1) if cb is not None else None
    return BinarySpec(node.op, int(np.prod(y)), (shape, sa, sb), ca, cb)


def _build_broadcast6(s: BinarySpec) -> Kernel:
    (shape, sa, sb), ca, cb = s.dims, s.ca, s.cb
    op, size = OPS[s.op], s.size

    def run(ins, outs, workspace):
        a = ca if ca is not None else ins[0].reshape(-1)
        b = cb if cb is not None else ins[1].reshape(-1)
        binary6(a, sa, b, sb, outs[0].reshape(size), shape, op)
    return Kernel(run)


def _build_reference(s: BinarySpec) -> Kernel:
    """numpy's ufunc on the two inputs, broadcast."""
    ufunc = NUMPY[s.op]

    def run(ins, outs, workspace):
        with np.errstate(all="ignore"):
            outs[0][...] = ufunc(np.asarray(ins[0], np.float32), np.asarray(ins[1], np.float32))
    return Kernel(run)


register(list(OPS), infer, [
    Variant("binary.broadcast6", _build_broadcast6),
    Variant("binary.reference", _build_reference),
], analyse=analyse, inplace=True)
