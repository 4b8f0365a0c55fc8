"""Concat along one axis (negative allowed).

Variants: concat.copy6 (one strided copy per input), concat.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import coalesce, const_of, copy6, fail, norm_axis, numba_const
from ..validate import AXIS, Schema


def infer(node, in_shapes, consts):
    if not in_shapes or any(s is None for s in in_shapes):
        fail(node, "needs at least one input, none omitted")
    first = tuple(in_shapes[0])
    if "axis" not in node.attrs:
        fail(node, "axis is required")
    axis = norm_axis(node, int(node.attrs["axis"]), len(first))
    for s in in_shapes[1:]:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first))
                                       if i != axis):
            fail(node, f"input shapes {in_shapes} differ off axis {axis}")
    total = sum(int(s[axis]) for s in in_shapes)
    return [first[:axis] + (total,) + first[axis + 1:]]


@dataclass(frozen=True, eq=False)
class ConcatSpec:
    y: tuple
    axis: int
    parts: tuple  # per non-empty input: (index, const, offset, shape, src, dst strides, size)


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    axis = norm_axis(node, int(node.attrs["axis"]), len(y))
    outer, inner = int(np.prod(y[:axis])), int(np.prod(y[axis + 1:]))
    row = y[axis] * inner  # output elements per outer index
    parts, off = [], 0
    for i, s in enumerate(in_shapes):
        width = int(s[axis]) * inner
        if width:
            shape, ss, ds = coalesce((outer, width), (width, 1), (row, 1))
            c = const_of(node, i, consts)
            parts.append((i, None if c is None else numba_const(c).reshape(-1), off,
                          shape, ss, ds, outer * width))
        off += width
    return ConcatSpec(y, axis, tuple(parts))


def _build_copy6(s: ConcatSpec) -> Kernel:
    parts, size = s.parts, int(np.prod(s.y))

    def run(ins, outs, workspace):
        out = outs[0].reshape(size)
        for i, c, o, shape, ss, ds, n in parts:
            copy6(c if c is not None else ins[i].reshape(n), 0, ss, out, o, ds, shape)
    return Kernel(run)


def _build_reference(s: ConcatSpec) -> Kernel:
    """numpy's concatenate along the axis."""
    def run(ins, outs, workspace):
        outs[0][...] = np.concatenate([np.asarray(v, np.float32) for v in ins], axis=s.axis)
    return Kernel(run)


SCHEMAS = {"Concat": Schema({"axis": AXIS})}

register("Concat", infer, [
    Variant("concat.copy6", _build_copy6),
    Variant("concat.reference", _build_reference),
], analyse=analyse)
