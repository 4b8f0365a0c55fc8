"""Pointwise (1x1, stride 1, one group) Conv variants: Y[n] = W (Cout, Cin) @ X[n] (Cin, HW).

- conv.pointwise.skinny: at most SKINNY_COLS columns in all (the late layers
  of a small image): the time is one pass over W, which BLAS's packing slows
  down, so a Numba kernel reads W once, in place (float32 or int8 weights);
- conv.pointwise.batched: a batch of small images, which one matmul per image
  would give too few columns and make re-read W: chunks of images are
  gathered into one (Cin, images * HW) matmul in the workspace;
- conv.pointwise.tiled: register tiles of fused multiply-adds over W and X in
  place, with the bias and ReLU/PRelu applied in registers before the one
  store (qnrt.ops._fma_tiles): each output is the same chain of FMAs
  whatever the blocking, so any band of rows, and any split into parts,
  computes exactly what the whole run does;
- conv.pointwise.gemm: BLAS matmuls over blocks of whole rows (about
  GEMM_BLOCK_COLS columns each), each followed by the epilogue while the
  block is in cache. A BLAS result depends on the matrix extent, so fixed
  row blocks are also what makes a band of rows (qnrt.streaming) compute
  exactly what the whole run does.

Where a layer has too few blocks (or images) to split into the parts its
work asks for (the late layers: few columns, many channels), each block's
output channels also split, in ranges at multiples of CHANNEL_STEP. Each
range is its own sgemm call on any number of threads: what BLAS gives a row
of W can depend on the rows around it (OpenBLAS's Haswell kernel on AMD Zen
does), so ranges merged into one call on one thread would change the bits.
"""
from __future__ import annotations

import numpy as np

from .. import Kernel
from .._common import (NS_PER_MAC, SGEMM, SGEMM_ILP64, act_row, act_vec, address, by_parts,
                       epilogue, floats_at, gemm_tiles, njit, parts_for, readonly, same_memory,
                       sgemm, sgemm_like_matmul, split_ranges, work_parts)

FLOAT = np.dtype(np.float32).itemsize
SKINNY_COLS = 4  # columns (N * H * W) the skinny kernel handles ...
SKINNY_MIN_WEIGHTS = 256 * 256  # ... where W has this many weights (else BLAS is as fast)
BATCH_MAX_HW = 32  # batches of images this small share one matmul ...
BATCH_COLS = 256  # ... of about this many columns
BATCH_WS_BYTES = 1024 * 1024  # ... within this workspace (gathered X and the product)
GEMM_BLOCK_COLS = 256  # columns per matmul of conv.pointwise.gemm (as fast as whole planes)
NS_PER_WEIGHT = 0.17  # skinny's time per weight (one pass over W from cache), likewise
CHANNEL_STEP = 64  # output channels split at multiples of this ...
CHANNEL_MIN = 256  # ... into ranges of at least this many (each range re-packs X)


