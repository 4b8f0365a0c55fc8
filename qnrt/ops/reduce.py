"""ReduceMean, ReduceMax, ReduceMin, ReduceSum over any set of axes (rank <= 6
after merging neighbouring axes of the same kind). Axes come from a const
input (ReduceSum opset 13+, the others opset 18+) or the `axes` attr; with
no axes every axis is reduced, unless noop_with_empty_axes (then a copy).

Variants: reduce.strided6 (one in-order pass over the input, at most 6
coalesced dims), reduce.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, c_strides, coalesce, const_of, fail, has_input, int_list, \
    maximum, minimum, njit, norm_axis, numba_const
from ..validate import BOOL, Attr, Schema

OPS = {"ReduceSum": 0, "ReduceMean": 1, "ReduceMax": 2, "ReduceMin": 3}


def _axes(node, rank, consts):
    """Sorted reduced axes (every axis when none are given, [] for a no-op)."""
    if has_input(node, 1):
        c = const_of(node, 1, consts)
        if c is None:
            fail(node, "axes must be a constant")
        axes = int_list(c)
    else:
        axes = attr_ints(node, "axes") or []
    if not axes:
        return [] if int(node.attrs.get("noop_with_empty_axes", 0)) else list(range(rank))
    axes = [norm_axis(node, a, rank) for a in axes]
    if len(set(axes)) != len(axes):
        fail(node, f"repeated axes {axes}")
    return sorted(axes)


def infer(node, in_shapes, consts):
    x = in_shapes[0] if in_shapes else None
    if x is None:
        fail(node, "needs an input")
    x = tuple(int(d) for d in x)
    axes = _axes(node, len(x), consts)
    if int(node.attrs.get("keepdims", 1)):
        return [tuple(1 if i in axes else d for i, d in enumerate(x))]
    return [tuple(d for i, d in enumerate(x) if i not in axes)]


@dataclass(frozen=True, eq=False)
class ReduceSpec:
    op: str
    x: tuple
    y: tuple
    axes: tuple  # sorted; () for a no-op (a copy)
    shape: np.ndarray  # the input over 6 coalesced dims
    ystrides: np.ndarray  # the output's element strides along them, 0 = reduced
    count: int  # elements per reduction (1 for none)
    cx: np.ndarray | None  # const input, flat


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    x = tuple(int(d) for d in in_shapes[0])
    axes = _axes(node, len(x), consts)
    if node.op != "ReduceSum" and any(x[a] == 0 for a in axes) and int(np.prod(y)):
        fail(node, f"{node.op} over the empty axes of {x} is undefined")
    kept = [1 if i in axes else d for i, d in enumerate(x)]
    ys = [0 if i in axes else s for i, s in enumerate(c_strides(kept))]
    dims = coalesce(x, c_strides(x), ys)
    if dims is None:
        fail(node, f"input {x} with axes {axes} needs more than 6 dims")
    shape, _, ystr = dims
    count = max(1, int(np.prod([x[a] for a in axes])))
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    return ReduceSpec(node.op, x, y, tuple(axes), shape, ystr, count, cx)


def _build_strided6(s: ReduceSpec) -> Kernel:
    shape, ystr, count, cx = s.shape, s.ystrides, s.count, s.cx
    op, xsize, ysize = OPS[s.op], int(np.prod(s.x)), int(np.prod(s.y))

    def run(ins, outs, workspace):
        src = cx if cx is not None else ins[0].reshape(xsize)
        _reduce6(src, outs[0].reshape(ysize), shape, ystr, op, count)
    return Kernel(run)


@njit(cache=True)
def _reduce6(x, y, shape, ys, op, count):
    """Reduce flat x (C-contiguous over `shape`, MAX_RANK dims) into flat y;
    ys[d] is y's element stride along dim d, 0 for a reduced dim. x is read
    once in order: a reduced innermost dim becomes one (float64) scalar per
    row, a kept one is accumulated elementwise into the y row."""
    init = -np.inf if op == 2 else (np.inf if op == 3 else 0.0)
    for i in range(y.size):
        y[i] = init
    n5, y5 = shape[5], ys[5]
    xo = 0
    for i0 in range(shape[0]):
        for i1 in range(shape[1]):
            for i2 in range(shape[2]):
                for i3 in range(shape[3]):
                    for i4 in range(shape[4]):
                        yo = i0 * ys[0] + i1 * ys[1] + i2 * ys[2] + i3 * ys[3] + i4 * ys[4]
                        row = x[xo:xo + n5]
                        if y5 == 0:
                            acc = np.float64(y[yo])
                            if op == 2:
                                for j in range(n5):
                                    acc = maximum(np.float64(row[j]), acc)
                            elif op == 3:
                                for j in range(n5):
                                    acc = minimum(np.float64(row[j]), acc)
                            else:
                                for j in range(n5):
                                    acc += row[j]
                            y[yo] = acc
                        else:
                            dst = y[yo:yo + n5]
                            if op == 2:
                                for j in range(n5):
                                    dst[j] = maximum(row[j], dst[j])
                            elif op == 3:
                                for j in range(n5):
                                    dst[j] = minimum(row[j], dst[j])
                            else:
                                for j in range(n5):
                                    dst[j] += row[j]
                        xo += n5
    if op == 1:
        inv = np.float32(1.0 / count)
        for i in range(y.size):
            y[i] *= inv


def _build_reference(s: ReduceSpec) -> Kernel:
    """numpy's sum (float64), mean (float64), max or min over the axes; a copy
    when there are none."""
    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float32).reshape(s.x)
        if not s.axes:
            outs[0][...] = x.reshape(s.y)
            return
        with np.errstate(all="ignore"):
            if s.op == "ReduceSum":
                y = np.sum(x, axis=s.axes, dtype=np.float64)
            elif s.op == "ReduceMean":
                y = np.sum(x, axis=s.axes, dtype=np.float64) / s.count
            elif s.op == "ReduceMax":
                y = np.max(x, axis=s.axes, initial=-np.inf)
            else:
                y = np.min(x, axis=s.axes, initial=np.inf)
            outs[0][...] = np.asarray(y, np.float32).reshape(s.y)
    return Kernel(run)


_REDUCE = Schema({"axes": Attr(lo=-6, hi=5, length=(0, 6), distinct=True), "keepdims": BOOL,
                  "noop_with_empty_axes": BOOL})
SCHEMAS = {op: _REDUCE for op in OPS}

register(list(OPS), infer, [
    Variant("reduce.strided6", _build_strided6),
    Variant("reduce.reference", _build_reference),
], analyse=analyse)
