"""Split along one axis (negative allowed) into copies: sizes from a const
input (opset 13+) or the `split` attr (older); else `num_outputs` chunks of
ceil(dim / num_outputs) with a smaller last one (opset 18), else equal parts,
one per output.

Variants: split.copy6 (one strided copy per output), split.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, coalesce, const_of, copy6, fail, has_input, int_list, \
    norm_axis, numba_const
from ..validate import AXIS, INT, MAX_DIM, Attr, Schema


def _sizes(node, x, consts):
    axis = norm_axis(node, int(node.attrs.get("axis", 0)), len(x))
    dim, k = int(x[axis]), len(node.outputs)
    if has_input(node, 1):
        c = const_of(node, 1, consts)
        if c is None:
            fail(node, "split sizes must be a constant")
        sizes = int_list(c)
    else:
        sizes = attr_ints(node, "split")
    if sizes is None and "num_outputs" in node.attrs:
        n = int(node.attrs["num_outputs"])
        if n < 1 or n != k:
            fail(node, f"num_outputs {n} must be the number of outputs {k}")
        chunk = -(-dim // n)
        sizes = [min(chunk, max(0, dim - i * chunk)) for i in range(n)]
        if chunk and sizes[-1] == 0 and dim:
            fail(node, f"cannot split {dim} into {n} chunks of {chunk}")
    elif sizes is None:
        if dim % k:
            fail(node, f"axis {axis} of size {dim} does not split into {k} equal parts")
        sizes = [dim // k] * k
    if len(sizes) != k or min(sizes, default=0) < 0 or sum(sizes) != dim:
        fail(node, f"split sizes {sizes} must be {k} non-negative ints summing to {dim}")
    return axis, sizes


def infer(node, in_shapes, consts):
    x = in_shapes[0] if in_shapes else None
    if x is None:
        fail(node, "needs an input")
    x = tuple(int(d) for d in x)
    axis, sizes = _sizes(node, x, consts)
    return [x[:axis] + (s,) + x[axis + 1:] for s in sizes]


@dataclass(frozen=True, eq=False)
class SplitSpec:
    x: tuple
    axis: int
    sizes: tuple
    wanted: tuple  # per output: named (an omitted output is not written)
    parts: tuple  # per non-empty wanted output: (index, offset, shape, src, dst strides, size)
    cx: np.ndarray | None  # const input, flat


def analyse(node, in_shapes, out_shapes, consts):
    ys = infer(node, in_shapes, consts)
    if [tuple(s) for s in out_shapes] != ys:
        fail(node, f"output shapes {out_shapes} != {ys}")
    x = tuple(int(d) for d in in_shapes[0])
    axis, sizes = _sizes(node, x, consts)
    outer, inner = int(np.prod(x[:axis])), int(np.prod(x[axis + 1:]))
    row = x[axis] * inner  # input elements per outer index
    parts, off = [], 0
    for i, s in enumerate(sizes):
        width = s * inner
        if width and outer and node.outputs[i]:
            shape, ss, ds = coalesce((outer, width), (row, 1), (width, 1))
            parts.append((i, off, shape, ss, ds, outer * width))
        off += width
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    return SplitSpec(x, axis, tuple(sizes), tuple(bool(o) for o in node.outputs), tuple(parts),
                     cx)


def _build_copy6(s: SplitSpec) -> Kernel:
    parts, cx, size = s.parts, s.cx, int(np.prod(s.x))

    def run(ins, outs, workspace):
        src = cx if cx is not None else ins[0].reshape(size)
        for i, o, shape, ss, ds, n in parts:
            copy6(src, o, ss, outs[i].reshape(n), 0, ds, shape)
    return Kernel(run)


def _build_reference(s: SplitSpec) -> Kernel:
    """numpy's split at the cumulative sizes along the axis."""
    cuts = np.cumsum(s.sizes)[:-1]

    def run(ins, outs, workspace):
        pieces = np.split(np.asarray(ins[0], np.float32).reshape(s.x), cuts, axis=s.axis)
        for out, piece, wanted in zip(outs, pieces, s.wanted):
            if wanted:
                out[...] = piece
    return Kernel(run)


SCHEMAS = {"Split": Schema({"axis": AXIS, "split": Attr(lo=0, hi=MAX_DIM, length=(1, 1 << 16)),
                            "num_outputs": Attr(lo=1, hi=1 << 16, kind=INT)})}

register("Split", infer, [
    Variant("split.copy6", _build_copy6),
    Variant("split.reference", _build_reference),
], analyse=analyse)
