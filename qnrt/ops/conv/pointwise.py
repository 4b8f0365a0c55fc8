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
from .._common import act_row, act_vec, epilogue, njit, same_memory

FLOAT = np.dtype(np.float32).itemsize
SKINNY_COLS = 4  # columns (N * H * W) the skinny kernel handles ...
SKINNY_MIN_WEIGHTS = 256 * 256  # ... where W has this many weights (else BLAS is as fast)
BATCH_MAX_HW = 32  # batches of images this small share one matmul ...
BATCH_COLS = 256  # ... of about this many columns
BATCH_WS_BYTES = 1024 * 1024  # ... within this workspace (gathered X and the product)
GEMM_BLOCK_COLS = 256  # columns per matmul of conv.pointwise.gemm (as fast as whole planes)


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
    ws_bytes = FLOAT * SKINNY_COLS * (cin + cout)
    kind, a, b = epi.code, epi.a, epi.b

    def run(ins, outs, workspace):
        bias, slope = epi.operands(ins)
        ws = workspace[:ws_bytes].view(np.float32)
        _pw_skinny(ins[0].reshape(n, cin, hw), w_ro, scale,
                   ws[:cin * SKINNY_COLS].reshape(SKINNY_COLS, cin),
                   ws[cin * SKINNY_COLS:].reshape(SKINNY_COLS, cout),
                   outs[0].reshape(n, cout, hw), bias, slope, kind, a, b)
    return Kernel(run, workspace=ws_bytes, row_block=1, band_pads=True)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _pw_skinny(x3, w, scale, xs, yt, y3, bias, slope, kind, a, b):
    """Y = W @ X for at most 4 columns in all (images x pixels): the time is one
    pass over W (Cout, Cin), read row by row in place (no copy, unlike BLAS's
    packing). W is float32, or int8 with dot products scaled by scale[co]
    (compiled once per weight dtype). X goes to xs (4, Cin), zero-padded; each
    output is a dot product of a W row with an xs row. Reassociating those sums
    lets them vectorize; the error stays at float32 rounding level (tested
    against the reference)."""
    n_, cin, hw = x3.shape
    cout = w.shape[0]
    ncols = n_ * hw
    xs[:] = 0
    for j in range(ncols):
        xn = x3[j // hw]
        p = j % hw
        for c in range(cin):
            xs[j, c] = xn[c, p]
    x0, x1, x2, x3_ = xs[0], xs[1], xs[2], xs[3]
    y0, y1, y2, y3r = yt[0], yt[1], yt[2], yt[3]
    for co in range(cout):
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
        y0[co] = s0 * sc
        y1[co] = s1 * sc
        y2[co] = s2 * sc
        y3r[co] = s3 * sc
    for j in range(ncols):
        row = yt[j]
        for k in range(cout):
            row[k] += bias[k]
        act_vec(row, slope, kind, a, b)
        yn = y3[j // hw]
        p = j % hw
        for k in range(cout):
            yn[k, p] = row[k]


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
    w2 = spec.weights.reshape(cout, cin) if spec.has_const_weights else None
    nb = _images_per_matmul(g)
    cols = nb * hw
    chunks = [(n0, min(nb, n - n0) * hw) for n0 in range(0, n, nb)]
    ws_bytes = FLOAT * cols * (cin + cout)
    kind, a, b = epi.code, epi.a, epi.b

    def run(ins, outs, workspace):
        x3, y3 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, hw)
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        ws = workspace[:ws_bytes].view(np.float32)
        for n0, c in chunks:  # (a short last chunk: smaller C-contiguous views)
            xv = ws[:cin * c].reshape(cin, c)
            yv = ws[cin * cols:cin * cols + cout * c].reshape(cout, c)
            _gather_images(x3, n0, xv)
            np.matmul(wm, xv, out=yv)
            _scatter_images(yv, y3, n0, bias, slope, kind, a, b)
    return Kernel(run, workspace=ws_bytes)


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
    w2 = spec.weights.reshape(cout, cin) if spec.has_const_weights else None
    kind, a, b, active = epi.code, epi.a, epi.b, epi.active
    rows = gemm_block_rows(w)
    blocks = [(r0 * w, min(g.h, r0 + rows) * w) for r0 in range(0, g.h, rows)]
    # over its own input (Cin == Cout): each block's input is copied out first
    scratch = FLOAT * cin * min(rows, g.h) * w if cin == cout else 0

    def run(ins, outs, workspace):
        x3, y3 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, hw)
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = epi.operands(ins)
        inplace = scratch and same_memory(ins[0], outs[0])
        for i in range(n):
            xi, yi = x3[i], y3[i]
            for t0, t1 in blocks:
                xb = xi[:, t0:t1]
                if inplace:
                    xb = _copy_block(xb, workspace[:FLOAT * cin * (t1 - t0)].view(np.float32)
                                     .reshape(cin, t1 - t0))
                np.matmul(wm, xb, out=yi[:, t0:t1])
                if active:
                    epilogue(yi, 0, cout, t0, t1, bias, slope, kind, a, b)
    return Kernel(run, workspace=scratch, row_block=rows, strided_input=True,
                  inplace=bool(scratch), band_pads=True)


def _copy_block(src, dst):
    np.copyto(dst, src)
    return dst
