"""Depthwise Conv variants (one input channel per group; output channel m
reads input channel m // multiplier), direct Numba loops:

- conv.depthwise.nhwc: small planes, whose rows are too short to vectorize:
  channels-last in the workspace (multiplier 1);
- conv.dw3x3.padded: 3x3/s1/p1 on narrow planes: a zero-padded flat loop;
- conv.dw3x3.plane: 3x3/s1/p1 on wide planes: one flat loop over the plane;
- conv.depthwise.rows: any window, stride, pad, dilation and multiplier: per
  output row, tap by tap over the valid column range.
"""
from __future__ import annotations

import numpy as np

from .. import Kernel
from .._common import (act_row, act_vec, by_parts, njit, numba_const, parts_for, same_memory,
                       split_ranges)
from .._common import valid_range as _valid

FLOAT = np.dtype(np.float32).itemsize
NHWC_MAX_WIDTH = 64  # depthwise outputs narrower than this go channels-last ...
NHWC_MAX_BYTES = 2 * 1024 * 1024  # ... if the transposed image fits this workspace
DW3X3_NHWC_MAX_WIDTH = 12  # ... or, for 3x3/s1/p1 (whose plane kernels are faster), this
DW3X3_PAD_MAX_WIDTH = 24  # 3x3/s1/p1 narrower than this: the zero-padded flat kernel
# time per multiply-add, for splitting into parts (tools/profile_nodes.py, 1 thread:
# the plane loops run 0.4-0.9 ns per 3x3 output, the channels-last and padded
# kernels 1.0-1.7 ns with their copies)
NS_PER_TAP = 0.08
NS_PER_TAP_COPIED = 0.15
# The 3x3 kernels compile with fastmath "contract" only: each tap's multiply
# and add become one fused multiply-add (6-13 % faster, tools' A/B on AVX2),
# in the order written. A pixel is computed by the same expression in a band
# as in the whole plane (vector body or remainder alike), so bands keep the
# bits (tests/test_streaming.py).
CONTRACT = {"contract"}


def _depthwise_weights(spec):
    """The weights for the kernels (None: they arrive at run time)."""
    return numba_const(spec.weights) if spec.has_const_weights else None


# --- conv.depthwise.nhwc ------------------------------------------------------

def _nhwc_bytes(g) -> int:
    return FLOAT * ((g.hw + 1) * g.cin + g.ohw * g.cin)


def nhwc_applies(spec) -> bool:
    return spec.geometry.is_depthwise and spec.geometry.multiplier == 1


def nhwc_prefers(spec) -> bool:
    g = spec.geometry
    width = min(NHWC_MAX_WIDTH, DW3X3_NHWC_MAX_WIDTH) if g.is_dw3x3 else NHWC_MAX_WIDTH
    return (g.ow < width and _nhwc_bytes(g) <= NHWC_MAX_BYTES
            and 8 * g.ohw * (g.kh * g.kw + 2) <= NHWC_MAX_BYTES)  # the taps table too


def build_nhwc(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    cin, cout, kh, kw, hw, ohw = g.cin, g.cout, g.kh, g.kw, g.hw, g.ohw
    (sh, sw), (dh, dw), (ph, pw) = g.strides, g.dilations, g.pads_begin
    taps = _nhwc_taps(g.h, g.w, g.oh, g.ow, kh, kw, sh, sw, ph, pw, dh, dw)
    nhwc_bytes = _nhwc_bytes(g)  # one image channels-last, in and out
    parts = parts_for(g.n, NS_PER_TAP_COPIED * kh * kw * ohw * cin)  # each part: a range of images
    ranges = split_ranges(g.n, parts)
    kind, a, b = epi.code, epi.a, epi.b

    def weights_t(w):  # (K3, C), zero rows for the padding taps
        wt = np.zeros((taps.shape[1], cout), np.float32)
        wt[:kh * kw] = w.reshape(cout, kh * kw).T
        return wt
    wt_c = weights_t(spec.weights) if spec.has_const_weights else None

    def run_span(p0, p1, ins, outs, workspace):
        bias, slope = epi.operands(ins)
        ws = workspace[:nhwc_bytes].view(np.float32)
        _dw_nhwc(ins[0], wt_c if wt_c is not None else weights_t(ins[1]), taps, bias,
                 slope, outs[0], ws[:(hw + 1) * cin].reshape(hw + 1, cin),
                 ws[(hw + 1) * cin:].reshape(ohw, cin), kind, a, b, ranges[p0][0], ranges[p1 - 1][1])
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=nhwc_bytes, row_block=1,
                  inplace=True, band_pads=True, parts=parts,  # x[n] read first
                  run_parts=run_parts)


