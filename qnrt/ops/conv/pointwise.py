"""Pointwise (1x1, stride 1, one group) Conv variants: Y[n] = W (Cout, Cin) @ X[n] (Cin, HW).

- conv.pointwise.skinny: at most SKINNY_COLS columns in all (the late layers
  of a small image): the time is one pass over W, which BLAS's packing slows
  down, so a Numba kernel reads W once, in place (float32 or int8 weights);
- conv.pointwise.batched: a batch of small images, which one matmul per image
  would give too few columns and make re-read W: chunks of images are
  gathered into one (Cin, images * HW) matmul in the workspace;
- conv.pointwise.gemm: BLAS matmuls over blocks of whole rows (about
  GEMM_BLOCK_COLS columns each), each followed by the epilogue while the
  block is in cache. A BLAS result depends on the matrix extent, so fixed
  row blocks are also what makes a band of rows (qnrt.streaming) compute
  exactly what the whole run does.
"""
from __future__ import annotations

import numpy as np

from .. import Kernel
from .._common import (NS_PER_MAC, SGEMM, SGEMM_ILP64, act_row, act_vec, address, by_parts,
                       epilogue, floats_at, njit, parts_for, readonly, same_memory, sgemm,
                       sgemm_like_matmul, split_ranges)

FLOAT = np.dtype(np.float32).itemsize
SKINNY_COLS = 4  # columns (N * H * W) the skinny kernel handles ...
SKINNY_MIN_WEIGHTS = 256 * 256  # ... where W has this many weights (else BLAS is as fast)
BATCH_MAX_HW = 32  # batches of images this small share one matmul ...
BATCH_COLS = 256  # ... of about this many columns
BATCH_WS_BYTES = 1024 * 1024  # ... within this workspace (gathered X and the product)
GEMM_BLOCK_COLS = 256  # columns per matmul of conv.pointwise.gemm (as fast as whole planes)
NS_PER_WEIGHT = 0.17  # skinny's time per weight (one pass over W from cache), likewise


# --- conv.pointwise.skinny ----------------------------------------------------

def skinny_applies(spec) -> bool:
    g = spec.geometry
    return (g.is_pointwise and spec.has_const_weights
            and g.n * g.hw <= SKINNY_COLS)


def skinny_prefers(spec) -> bool:
    return spec.geometry.cin * spec.geometry.cout >= SKINNY_MIN_WEIGHTS


