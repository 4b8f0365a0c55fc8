"""Pad (any rank <= 6 after merging unpadded axes): modes constant, reflect,
edge, wrap. Pads come from a const input (opset 11+, with optional const
`axes` from opset 18) or the `pads` attr (older, with the `value` attr);
the constant value from input 2 (const or run time) or the attr.
Negative pads crop first; the remaining pads then pad the cropped input
(onnxruntime's semantics).

Variants: pad.gather6 (a per-axis gather table, at most 6 dims after
merging), pad.reference (crop, then numpy's pad)."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, attr_str, const_of, fail, has_input, int_list, norm_axis, \
    numba_const
from ._gather import gather6, gather_plan
from ..validate import FLOAT, MAX_DIM, Attr, Schema

MODES = ("constant", "reflect", "edge", "wrap")


def _pads(node, rank, consts):
    """Begin and end pads per axis (len rank each)."""
    if has_input(node, 1):
        c = const_of(node, 1, consts)
        if c is None:
            fail(node, "pads must be a constant")
        pads = int_list(c)
    else:
        pads = attr_ints(node, "pads")
        if pads is None:
            fail(node, "needs pads (input 1 or attr)")
    axes = list(range(rank))
    if has_input(node, 3):
        c = const_of(node, 3, consts)
        if c is None:
            fail(node, "axes must be a constant")
        axes = [norm_axis(node, a, rank) for a in int_list(c)]
        if len(set(axes)) != len(axes):
            fail(node, f"repeated axes {axes}")
    if len(pads) != 2 * len(axes):
        fail(node, f"pads {pads} must have {2 * len(axes)} entries (2 per axis of {axes})")
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[len(axes) + i]
    return begin, end


def _mode(node):
    mode = attr_str(node, "mode", "constant") or "constant"
    if mode not in MODES:
        fail(node, f"unsupported mode '{mode}' (supported: {', '.join(MODES)})")
    return mode


def infer(node, in_shapes, consts):
    x = in_shapes[0] if in_shapes else None
    if x is None:
        fail(node, "needs an input")
    _mode(node)
    begin, end = _pads(node, len(x), consts)
    out = tuple(int(n) + b + e for n, b, e in zip(x, begin, end))
    if any(d < 0 for d in out):
        fail(node, f"pads {begin + end} crop more than the input {tuple(x)}")
    return [out]


def _table(node, axis, n, b, e, mode):
    """Input coordinate of each output coordinate along one axis (-1: constant)."""
    cb, ce = max(0, -b), max(0, -e)
    m, pb, pe = n - cb - ce, max(0, b), max(0, e)
    c = np.arange(m + pb + pe, dtype=np.int64) - pb  # coordinate in the cropped input
    if mode == "constant" or not (pb or pe):
        t = np.where((c >= 0) & (c < m), c, -1)
    elif mode == "edge":
        if m < 1:
            fail(node, f"edge padding of axis {axis} needs a non-empty (cropped) input")
        t = np.clip(c, 0, m - 1)
    elif mode == "wrap":
        if m < 1:
            fail(node, f"wrap padding of axis {axis} needs a non-empty (cropped) input")
        t = c % m
    else:
        if m < 2 or pb > m - 1 or pe > m - 1:
            fail(node, f"reflect pads ({pb}, {pe}) of axis {axis} must be < its (cropped) "
                       f"size {m}")
        t = np.abs(c)
        t = np.where(t > m - 1, 2 * (m - 1) - t, t)
    return np.where(t >= 0, t + cb, -1)


@dataclass(frozen=True, eq=False)
class PadSpec:
    x: tuple
    y: tuple
    mode: str
    begin: tuple  # pads per axis, negative: crop
    end: tuple
    plan: tuple  # gather_plan: (table, in strides, out shape, lo, hi)
    value: float | None  # the constant; None: input 2 at run time
    cx: np.ndarray | None  # const input, flat


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    x = tuple(int(d) for d in in_shapes[0])
    mode = _mode(node)
    begin, end = _pads(node, len(x), consts)
    tables = [_table(node, i, n, b, e, mode) for i, (n, b, e) in enumerate(zip(x, begin, end))]
    plan = gather_plan(node, x, tables)
    cval = float(node.attrs.get("value", 0.0))
    if has_input(node, 2):
        c = const_of(node, 2, consts)
        if c is not None:
            if np.asarray(c).size != 1:
                fail(node, f"constant_value must be a scalar, got shape {np.shape(c)}")
            cval = float(np.asarray(c).reshape(-1)[0])
        elif in_shapes[2] is not None and int(np.prod(in_shapes[2])) != 1:
            fail(node, f"constant_value must be a scalar, got shape {in_shapes[2]}")
        else:
            cval = None
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    return PadSpec(x, y, mode, tuple(begin), tuple(end), plan, cval, cx)


def _build_gather6(s: PadSpec) -> Kernel:
    (tab, xs, shape, lo, hi), run_time, cval = s.plan, s.value is None, s.value
    cx, size = s.cx, int(np.prod(s.y))

    def run(ins, outs, workspace):
        v = float(ins[2].reshape(-1)[0]) if run_time else cval
        src = cx if cx is not None else ins[0].reshape(-1)
        gather6(src, xs, tab, outs[0].reshape(size), shape, v, lo, hi)
    return Kernel(run)


def _build_reference(s: PadSpec) -> Kernel:
    """Crop by the negative pads, then numpy's pad by the positive ones (its
    modes constant, reflect, edge and wrap are ONNX's)."""
    crop = tuple(slice(max(0, -b), n - max(0, -e)) for n, b, e in zip(s.x, s.begin, s.end))
    widths = [(max(0, b), max(0, e)) for b, e in zip(s.begin, s.end)]

    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float32).reshape(s.x)[crop]
        if s.mode == "constant":
            value = s.value if s.value is not None else np.asarray(ins[2]).reshape(-1)[0]
            y = np.pad(x, widths, mode="constant", constant_values=np.float32(value))
        else:
            y = np.pad(x, widths, mode=s.mode)
        outs[0][...] = y
    return Kernel(run)


SCHEMAS = {"Pad": Schema({"mode": Attr(choices=("constant", "reflect", "edge", "wrap")),
                          "pads": Attr(lo=-(1 << 62), hi=MAX_DIM),
                          "value": Attr(lo=-math.inf, hi=math.inf, kind=FLOAT)})}

register("Pad", infer, [
    Variant("pad.gather6", _build_gather6),
    Variant("pad.reference", _build_reference),
], analyse=analyse)
