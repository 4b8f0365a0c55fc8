"""MaxPool and AveragePool over 2-D (NCHW) windows.

Variants: pool.max2x2 (MaxPool 2x2 stride 2 whose windows all lie inside the
image: one pass per output row), pool.window (any window, tap by tap over
column ranges), pool.reference."""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from . import Kernel, RowWindow, Variant, register
from ._common import (attr_ints, by_parts, fail, maximum, njit, parts_for, split_ranges,
                      valid_range as _valid, window_geometry)
from ..validate import BOOL, WINDOW, Schema

# A max over a window that lies entirely in the padding: ONNX Runtime (and so
# qnrt) answers the lowest finite float32, not -inf.
LOWEST = np.float32(np.finfo(np.float32).min)
NS_PER_OUTPUT = 1.5  # pool.max2x2's time per output, for splitting into parts (profile_nodes)


def _geometry(node, in_shapes):
    x = in_shapes[0]
    if x is None or len(x) != 4:
        fail(node, f"only 2-D pooling (NCHW) is supported, input {x}")
    if len(node.outputs) > 1 and any(node.outputs[1:]):
        fail(node, "the Indices output is not supported")
    kernel = attr_ints(node, "kernel_shape")
    if kernel is None:
        fail(node, "kernel_shape is required")
    strides = attr_ints(node, "strides", [1] * len(kernel))
    dil = attr_ints(node, "dilations", [1] * len(kernel))
    ceil = bool(node.attrs.get("ceil_mode", 0))
    begin, end, out = window_geometry(node, list(x[2:]), kernel, strides, dil, ceil)
    if any(p >= k for p, k in zip(begin + end, kernel + kernel)):
        fail(node, f"pads {begin + end} must be smaller than the kernel {kernel}")
    if min(out) < 1:
        fail(node, f"output would be empty: {out}")
    return kernel, strides, dil, begin, end, out


def infer(node, in_shapes, consts):
    out = _geometry(node, in_shapes)[-1]
    return [(in_shapes[0][0], in_shapes[0][1], out[0], out[1])]