def _nhwc_taps(h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw):
    """(OH*OW, K3) input pixel of every tap (h*w = the zero row), K3 = KH*KW
    rounded up to a multiple of 3."""
    k3 = -(-kh * kw // 3) * 3
    ih = (np.arange(oh) * sh - ph)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    iw = (np.arange(ow) * sw - pw)[None, :, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    ok = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
    taps = np.where(ok, ih * w + iw, h * w).reshape(oh * ow, kh * kw)
    pad = np.full((oh * ow, k3 - kh * kw), h * w)
    return np.ascontiguousarray(np.concatenate([taps, pad], 1), dtype=np.int64)


@njit(cache=True)
def _transpose2(src, dst):
    """dst = src.T for 2-D arrays: strips of 8 source rows, so each write is
    8 contiguous floats and each read line is reused from cache."""
    r_, s_ = src.shape
    for r0 in range(0, r_ - 7, 8):
        for s in range(s_):
            d = dst[s, r0:r0 + 8]
            for i in range(8):
                d[i] = src[r0 + i, s]
    for r in range(r_ - r_ % 8, r_):
        for s in range(s_):
            dst[s, r] = src[r, s]


@njit(cache=True, fastmath=CONTRACT)
def _dw_nhwc(x, wt, taps, bias, slope, y, xt, yt, kind, a, b, n0, n1):
    """Depthwise conv (multiplier 1) for small planes, whose rows are too short
    to vectorize: transpose the image to channels-last in the workspace, then
    each output pixel is a sum of (weight row * input row) over all channels.
    taps[p] lists the input pixel of each tap for output pixel p (the zero row
    xt[H*W] for taps in the padding), in groups of three so that one pass
    accumulates three taps; wt (taps.shape[1], C) is zero for the padding taps.
    Images n0 .. n1 - 1 only."""
    c_ = x.shape[1]
    hw, ohw = xt.shape[0] - 1, yt.shape[0]
    xt[hw, :] = 0
    for n in range(n0, n1):
        _transpose2(x[n].reshape(c_, hw), xt)
        for p in range(ohw):
            acc, tp = yt[p], taps[p]
            if tp.size == 9:  # 3x3: all taps in one pass, accumulator in registers
                x0, x1, x2, x3, x4 = xt[tp[0]], xt[tp[1]], xt[tp[2]], xt[tp[3]], xt[tp[4]]
                x5, x6, x7, x8 = xt[tp[5]], xt[tp[6]], xt[tp[7]], xt[tp[8]]
                w0, w1, w2, w3, w4, w5, w6, w7, w8 = (wt[0], wt[1], wt[2], wt[3], wt[4],
                                                      wt[5], wt[6], wt[7], wt[8])
                for c in range(c_):
                    acc[c] = bias[c] + (w0[c] * x0[c] + w1[c] * x1[c] + w2[c] * x2[c]
                                        + w3[c] * x3[c] + w4[c] * x4[c] + w5[c] * x5[c]
                                        + w6[c] * x6[c] + w7[c] * x7[c] + w8[c] * x8[c])
                act_vec(acc, slope, kind, a, b)
                continue
            acc[:] = bias
            for k in range(0, tp.size, 3):
                x0, x1, x2 = xt[tp[k]], xt[tp[k + 1]], xt[tp[k + 2]]
                w0, w1, w2 = wt[k], wt[k + 1], wt[k + 2]
                for c in range(c_):
                    acc[c] += w0[c] * x0[c] + w1[c] * x1[c] + w2[c] * x2[c]
            act_vec(acc, slope, kind, a, b)
        _transpose2(yt, y[n].reshape(c_, ohw))


# --- conv.dw3x3.padded --------------------------------------------------------

def dw3x3_applies(spec) -> bool:
    return spec.geometry.is_dw3x3


def dw3x3_padded_prefers(spec) -> bool:
    return spec.geometry.ow < DW3X3_PAD_MAX_WIDTH


def build_dw3x3_padded(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    wd, oh, mult = _depthwise_weights(spec), g.oh, g.multiplier
    sp = g.w + 1
    pad_floats = (oh + 2) * sp + 1 + oh * sp  # the padded plane and output rows
    planes = g.n * g.cout
    parts = parts_for(planes, NS_PER_TAP_COPIED * 9 * g.ohw)
    ranges = split_ranges(planes, parts)
    kind, a, b = epi.code, epi.a, epi.b

    def run_span(p0, p1, ins, outs, workspace):
        bias, slope = epi.operands(ins)
        ws = workspace[:FLOAT * pad_floats].view(np.float32)
        q0, q1 = ranges[p0][0], ranges[p1 - 1][1]
        _dw3x3_padded(ins[0], wd if wd is not None else ins[1], bias, slope, outs[0], mult,
                      kind, a, b, ws[:(oh + 2) * sp + 1], ws[(oh + 2) * sp + 1:], q0, q1)
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=FLOAT * pad_floats,
                  row_block=1, inplace=True, parts=parts,  # each plane copied first
                  run_parts=run_parts)


@njit(cache=True, fastmath=CONTRACT)
def _dw3x3_padded(x, w, bias, slope, y, mult, kind, a, b, xp, yp, q0, q1):
    """Depthwise 3x3, stride 1, pad 1 for narrow planes, where the per-row
    and per-border work of _dw3x3_plane dominates: each plane is copied into
    xp with a zero row above and below and one zero column between rows
    (row stride W + 1, which pads both the right of a row and the left of the
    next), then every output pixel is one flat loop over xp (into yp, same
    stride; the zero-column positions are computed and dropped) and the rows
    are copied out. xp: (H + 2) * (W + 1) + 1 floats, yp: H * (W + 1). Only
    planes q0 .. q1 - 1 (plane q: image q // M, output channel q % M)."""
    h, wd = x.shape[2], x.shape[3]
    s_ = wd + 1
    span = h * s_ - 1
    xp[:] = 0
    leaky = kind == 2 or kind == 7
    m_ = y.shape[1]
    for plane in range(q0, q1):
        n, m = plane // m_, plane % m_
        xc, yc, k, bm = x[n, m // mult], y[n, m], w[m, 0], bias[m]
        sl = slope[m] if kind == 2 else np.float32(a)
        for i in range(h):
            src, dst = xc[i], xp[(i + 1) * s_ + 1:]
            for j in range(wd):
                dst[j] = src[j]
        w00, w01, w02, w10, w11, w12 = k[0, 0], k[0, 1], k[0, 2], k[1, 0], k[1, 1], k[1, 2]
        w20, w21, w22 = k[2, 0], k[2, 1], k[2, 2]
        t0, t1, t2 = xp[0:], xp[1:], xp[2:]
        m0, m1, m2 = xp[s_:], xp[s_ + 1:], xp[s_ + 2:]
        b0, b1, b2 = xp[2 * s_:], xp[2 * s_ + 1:], xp[2 * s_ + 2:]
        if leaky:
            for q in range(span):
                v = bm + (w00 * t0[q] + w01 * t1[q] + w02 * t2[q]
                          + w10 * m0[q] + w11 * m1[q] + w12 * m2[q]
                          + w20 * b0[q] + w21 * b1[q] + w22 * b2[q])
                yp[q] = v if v >= 0 else v * sl
        else:
            for q in range(span):
                yp[q] = bm + (w00 * t0[q] + w01 * t1[q] + w02 * t2[q]
                              + w10 * m0[q] + w11 * m1[q] + w12 * m2[q]
                              + w20 * b0[q] + w21 * b1[q] + w22 * b2[q])
        for i in range(h):
            src, dst = yp[i * s_:], yc[i]
            for j in range(wd):
                dst[j] = src[j]
        if not leaky and kind != 0:
            act_row(yc.reshape(h * wd), np.float32(0), slope[m], kind, a, b)


# --- conv.dw3x3.plane ---------------------------------------------------------

def dw3x3_plane_applies(spec) -> bool:
    return spec.geometry.is_dw3x3 and spec.geometry.w >= 2


def build_dw3x3_plane(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    wd, mult = _depthwise_weights(spec), g.multiplier
    zero = np.zeros(g.w, np.float32)  # the row above the first and below the last
    kind, a, b = epi.code, epi.a, epi.b
    plane_bytes = FLOAT * g.h * g.w if mult == 1 else 0  # the in-place copy of one plane
    planes = g.n * g.cout
    parts = parts_for(planes, NS_PER_TAP * 9 * g.ohw)
    ranges = split_ranges(planes, parts)

    def run_span(p0, p1, ins, outs, workspace, r0=0, r1=g.h):
        bias, slope = epi.operands(ins)
        w = wd if wd is not None else ins[1]
        q0, q1 = ranges[p0][0], ranges[p1 - 1][1]
        if plane_bytes and same_memory(ins[0], outs[0]):
            _dw3x3_inplace(outs[0], w, bias, slope, kind, a, b, zero,
                           workspace[:plane_bytes].view(np.float32).reshape(g.h, g.w),
                           q0, q1)
        else:
            _dw3x3(ins[0], w, bias, slope, outs[0], mult, kind, a, b, zero, r0, r1, q0, q1)

    run, run_parts = by_parts(run_span, parts)  # (ins, outs, workspace[, r0, r1])
    return Kernel(run, workspace=plane_bytes, row_block=1, inplace=mult == 1,
                  run_rows=run, parts=parts, run_parts=run_parts)


@njit(cache=True)
def _dw3x3(x, w, bias, slope, y, mult, kind, a, b, zero, r0, r1, q0, q1):
    """Depthwise 3x3, stride 1, pad 1 (QuickNet's) for W >= 2, plane by plane
    (planes q0 .. q1 - 1; plane q: image q // M, output channel q % M),
    output rows [r0, r1) only; zero: W zeros (the padding rows)."""
    m_ = y.shape[1]
    for q in range(q0, q1):
        n, m = q // m_, q % m_
        _dw3x3_plane(x[n, m // mult], y[n, m], w[m, 0], bias[m], slope[m], zero,
                     kind, a, b, r0, r1)


@njit(cache=True)
def _dw3x3_inplace(y, w, bias, slope, kind, a, b, zero, plane, q0, q1):
    """_dw3x3 over its own input (multiplier 1): each plane is copied to
    `plane`, then computed from there over itself (TinyEngine's in-place
    depthwise: one plane of scratch instead of a second tensor)."""
    m_ = y.shape[1]
    for q in range(q0, q1):
        n, m = q // m_, q % m_
        plane[:, :] = y[n, m]
        _dw3x3_plane(plane, y[n, m], w[m, 0], bias[m], slope[m], zero, kind, a, b,
                     0, plane.shape[0])


@njit(cache=True, fastmath=CONTRACT)
def _dw3x3_plane(xc, yc, k, bm, s, zero, kind, a, b, r0, r1):
    """Output rows [r0, r1) of one (H, W >= 2) plane. Rows 1 .. H-2 are one
    flat loop over the plane (long, so it vectorizes well even for narrow
    images; its first and last columns wrap around to the neighbouring rows
    and are redone after), then rows 0 and H-1 against a zero row.
    PRelu/LeakyRelu run inside the loops, other activations as one pass over
    the rows while they are in cache. A row is computed the same way whatever
    [r0, r1) is, so a band (qnrt.streaming) matches the whole plane."""
    h, wd = xc.shape
    e = wd - 1
    xf = xc.reshape(h * wd)
    yf = yc.reshape(h * wd)
    w00, w01, w02, w10, w11, w12 = k[0, 0], k[0, 1], k[0, 2], k[1, 0], k[1, 1], k[1, 2]
    w20, w21, w22 = k[2, 0], k[2, 1], k[2, 2]
    leaky = kind == 2 or kind == 7
    sl = s if kind == 2 else np.float32(a)
    lo, hi = max(r0, 1), min(r1, h - 1)  # the interior rows wanted
    if hi > lo:
        # o[j] is plane element lo * wd + 1 + j; every loop counts from 0, which
        # lets LLVM vectorize it (a loop from j0 > 0 stays scalar, 5x slower)
        j0, n = (lo - 1) * wd, (hi - lo) * wd - 2
        t0, t1, t2 = xf[j0:], xf[j0 + 1:], xf[j0 + 2:]
        m0, m1, m2 = xf[j0 + wd:], xf[j0 + wd + 1:], xf[j0 + wd + 2:]
        b0, b1, b2 = xf[j0 + 2 * wd:], xf[j0 + 2 * wd + 1:], xf[j0 + 2 * wd + 2:]
        o = yf[j0 + wd + 1:]
        if leaky:
            for j in range(n):
                v = bm + (w00 * t0[j] + w01 * t1[j] + w02 * t2[j]
                          + w10 * m0[j] + w11 * m1[j] + w12 * m2[j]
                          + w20 * b0[j] + w21 * b1[j] + w22 * b2[j])
                o[j] = v if v >= 0 else v * sl
        else:
            for j in range(n):
                o[j] = bm + (w00 * t0[j] + w01 * t1[j] + w02 * t2[j]
                             + w10 * m0[j] + w11 * m1[j] + w12 * m2[j]
                             + w20 * b0[j] + w21 * b1[j] + w22 * b2[j])
        for i in range(lo, hi):
            ra, rb, rc = xc[i - 1], xc[i], xc[i + 1]
            v0 = bm + (w01 * ra[0] + w02 * ra[1] + w11 * rb[0] + w12 * rb[1]
                       + w21 * rc[0] + w22 * rc[1])
            ve = bm + (w00 * ra[e - 1] + w01 * ra[e] + w10 * rb[e - 1] + w11 * rb[e]
                       + w20 * rc[e - 1] + w21 * rc[e])
            if leaky:
                v0 = v0 if v0 >= 0 else v0 * sl
                ve = ve if ve >= 0 else ve * sl
            yc[i, 0], yc[i, e] = v0, ve
    for i in (0, h - 1):
        if i < r0 or i >= r1:
            continue
        ra = xc[i - 1] if i > 0 else zero
        rb = xc[i]
        rc = xc[i + 1] if i + 1 < h else zero
        out = yc[i]
        out[0] = bm + (w01 * ra[0] + w02 * ra[1] + w11 * rb[0] + w12 * rb[1]
                       + w21 * rc[0] + w22 * rc[1])
        out[e] = bm + (w00 * ra[e - 1] + w01 * ra[e] + w10 * rb[e - 1] + w11 * rb[e]
                       + w20 * rc[e - 1] + w21 * rc[e])
        o, a0, a1, a2 = out[1:], ra[1:], rb[1:], rc[1:]
        c0, c1, c2 = ra[2:], rb[2:], rc[2:]
        for j in range(wd - 2):
            o[j] = bm + (w00 * ra[j] + w01 * a0[j] + w02 * c0[j]
                         + w10 * rb[j] + w11 * a1[j] + w12 * c1[j]
                         + w20 * rc[j] + w21 * a2[j] + w22 * c2[j])
        if leaky:
            act_row(out, np.float32(0), sl, 2, a, b)
    if not leaky and kind != 0:
        for i in range(r0, r1):
            act_row(yc[i], np.float32(0), s, kind, a, b)


# --- conv.depthwise.rows ------------------------------------------------------

def rows_applies(spec) -> bool:
    return spec.geometry.is_depthwise


def build_rows(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    wd, mult = _depthwise_weights(spec), g.multiplier
    (sh, sw), (dh, dw), (ph, pw) = g.strides, g.dilations, g.pads_begin
    kind, a, b = epi.code, epi.a, epi.b

    def run(ins, outs, workspace):
        bias, slope = epi.operands(ins)
        _depthwise(ins[0], wd if wd is not None else ins[1], bias, slope, outs[0], mult,
                   sh, sw, ph, pw, dh, dw, kind, a, b)
    return Kernel(run, row_block=1, band_pads=True)


@njit(cache=True)
def _depthwise(x, w, bias, slope, y, mult, sh, sw, ph, pw, dh, dw, kind, a, b):
    """Depthwise conv, output channel m reads input channel m // mult. Each
    output row accumulates kernel taps as axpys over the column range where
    the tap is inside the image (no per-pixel bounds checks)."""
    n_, c_, h, wd = x.shape
    m_, oh_, ow_ = y.shape[1], y.shape[2], y.shape[3]
    kh_, kw_ = w.shape[2], w.shape[3]
    for n in range(n_):
        for m in range(m_):
            xc, yc, wm, bm = x[n, m // mult], y[n, m], w[m, 0], bias[m]
            for oh in range(oh_):
                row = yc[oh]
                row[:] = bm
                for kh in range(kh_):
                    ih = oh * sh - ph + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    for kw in range(kw_):
                        wv, off = wm[kh, kw], kw * dw - pw
                        lo, hi = _valid(off, sw, ow_, wd)
                        dst, src = row[lo:hi], xr[lo * sw + off:]
                        if sw == 1:
                            for j in range(hi - lo):
                                dst[j] += wv * src[j]
                        else:
                            for j in range(hi - lo):
                                dst[j] += wv * src[j * sw]
                if kind != 0:
                    act_row(row, np.float32(0), slope[m], kind, a, b)