def channel_ranges(cout: int, pieces: int, ns_per_piece: float) -> list[tuple[int, int]]:
    """[co0, co1) ranges each of `pieces` splits its output channels into: one
    range, unless the pieces are fewer than the parts their work asks for."""
    want = work_parts(pieces * ns_per_piece)
    k = min(-(-want // pieces), cout // CHANNEL_MIN) if want > pieces else 1
    if k <= 1:
        return [(0, cout)]
    cuts = sorted({round(cout * j / k / CHANNEL_STEP) * CHANNEL_STEP for j in range(k)} | {cout})
    return list(zip(cuts, cuts[1:]))


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
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=FLOAT * part_floats, row_block=1, band_pads=True,
                  parts=parts, run_parts=run_parts)


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
    channels = channel_ranges(cout, len(chunks), NS_PER_MAC * cin * cout * cols)
    tasks = [(n0, c, co0, co1) for n0, c in chunks for co0, co1 in channels]
    task_table = np.array(tasks, np.int64).reshape(-1, 4)
    parts = parts_for(len(tasks), NS_PER_MAC * cin * cout * cols / len(channels))
    ranges = split_ranges(len(tasks), parts)
    ws_bytes = FLOAT * cols * (cin + cout)  # the gathered X and product
    direct = bool(SGEMM) and sgemm_like_matmul(min(hi - lo for lo, hi in channels),
                                               min(c for _, c in chunks))
    kind, a, b = epi.code, epi.a, epi.b

    def run_span(p0, p1, ins, outs, workspace):
        x3, y3 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, hw)
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        ws = workspace[:ws_bytes].view(np.float32)
        q0, q1 = ranges[p0][0], ranges[p1 - 1][1]
        if direct:  # the whole span in one call, without the GIL
            _batched(SGEMM, SGEMM_ILP64, wm, x3, y3, task_table, q0, q1, ws, cols,
                     bias, slope, kind, a, b)
            return
        gathered = None
        for n0, c, co0, co1 in tasks[q0:q1]:  # (a short last chunk: smaller views)
            xv = ws[:cin * c].reshape(cin, c)
            yv = ws[cin * cols:cin * cols + (co1 - co0) * c].reshape(co1 - co0, c)
            if gathered != n0:
                _gather_images(x3, n0, xv)
                gathered = n0
            np.matmul(wm[co0:co1], xv, out=yv)
            _scatter_images(yv, y3, n0, co0, bias, slope, kind, a, b)
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=ws_bytes, parts=parts,
                  run_parts=run_parts)


