"""Transpose (perm; default reverses the dims) as one strided copy."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import attr_ints, c_strides, coalesce, const_of, copy6, fail, numba_const


def _perm(node, rank):
    perm = attr_ints(node, "perm", list(range(rank))[::-1])
    if sorted(perm) != list(range(rank)):
        fail(node, f"perm {perm} is not a permutation of {rank} dims")
    return perm


def infer(node, in_shapes, consts):
    x = in_shapes[0]
    if x is None:
        fail(node, "needs an input")
    return [tuple(x[p] for p in _perm(node, len(x)))]


def prepare(node, in_shapes, out_shapes, consts):
    x = tuple(in_shapes[0])
    perm = _perm(node, len(x))
    y = tuple(x[p] for p in perm)
    src = c_strides(x)
    dims = coalesce(y, [src[p] for p in perm], c_strides(y))
    if dims is None:
        fail(node, f"transpose {x} by {perm} needs more than 6 dims")
    shape, ss, ds = dims
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    size = int(np.prod(x))

    def run(ins, outs, workspace):
        xs = cx if cx is not None else ins[0].reshape(size)
        copy6(xs, 0, ss, outs[0].reshape(size), 0, ds, shape)
    return Kernel(run)


register("Transpose", infer, prepare)
