"""Transpose (perm; default reverses the dims).

Variants: transpose.copy6 (one strided copy over at most 6 coalesced dims),
transpose.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, c_strides, coalesce, const_of, copy6, fail, numba_const
from ..validate import Attr, Schema


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


@dataclass(frozen=True, eq=False)
class TransposeSpec:
    x: tuple
    perm: tuple
    dims: tuple  # (shape, src strides, dst strides) over 6 coalesced dims
    cx: np.ndarray | None  # const input, flat


def analyse(node, in_shapes, out_shapes, consts):
    x = tuple(in_shapes[0])
    perm = _perm(node, len(x))
    y = tuple(x[p] for p in perm)
    src = c_strides(x)
    dims = coalesce(y, [src[p] for p in perm], c_strides(y))
    if dims is None:
        fail(node, f"transpose {x} by {perm} needs more than 6 dims")
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    return TransposeSpec(x, tuple(perm), tuple(dims), cx)


def _build_copy6(s: TransposeSpec) -> Kernel:
    (shape, ss, ds), cx, size = s.dims, s.cx, int(np.prod(s.x))

    def run(ins, outs, workspace):
        xs = cx if cx is not None else ins[0].reshape(size)
        copy6(xs, 0, ss, outs[0].reshape(size), 0, ds, shape)
    return Kernel(run)


def _build_reference(s: TransposeSpec) -> Kernel:
    """numpy's transpose by perm."""
    def run(ins, outs, workspace):
        outs[0][...] = np.transpose(np.asarray(ins[0], np.float32).reshape(s.x), s.perm)
    return Kernel(run)


SCHEMAS = {"Transpose": Schema({"perm": Attr(lo=0, hi=5, length=(0, 6), distinct=True)})}

register("Transpose", infer, [
    Variant("transpose.copy6", _build_copy6),
    Variant("transpose.reference", _build_reference),
], analyse=analyse)
