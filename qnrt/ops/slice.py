"""Slice (a copy): starts/ends/axes/steps from const inputs (opset 10+) or
the starts/ends/axes attrs (older). Negative indices count from the end,
out-of-range ones are clamped, steps may be negative (ONNX rules). An end
of INT32_MAX or INT64_MAX means "to the end" in the step's direction, as in
onnxruntime (so x[::-1] may be spelled start -1, end INT_MAX, step -1).

Variants: slice.empty (an empty output: nothing to copy), slice.strided6 (a
strided copy over at most 6 coalesced dims), slice.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, c_strides, coalesce, const_of, fail, has_input, int_list, njit, \
    norm_axis, numba_const


def _const_list(node, i, consts, attr):
    if len(node.inputs) > 1:  # opset 10+: inputs
        if not has_input(node, i):
            return None
        c = const_of(node, i, consts)
        if c is None:
            fail(node, f"input {i} ({attr}) must be a constant")
        return int_list(c)
    return attr_ints(node, attr)


def _plan(node, x, consts):
    """(start, step, count) per axis."""
    starts, ends = _const_list(node, 1, consts, "starts"), _const_list(node, 2, consts, "ends")
    if starts is None or ends is None or len(starts) != len(ends):
        fail(node, f"starts {starts} and ends {ends} must be given, of one length")
    axes = _const_list(node, 3, consts, "axes")
    axes = list(range(len(starts))) if axes is None else axes
    steps = _const_list(node, 4, consts, "steps") or [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts):
        fail(node, f"starts {starts}, ends {ends}, axes {axes}, steps {steps} differ in length")
    axes = [norm_axis(node, a, len(x)) for a in axes]
    if len(set(axes)) != len(axes):
        fail(node, f"repeated axes {axes}")
    plan = [(0, 1, int(d)) for d in x]
    for a, s, e, st in zip(axes, starts, ends, steps):
        d = int(x[a])
        if st == 0:
            fail(node, f"step of axis {a} is 0")
        if e in (2**31 - 1, 2**63 - 1):  # INT_MAX: to the end, either way (as onnxruntime)
            e = d if st > 0 else -1
        else:
            e = e + d if e < 0 else e
        s = s + d if s < 0 else s
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            n = max(0, -(-(e - s) // st))
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            n = max(0, -(-(s - e) // -st))
        plan[a] = (s, st, n)
    return plan


def infer(node, in_shapes, consts):
    x = in_shapes[0] if in_shapes else None
    if x is None:
        fail(node, "needs an input")
    return [tuple(n for _, _, n in _plan(node, x, consts))]


@dataclass(frozen=True, eq=False)
class SliceSpec:
    x: tuple
    y: tuple
    plan: tuple  # (start, step, count) per axis
    offset: int  # strided6: the first element read
    dims: tuple | None  # strided6: (shape, input strides) over 6 coalesced dims; None if empty
    cx: np.ndarray | None  # const input, flat

    @property
    def size(self) -> int:
        return int(np.prod(self.y))


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    x = tuple(int(d) for d in in_shapes[0])
    plan = _plan(node, x, consts)
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    if not int(np.prod(y)):
        return SliceSpec(x, y, tuple(plan), 0, None, cx)
    xs = c_strides(x)
    off = sum(s * st for (s, _, _), st in zip(plan, xs))
    steps = [p[1] * st for p, st in zip(plan, xs)]
    dims = coalesce(y, steps, c_strides(y))
    if dims is None:
        fail(node, f"slicing {x} needs more than 6 dims")
    shape, ss, _ = dims
    # what the kernel will index: the extremes of off + i.ss
    lo = off + sum((int(n) - 1) * int(s) for n, s in zip(shape, ss) if s < 0)
    hi = off + sum((int(n) - 1) * int(s) for n, s in zip(shape, ss) if s > 0)
    if not 0 <= lo <= hi < int(np.prod(x)):
        fail(node, f"internal: slice of {x} reads outside the input")
    return SliceSpec(x, y, tuple(plan), off, (shape, ss), cx)


# --- slice.empty -------------------------------------------------------------------

def _build_empty(s: SliceSpec) -> Kernel:
    return Kernel(lambda ins, outs, workspace: None)


# --- slice.strided6 ------------------------------------------------------------------

def _build_strided6(s: SliceSpec) -> Kernel:
    (shape, ss), off, cx = s.dims, s.offset, s.cx
    size, xsize = s.size, int(np.prod(s.x))

    def run(ins, outs, workspace):
        _slice6(cx if cx is not None else ins[0].reshape(xsize), off, ss, outs[0].reshape(size),
                shape)
    return Kernel(run)


@njit(cache=True)
def _slice6(x, off, xs, y, shape):
    """y (flat, C-contiguous over `shape`) = x[off + i.xs] over MAX_RANK dims;
    strides may be negative (absolute indices, all inside x)."""
    n5, s5 = shape[5], xs[5]
    o = 0
    for i0 in range(shape[0]):
        for i1 in range(shape[1]):
            for i2 in range(shape[2]):
                for i3 in range(shape[3]):
                    for i4 in range(shape[4]):
                        base = off + i0 * xs[0] + i1 * xs[1] + i2 * xs[2] + i3 * xs[3] \
                            + i4 * xs[4]
                        row = y[o:o + n5]
                        if s5 == 1:
                            src = x[base:base + n5]
                            for j in range(n5):
                                row[j] = src[j]
                        else:
                            for j in range(n5):
                                row[j] = x[base + j * s5]
                        o += n5


# --- slice.reference -------------------------------------------------------------------

def _build_reference(s: SliceSpec) -> Kernel:
    """Along each axis, the elements start, start + step, ... (count of them)."""
    def run(ins, outs, workspace):
        v = np.asarray(ins[0], np.float32).reshape(s.x)
        for axis, (start, step, count) in enumerate(s.plan):
            v = np.take(v, start + step * np.arange(count), axis=axis)
        outs[0][...] = v
    return Kernel(run)


register("Slice", infer, [
    Variant("slice.empty", _build_empty, lambda s: s.size == 0),
    Variant("slice.strided6", _build_strided6, lambda s: s.size > 0),
    Variant("slice.reference", _build_reference),
], analyse=analyse)
