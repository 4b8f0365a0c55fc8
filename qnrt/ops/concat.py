"""Concat along one axis (negative allowed): one strided copy per input."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import coalesce, const_of, copy6, fail, norm_axis, numba_const


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


def prepare(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    axis = norm_axis(node, int(node.attrs["axis"]), len(y))
    outer, inner = int(np.prod(y[:axis])), int(np.prod(y[axis + 1:]))
    row = y[axis] * inner  # output elements per outer index
    parts, off = [], 0  # (input index, const, offset, shape, src, dst strides)
    for i, s in enumerate(in_shapes):
        width = int(s[axis]) * inner
        if width:
            shape, ss, ds = coalesce((outer, width), (width, 1), (row, 1))
            c = const_of(node, i, consts)
            parts.append((i, None if c is None else numba_const(c).reshape(-1), off,
                          shape, ss, ds, outer * width))
        off += width
    size = int(np.prod(y))

    def run(ins, outs, workspace):
        out = outs[0].reshape(size)
        for i, c, o, shape, ss, ds, n in parts:
            copy6(c if c is not None else ins[i].reshape(n), 0, ss, out, o, ds, shape)
    return Kernel(run)


register("Concat", infer, prepare)