@njit(cache=True)
def _batched(fn, ilp64, w, x3, y3, tasks, q0, q1, ws, cols, bias, slope, kind, a, b):
    """Tasks q0 .. q1 - 1 of conv.pointwise.batched in one call, task q being
    images tasks[q, 0] .. (tasks[q, 1] columns) and output channels
    tasks[q, 2] .. tasks[q, 3]: gather the chunk's images into one (Cin,
    images * HW) matrix, one sgemm per task (as np.matmul calls it), scatter
    with the epilogue."""
    cout, cin = w.shape
    gathered = -1
    for q in range(q0, q1):
        n0, c, co0, co1 = tasks[q, 0], tasks[q, 1], tasks[q, 2], tasks[q, 3]
        xv = ws[:cin * c].reshape((cin, c))
        yv = ws[cin * cols:cin * cols + (co1 - co0) * c].reshape((co1 - co0, c))
        if gathered != n0:
            _gather_images(x3, n0, xv)
            gathered = n0
        sgemm(fn, ilp64, co1 - co0, c, cin, w.ctypes.data + 4 * co0 * cin, cin, xv.ctypes.data,
              c, yv.ctypes.data, c)
        _scatter_images(yv, y3, n0, co0, bias, slope, kind, a, b)


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
def _scatter_images(ys, y, n0, co0, bias, slope, kind, a, b):
    """y[n0 + j, co0 + k] = act(ys[k, j * HW:(j + 1) * HW] + bias[co0 + k]):
    the inverse of _gather_images for output channels co0 .. co0 +
    ys.shape[0], with Conv's epilogue on each whole row of ys first (one
    vectorized pass of images * HW values, not one short pass per image)."""
    hw = y.shape[2]
    for k in range(ys.shape[0]):
        c = co0 + k
        row = ys[k]
        if kind != 0 or bias[c] != 0:
            act_row(row, bias[c], slope[c], kind, a, b)
        for j in range(ys.shape[1] // hw):
            src, dst = row[j * hw:(j + 1) * hw], y[n0 + j, c]
            for p in range(hw):
                dst[p] = src[p]


# --- conv.pointwise.tiled -----------------------------------------------------

TILED_FEW_COLUMNS = 64  # planes of at most this many pixels go tiled ...
TILED_SMALL_PLANE, TILED_SMALL_CIN = 256, 256  # ... and these, with this many input channels
TILED_PANEL = 16  # columns of _fma_tiles' wide panel (an in-place step copies one at a time)


def tiled_applies(spec) -> bool:
    return spec.geometry.is_pointwise


def tiled_prefers(spec) -> bool:
    """Few columns a plane (BLAS would pack W for each call), or small planes
    of few input channels: measured on QuickNet's layers against
    conv.pointwise.gemm; larger planes stay with BLAS, whose packing keeps
    them in cache better."""
    g = spec.geometry
    return g.hw <= TILED_FEW_COLUMNS or (g.hw <= TILED_SMALL_PLANE and g.cin <= TILED_SMALL_CIN)


def build_tiled(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    cin, cout = g.cin, g.cout
    w2 = readonly(spec.weights.reshape(cout, cin)) if spec.has_const_weights else None
    kind, a, b = epi.code, epi.a, epi.b
    # blocks of rows only to split into parts: any band computes exactly
    _, _, channels, task_table, parts, ranges = _block_tasks(g)
    # over its own input (Cin == Cout): one column panel of X copied at a time;
    # not where channels split (a range would overwrite what another still reads)
    scratch = FLOAT * cin * TILED_PANEL if cin == cout and len(channels) == 1 else 0

    def run_span(p0, p1, ins, outs, workspace):
        x, y = ins[0], outs[0]
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        copy_at = address(workspace) if scratch and same_memory(x, y) else 0
        _pw_tiled(wm, address(x), x.strides[0] >> 2, x.strides[1] >> 2, address(y),
                  y.strides[0] >> 2, y.strides[1] >> 2, task_table, ranges[p0][0],
                  ranges[p1 - 1][1], bias, slope, kind, a, b, copy_at)
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=scratch, row_block=1, strided_input=True, inplace=bool(scratch),
                  band_pads=True, parts=parts, run_parts=run_parts)


@njit(cache=True)
def _pw_tiled(w, x_at, x_image, x_ld, y_at, y_image, y_ld, tasks, q0, q1, bias, slope, kind,
              a, b, copy_at):
    """Tasks q0 .. q1 - 1 of conv.pointwise.tiled: for each (image i, columns
    t0 .. t1, output channels co0 .. co1), Y[i][co0:co1, t0:t1] =
    act(W[co0:co1] @ X[i][:, t0:t1] + bias) by gemm_tiles, X and Y by address
    as in _pw_gemm (copy_at: scratch for a step over its own input, else 0).
    Activations other than ReLU and PRelu: one pass over the block's rows
    after."""
    cin = w.shape[1]
    for q in range(q0, q1):
        i, t0, t1, co0, co1 = tasks[q, 0], tasks[q, 1], tasks[q, 2], tasks[q, 3], tasks[q, 4]
        t = t1 - t0
        dst_at = y_at + 4 * (i * y_image + t0)
        gemm_tiles(cin, co1 - co0, t, w.ctypes.data + 4 * co0 * cin, cin,
                   x_at + 4 * (i * x_image + t0), x_ld, dst_at + 4 * co0 * y_ld, y_ld,
                   bias.ctypes.data + 4 * co0, slope.ctypes.data + 4 * co0, kind, copy_at)
        if kind > 2:
            for c in range(co0, co1):
                act_row(floats_at(dst_at + 4 * c * y_ld, t), bias[c], slope[c], kind, a, b)


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


def _block_tasks(g):
    """The (image, column t0, t1, channel co0, co1) tasks of a 1x1 layer in
    blocks of whole rows (gemm_block_rows), each block's output channels
    split where the blocks are fewer than the parts their work asks for, and
    the parts they make: (rows, blocks, channels, task table, parts, ranges)."""
    rows, w = gemm_block_rows(g.w), g.w
    blocks = [(i, r0 * w, min(g.h, r0 + rows) * w) for i in range(g.n) for r0 in range(0, g.h, rows)]
    block_ns = NS_PER_MAC * g.cin * g.cout * min(rows, g.h) * w
    channels = channel_ranges(g.cout, len(blocks), block_ns)
    tasks = [(i, t0, t1, co0, co1) for i, t0, t1 in blocks for co0, co1 in channels]
    parts = parts_for(len(tasks), block_ns / len(channels))
    return (rows, blocks, channels, np.array(tasks, np.int64).reshape(-1, 5), parts,
            split_ranges(len(tasks), parts))


def build_gemm(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    n, cin, cout, hw, w = g.n, g.cin, g.cout, g.hw, g.w
    w2 = readonly(spec.weights.reshape(cout, cin)) if spec.has_const_weights else None
    kind, a, b, active = epi.code, epi.a, epi.b, epi.active
    rows, blocks, channels, task_table, parts, ranges = _block_tasks(g)
    tasks = task_table.tolist()
    # over its own input (Cin == Cout): each block's input is copied out first;
    # not where channels split (a range would overwrite what another still reads)
    scratch = FLOAT * cin * min(rows, g.h) * w if cin == cout and len(channels) == 1 else 0
    direct = bool(SGEMM) and sgemm_like_matmul(min(hi - lo for lo, hi in channels),
                                               min(t1 - t0 for _, t0, t1 in blocks))

    def run_span(p0, p1, ins, outs, workspace):
        x, y = ins[0], outs[0]
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        inplace = scratch and same_memory(x, y)
        ws = workspace[:scratch].view(np.float32) if inplace else None
        q0, q1 = ranges[p0][0], ranges[p1 - 1][1]
        if direct:  # the whole span in one call, without the GIL
            _pw_gemm(SGEMM, SGEMM_ILP64, wm, address(x), x.strides[0] >> 2, x.strides[1] >> 2,
                     address(y), y.strides[0] >> 2, y.strides[1] >> 2, task_table,
                     q0, q1, ws if inplace else _NO_SCRATCH,
                     bias, slope, kind, a, b, active)
            return
        x3, y3 = x.reshape(n, cin, hw), y.reshape(n, cout, hw)
        for i, t0, t1, co0, co1 in tasks[q0:q1]:
            xb, yi = x3[i][:, t0:t1], y3[i]
            if inplace:
                xb = _copy_block(xb, ws[:cin * (t1 - t0)].reshape(cin, t1 - t0))
            np.matmul(wm[co0:co1], xb, out=yi[co0:co1, t0:t1])
            if active:
                epilogue(yi, co0, co1, t0, t1, bias, slope, kind, a, b)
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=scratch, row_block=rows,
                  strided_input=True, inplace=bool(scratch), band_pads=True, parts=parts,
                  run_parts=run_parts)


_NO_SCRATCH = np.zeros(0, np.float32)


@njit(cache=True)
def _pw_gemm(fn, ilp64, w, x_at, x_image, x_ld, y_at, y_image, y_ld, tasks, q0, q1, scratch,
             bias, slope, kind, a, b, active):
    """Tasks q0 .. q1 - 1 of conv.pointwise.gemm: for each (image i, columns
    t0 .. t1, output channels co0 .. co1) in tasks, Y[i][co0:co1, t0:t1] =
    W[co0:co1] @ X[i][:, t0:t1] through numpy's cblas_sgemm at fn (as
    np.matmul calls it; one call per task), then the epilogue while the block
    is in cache. X and Y are given by
    address (float32, NCHW, rows of an image contiguous: x_image and x_ld are
    the image and channel strides in floats), so bands of rows (strided views)
    need no copy. A non-empty scratch: Y is X's memory (in place, one channel
    range), each block's input is copied there first."""
    cout, cin = w.shape
    for q in range(q0, q1):
        i, t0, t1, co0, co1 = tasks[q, 0], tasks[q, 1], tasks[q, 2], tasks[q, 3], tasks[q, 4]
        t = t1 - t0
        src, ld = x_at + 4 * (i * x_image + t0), x_ld
        if scratch.size:
            for c in range(cin):
                row, dst = floats_at(src + 4 * c * x_ld, t), scratch[c * t:(c + 1) * t]
                for j in range(t):
                    dst[j] = row[j]
            src, ld = scratch.ctypes.data, t
        dst_at = y_at + 4 * (i * y_image + t0)
        sgemm(fn, ilp64, co1 - co0, t, cin, w.ctypes.data + 4 * co0 * cin, cin, src, ld,
              dst_at + 4 * co0 * y_ld, y_ld)
        if active:
            for c in range(co0, co1):
                act_row(floats_at(dst_at + 4 * c * y_ld, t), bias[c], slope[c], kind, a, b)


def _copy_block(src, dst):
    np.copyto(dst, src)
    return dst