def build_skinny(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    n, cin, cout, hw = g.n, g.cin, g.cout, g.hw
    if spec.int8 is not None:  # int8 q with a scale per output channel
        w2, scale = spec.int8.q.reshape(cout, cin), spec.int8.scale
    else:
        w2, scale = spec.weights.reshape(cout, cin), np.ones(cout, np.float32)
    w_ro = w2.view()
    w_ro.flags.writeable = False  # one Numba specialization, mapped or not
    parts = parts_for(cout, NS_PER_WEIGHT * cin)  # each part: a range of W's rows
    ranges = split_ranges(cout, parts)
    range_table = np.array(ranges, np.int64).reshape(-1, 2)
    most = max(hi - lo for lo, hi in ranges)
    part_floats = SKINNY_COLS * (cin + most)  # X's copy and a part's product rows
    kind, a, b = epi.code, epi.a, epi.b

    def run_span(p0, p1, ins, outs, workspace):
        bias, slope = epi.operands(ins)
        ws = workspace[:FLOAT * part_floats].view(np.float32)
        _pw_skinny(ins[0].reshape(n, cin, hw), w_ro, scale,
                   ws[:cin * SKINNY_COLS].reshape(SKINNY_COLS, cin),
                   ws[cin * SKINNY_COLS:].reshape(SKINNY_COLS, most),
                   outs[0].reshape(n, cout, hw), bias, slope, kind, a, b, range_table, p0, p1)
    run, run_part = by_parts(run_span, parts)
    return Kernel(run, workspace=FLOAT * part_floats, row_block=1, band_pads=True,
                  parts=parts, run_part=run_part)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _pw_skinny(x3, w, scale, xs, yt, y3, bias, slope, kind, a, b, ranges, p0, p1):
    """Parts p0 .. p1 - 1 of Y = W @ X for at most 4 columns in all (images x
    pixels), part p being output channels ranges[p, 0] .. ranges[p, 1]: the
    time is one pass over those rows of W (Cout, Cin), read row by row in
    place (no copy, unlike BLAS's packing). W is float32, or int8 with dot
    products scaled by scale[co] (compiled once per weight dtype). X goes to
    xs (4, Cin), zero-padded; each output is a dot product of a W row with an
    xs row, into yt (4, >= the widest part's channels). Reassociating those
    sums lets them vectorize; the error stays at float32 rounding level
    (tested against the reference), and an output's arithmetic does not
    depend on the parts."""
    n_, cin, hw = x3.shape
    ncols = n_ * hw
    xs[:] = 0
    for j in range(ncols):
        xn = x3[j // hw]
        p = j % hw
        for c in range(cin):
            xs[j, c] = xn[c, p]
    x0, x1, x2, x3_ = xs[0], xs[1], xs[2], xs[3]
    y0, y1, y2, y3r = yt[0], yt[1], yt[2], yt[3]
    for part in range(p0, p1):
        co0, co1 = ranges[part, 0], ranges[part, 1]
        for k in range(co1 - co0):
            co = co0 + k
            r = w[co]
            s0 = np.float32(0)
            s1 = np.float32(0)
            s2 = np.float32(0)
            s3 = np.float32(0)
            for c in range(cin):
                v = np.float32(r[c])
                s0 += v * x0[c]
                s1 += v * x1[c]
                s2 += v * x2[c]
                s3 += v * x3_[c]
            sc = scale[co]
            y0[k] = s0 * sc
            y1[k] = s1 * sc
            y2[k] = s2 * sc
            y3r[k] = s3 * sc
        m = co1 - co0
        bias_p, slope_p = bias[co0:co1], slope[co0:co1]
        for j in range(ncols):
            row = yt[j][:m]
            for k in range(m):
                row[k] += bias_p[k]
            act_vec(row, slope_p, kind, a, b)
            yn = y3[j // hw]
            p = j % hw
            for k in range(m):
                yn[co0 + k, p] = row[k]


# --- conv.pointwise.batched ---------------------------------------------------

def _images_per_matmul(g) -> int:
    return min(g.n, max(1, BATCH_COLS // g.hw),
               max(1, BATCH_WS_BYTES // (FLOAT * g.hw * (g.cin + g.cout))))


def batched_applies(spec) -> bool:
    return spec.geometry.is_pointwise


def batched_prefers(spec) -> bool:
    g = spec.geometry
    return g.n > 1 and g.hw <= BATCH_MAX_HW and _images_per_matmul(g) > 1


def build_batched(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    n, cin, cout, hw = g.n, g.cin, g.cout, g.hw
    w2 = readonly(spec.weights.reshape(cout, cin)) if spec.has_const_weights else None
    nb = _images_per_matmul(g)
    cols = nb * hw
    chunks = [(n0, min(nb, n - n0) * hw) for n0 in range(0, n, nb)]
    chunk_table = np.array(chunks, np.int64).reshape(-1, 2)
    parts = parts_for(len(chunks), NS_PER_MAC * cin * cout * cols)
    ranges = split_ranges(len(chunks), parts)
    ws_bytes = FLOAT * cols * (cin + cout)  # the gathered X and product
    direct = bool(SGEMM) and sgemm_like_matmul(cout, min(c for _, c in chunks))
    kind, a, b = epi.code, epi.a, epi.b

    def run_span(p0, p1, ins, outs, workspace):
        x3, y3 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, hw)
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        ws = workspace[:ws_bytes].view(np.float32)
        if direct:  # the whole part in one call, without the GIL
            _batched(SGEMM, SGEMM_ILP64, wm, x3, y3, chunk_table, ranges[p0][0],
                     ranges[p1 - 1][1], ws, cols, bias, slope, kind, a, b)
            return
        for n0, c in chunks[ranges[p0][0]:ranges[p1 - 1][1]]:
            # (a short last chunk: smaller C-contiguous views)
            xv = ws[:cin * c].reshape(cin, c)
            yv = ws[cin * cols:cin * cols + cout * c].reshape(cout, c)
            _gather_images(x3, n0, xv)
            np.matmul(wm, xv, out=yv)
            _scatter_images(yv, y3, n0, bias, slope, kind, a, b)
    run, run_part = by_parts(run_span, parts)
    return Kernel(run, workspace=ws_bytes, parts=parts,
                  run_part=run_part)


@njit(cache=True)
def _batched(fn, ilp64, w, x3, y3, chunks, q0, q1, ws, cols, bias, slope, kind, a, b):
    """Chunks q0 .. q1 - 1 of conv.pointwise.batched in one call: gather the
    chunk's images into one (Cin, images * HW) matrix, one sgemm (as np.matmul
    calls it), scatter with the epilogue."""
    cout, cin = w.shape
    for q in range(q0, q1):
        n0, c = chunks[q, 0], chunks[q, 1]
        xv = ws[:cin * c].reshape((cin, c))
        yv = ws[cin * cols:cin * cols + cout * c].reshape((cout, c))
        _gather_images(x3, n0, xv)
        sgemm(fn, ilp64, cout, c, cin, w.ctypes.data, cin, xv.ctypes.data, c, yv.ctypes.data, c)
        _scatter_images(yv, y3, n0, bias, slope, kind, a, b)


@njit(cache=True)
def _gather_images(x, n0, xs):
    """xs[c, j * HW + p] = x[n0 + j, c, p] for the xs.shape[1] // HW images from n0."""
    hw = x.shape[2]
    for j in range(xs.shape[1] // hw):
        for c in range(x.shape[1]):
            src, dst = x[n0 + j, c], xs[c, j * hw:(j + 1) * hw]
            for p in range(hw):
                dst[p] = src[p]


@njit(cache=True)
def _scatter_images(ys, y, n0, bias, slope, kind, a, b):
    """y[n0 + j, c] = act(ys[c, j * HW:(j + 1) * HW] + bias[c]): the inverse of
    _gather_images with Conv's epilogue on each row while it is in L1."""
    hw = y.shape[2]
    for j in range(ys.shape[1] // hw):
        for c in range(y.shape[1]):
            src, dst = ys[c, j * hw:(j + 1) * hw], y[n0 + j, c]
            for p in range(hw):
                dst[p] = src[p]
            if kind != 0 or bias[c] != 0:
                act_row(dst, bias[c], slope[c], kind, a, b)


# --- conv.pointwise.gemm ------------------------------------------------------

def gemm_applies(spec) -> bool:
    return spec.geometry.is_pointwise


def gemm_block_rows(width: int) -> int:
    """Rows per matmul: fixed by the width alone, so a band of rows starting at
    a multiple of it makes the same BLAS calls as the whole plane; a power of
    two, so that bands halved by stride-2 pools stay whole blocks."""
    rows = 1
    while rows * width < GEMM_BLOCK_COLS:
        rows *= 2
    return rows


def build_gemm(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    n, cin, cout, hw, w = g.n, g.cin, g.cout, g.hw, g.w
    w2 = readonly(spec.weights.reshape(cout, cin)) if spec.has_const_weights else None
    kind, a, b, active = epi.code, epi.a, epi.b, epi.active
    rows = gemm_block_rows(w)
    blocks = [(i, r0 * w, min(g.h, r0 + rows) * w) for i in range(n) for r0 in range(0, g.h, rows)]
    block_table = np.array(blocks, np.int64).reshape(-1, 3)
    parts = parts_for(len(blocks), NS_PER_MAC * cin * cout * rows * w)
    ranges = split_ranges(len(blocks), parts)
    # over its own input (Cin == Cout): each block's input is copied out first
    scratch = FLOAT * cin * min(rows, g.h) * w if cin == cout else 0
    direct = bool(SGEMM) and sgemm_like_matmul(cout, min(t1 - t0 for _, t0, t1 in blocks))

    def run_span(p0, p1, ins, outs, workspace):
        x, y = ins[0], outs[0]
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        inplace = scratch and same_memory(x, y)
        ws = workspace[:scratch].view(np.float32) if inplace else None
        if direct:  # the whole part in one call, without the GIL
            _pw_gemm(SGEMM, SGEMM_ILP64, wm, address(x), x.strides[0] >> 2, x.strides[1] >> 2,
                     address(y), y.strides[0] >> 2, y.strides[1] >> 2, block_table,
                     ranges[p0][0], ranges[p1 - 1][1], ws if inplace else _NO_SCRATCH,
                     bias, slope, kind, a, b, active)
            return
        x3, y3 = x.reshape(n, cin, hw), y.reshape(n, cout, hw)
        for i, t0, t1 in blocks[ranges[p0][0]:ranges[p1 - 1][1]]:
            xb, yi = x3[i][:, t0:t1], y3[i]
            if inplace:
                xb = _copy_block(xb, ws[:cin * (t1 - t0)].reshape(cin, t1 - t0))
            np.matmul(wm, xb, out=yi[:, t0:t1])
            if active:
                epilogue(yi, 0, cout, t0, t1, bias, slope, kind, a, b)
    run, run_part = by_parts(run_span, parts)
    return Kernel(run, workspace=scratch, row_block=rows,
                  strided_input=True, inplace=bool(scratch), band_pads=True, parts=parts,
                  run_part=run_part)


_NO_SCRATCH = np.zeros(0, np.float32)


@njit(cache=True)
def _pw_gemm(fn, ilp64, w, x_at, x_image, x_ld, y_at, y_image, y_ld, blocks, q0, q1, scratch,
             bias, slope, kind, a, b, active):
    """Blocks q0 .. q1 - 1 of conv.pointwise.gemm: for each (image i, columns
    t0 .. t1) in blocks, Y[i][:, t0:t1] = W @ X[i][:, t0:t1] through numpy's
    cblas_sgemm at fn (as np.matmul calls it), then the epilogue while the
    block is in cache. X and Y are given by address (float32, NCHW, rows of an
    image contiguous: x_image and x_ld are the image and channel strides in
    floats), so bands of rows (strided views) need no copy. A non-empty
    scratch: Y is X's memory (in place), each block's input is copied there
    first."""
    cout, cin = w.shape
    for q in range(q0, q1):
        i, t0, t1 = blocks[q, 0], blocks[q, 1], blocks[q, 2]
        t = t1 - t0
        src, ld = x_at + 4 * (i * x_image + t0), x_ld
        if scratch.size:
            for c in range(cin):
                row, dst = floats_at(src + 4 * c * x_ld, t), scratch[c * t:(c + 1) * t]
                for j in range(t):
                    dst[j] = row[j]
            src, ld = scratch.ctypes.data, t
        dst_at = y_at + 4 * (i * y_image + t0)
        sgemm(fn, ilp64, cout, t, cin, w.ctypes.data, cin, src, ld, dst_at, y_ld)
        if active:
            for c in range(cout):
                act_row(floats_at(dst_at + 4 * c * y_ld, t), bias[c], slope[c], kind, a, b)


def _copy_block(src, dst):
    np.copyto(dst, src)
    return dst