def tap_range(start, n, k, d, lo, hi):
    """[j0, j1) per window: the taps j in [0, k) whose position start + j * d
    lies in [lo, hi) (`start`: an int64 array, one entry per window). O(windows),
    whatever the kernel size: no table grows with k."""
    j0 = np.clip(-((start - lo) // d), 0, k)  # ceil((lo - start) / d)
    j1 = np.clip(-((start - hi) // d), 0, k)  # ceil((hi - start) / d)
    return j0, np.maximum(j1, j0)


def _counts(n, out, k, s, d, pb, pe, include_pad):
    """Taps of each window (along one dim) inside the image, or inside the
    padded image with count_include_pad; windows are separable, so an
    AveragePool divisor is count_h[oh] * count_w[ow]. One entry per output
    position (the kernel size only enters the arithmetic)."""
    lo, hi = (-pb, n + pe) if include_pad else (0, n)
    j0, j1 = tap_range(np.arange(out, dtype=np.int64) * s - pb, n, k, d, lo, hi)
    return np.maximum(j1 - j0, 1).astype(np.float32)


@dataclass(frozen=True, eq=False)
class PoolSpec:
    is_max: bool
    planes: int  # N * C
    h: int
    w: int
    kernel: tuple  # (kh, kw)
    strides: tuple
    dilations: tuple
    begin: tuple  # pads (top, left)
    end: tuple  # pads (bottom, right)
    out: tuple  # (oh, ow)
    include_pad: bool
    cnt_h: np.ndarray  # AveragePool divisors per output row / column (float32)
    cnt_w: np.ndarray


def analyse(node, in_shapes, out_shapes, consts):
    kernel, strides, dil, begin, end, out = _geometry(node, in_shapes)
    if tuple(out_shapes[0]) != tuple(infer(node, in_shapes, consts)[0]):
        fail(node, f"output shape {out_shapes[0]} does not match the input")
    inc = bool(int(node.attrs.get("count_include_pad", 0)))
    h, w = (int(d) for d in in_shapes[0][2:])
    cnt_h, cnt_w = (_counts(*dim, inc) for dim in zip((h, w), out, kernel, strides, dil, begin,
                                                       end))
    planes = int(in_shapes[0][0]) * int(in_shapes[0][1])
    return PoolSpec(node.op == "MaxPool", planes, h, w, tuple(kernel), tuple(strides), tuple(dil),
                    tuple(begin), tuple(end), tuple(out), inc, cnt_h, cnt_w)


# --- pool.max2x2 -----------------------------------------------------------------

def _is_max2x2(s: PoolSpec) -> bool:
    (oh, ow) = s.out
    return (s.is_max and s.kernel + s.strides + s.dilations + s.begin == (2, 2, 2, 2, 1, 1, 0, 0)
            and 2 * oh <= s.h and 2 * ow <= s.w)  # (ceil_mode may add a partial window)


def _build_max2x2(s: PoolSpec) -> Kernel:
    h, w, (oh, ow) = s.h, s.w, s.out
    planes = s.planes
    parts = parts_for(planes, NS_PER_OUTPUT * oh * ow)  # each part: a range of planes
    ranges = split_ranges(planes, parts)

    def run_span(p0, p1, ins, outs, workspace):  # QuickNet's pool: one pass per output row
        _max2x2(ins[0].reshape(-1, h, w), outs[0].reshape(-1, oh, ow),
                ranges[p0][0], ranges[p1 - 1][1])
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, row_block=1, band_pads=True, parts=parts, run_parts=run_parts)


@njit(cache=True)
def _max2x2(x, y, q0, q1):
    """MaxPool 2x2 stride 2 without padding over (planes, H, W) views, planes
    q0 .. q1 - 1."""
    for p in range(q0, q1):
        for oh in range(y.shape[1]):
            r0, r1, out = x[p, 2 * oh], x[p, 2 * oh + 1], y[p, oh]
            for j in range(y.shape[2]):
                out[j] = maximum(maximum(r0[2 * j], r0[2 * j + 1]),
                                 maximum(r1[2 * j], r1[2 * j + 1]))


# --- pool.window -----------------------------------------------------------------

def _build_window(s: PoolSpec) -> Kernel:
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = s.kernel, s.strides, s.dilations, s.begin
    is_max, cnt_h, cnt_w = s.is_max, s.cnt_h, s.cnt_w

    def run(ins, outs, workspace):
        _pool(ins[0], outs[0], kh, kw, sh, sw, ph, pw, dh, dw, is_max, cnt_h, cnt_w)
    return Kernel(run, row_block=1, band_pads=True)


@njit(cache=True)
def _pool(x, y, kh_, kw_, sh, sw, ph, pw, dh, dw, is_max, cnt_h, cnt_w):
    """Each output row combines, tap by tap, the column range where the tap is
    inside the image (padding never wins a max and adds 0 to a sum; a window
    with no tap inside gives LOWEST, as in ONNX Runtime)."""
    n_, c_, h, w = x.shape
    oh_, ow_ = y.shape[2], y.shape[3]
    # Only taps inside the image are visited, so the time is bounded by the
    # image, whatever the kernel: the column taps some output column reads
    # (0 <= kw * dw - pw + j * sw < w for a j in [0, ow_)) ...
    kw0, kw1 = _valid((ow_ - 1) * sw - pw, dw, kw_, w + (ow_ - 1) * sw)
    by_column = kw1 - kw0 > ow_  # ... unless they outnumber the columns
    for n in range(n_):
        for c in range(c_):
            xc, yc = x[n, c], y[n, c]
            for oh in range(oh_):
                row = yc[oh]
                row[:] = LOWEST if is_max else 0
                kh0, kh1 = _valid(oh * sh - ph, dh, kh_, h)
                for kh in range(kh0, kh1):
                    xr = xc[oh * sh - ph + kh * dh]
                    if by_column:  # a kernel far wider than the image: each column's own taps
                        for j in range(ow_):
                            a0, a1 = _valid(j * sw - pw, dw, kw_, w)
                            for kw in range(a0, a1):
                                v = xr[j * sw - pw + kw * dw]
                                row[j] = maximum(v, row[j]) if is_max else row[j] + v
                        continue
                    for kw in range(kw0, kw1):
                        off = kw * dw - pw
                        lo, hi = _valid(off, sw, ow_, w)
                        dst, src = row[lo:hi], xr[lo * sw + off:]
                        if is_max:
                            for j in range(hi - lo):
                                dst[j] = maximum(src[j * sw], dst[j])
                        else:
                            for j in range(hi - lo):
                                dst[j] += src[j * sw]
                if not is_max:
                    ch = cnt_h[oh]
                    for j in range(ow_):
                        row[j] /= ch * cnt_w[j]


# --- pool.reference ----------------------------------------------------------------

def _taps(n, out, k, s, d, pb, pe, include_pad):
    """Input index (clipped into [0, n)) of each tap of each window along one
    dim that some window reads inside the image, whether it lies inside for
    each window, and each window's AveragePool divisor along this dim (taps
    inside the image, or the padded image with count_include_pad), counted on
    the range of tap positions by bisection: no table of the kernel's size."""
    start = np.arange(out, dtype=np.int64) * s - pb
    used = sorted({j for o in range(out) for j in range(k)[
        bisect_left(range(int(start[o]), int(start[o]) + k * d, d), 0):
        bisect_left(range(int(start[o]), int(start[o]) + k * d, d), n)]})
    pos = start[:, None] + np.array(used, np.int64).reshape(1, -1) * d  # (out, taps used)
    inside = (pos >= 0) & (pos < n)
    lo, hi = (-pb, n + pe) if include_pad else (0, n)
    counted = []
    for o in range(out):
        taps = range(int(start[o]), int(start[o]) + k * d, d)
        counted.append(bisect_left(taps, hi) - bisect_left(taps, lo))
    return np.clip(pos, 0, n - 1), inside, np.array(counted, np.float64)


def _build_reference(s: PoolSpec) -> Kernel:
    """Every window tap by tap: MaxPool takes the max over the taps inside the
    image (LOWEST for a window with none), AveragePool the sum over them
    divided by the number of counted taps."""
    (oh, ow) = s.out
    ih, in_h, cnt_h = _taps(s.h, oh, s.kernel[0], s.strides[0], s.dilations[0], s.begin[0],
                            s.end[0], s.include_pad)
    iw, in_w, cnt_w = _taps(s.w, ow, s.kernel[1], s.strides[1], s.dilations[1], s.begin[1],
                            s.end[1], s.include_pad)

    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float64)
        acc = np.full(outs[0].shape, LOWEST if s.is_max else 0, np.float64)
        with np.errstate(all="ignore"):
            for a in range(ih.shape[1]):
                for b in range(iw.shape[1]):
                    v = x[:, :, ih[:, a][:, None], iw[:, b][None, :]]
                    inside = in_h[:, a][:, None] & in_w[:, b][None, :]
                    if s.is_max:
                        acc = np.where(inside, np.maximum(acc, v), acc)
                    else:
                        acc += np.where(inside, v, 0.0)
            count = np.maximum(cnt_h[:, None] * cnt_w[None, :], 1)
            outs[0][...] = acc if s.is_max else acc / count
    return Kernel(run)


def rows(s: PoolSpec) -> RowWindow:
    return RowWindow((s.kernel[0] - 1) * s.dilations[0] + 1, s.strides[0], s.begin[0],
                     pads=tuple(s.begin) + tuple(s.end), taps=s.kernel[0] * s.kernel[1])


# what the attributes may be (qnrt.validate checks them before any shape rule runs)
_POOL = {**WINDOW, "ceil_mode": BOOL, "storage_order": BOOL}
SCHEMAS = {"MaxPool": Schema(_POOL), "AveragePool": Schema({**_POOL, "count_include_pad": BOOL})}

register(["MaxPool", "AveragePool"], infer, [
    Variant("pool.max2x2", _build_max2x2, _is_max2x2),
    Variant("pool.window", _build_window),
    Variant("pool.reference", _build_reference),
], analyse=analyse, rows=rows)
