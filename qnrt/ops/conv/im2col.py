"""conv.im2col: any group, window, stride, pad and dilation. im2col over
tiles of whole output rows in the workspace, one matmul per group and tile,
then the epilogue on the tile while it is in cache. The rows per tile depend
only on the window and the width, so a band of rows starting at a multiple
of them (qnrt.streaming) makes the same BLAS calls as the whole image."""
from __future__ import annotations

import numpy as np

from .. import Kernel
from .._common import (NS_PER_MAC, SGEMM, SGEMM_ILP64, act_row, address, by_parts, epilogue,
                       floats_at, njit, parts_for, readonly, sgemm, sgemm_like_matmul,
                       split_ranges)
from .._common import valid_range as _valid

FLOAT = np.dtype(np.float32).itemsize
WORKSPACE_BUDGET = 256 * 1024  # bytes of im2col columns per tile
MIN_TILE = 64  # columns; BLAS gets inefficient below this
MAX_TILE = 512  # columns: as fast as larger tiles, and short bands for streaming


def tile_columns(rows: int, columns: int) -> int:
    """Output columns per tile for an im2col of `rows` rows (also ConvTranspose's)."""
    return min(columns, max(MIN_TILE, WORKSPACE_BUDGET // (FLOAT * rows)))


def tile_rows(rows: int, width: int) -> int:
    """Whole output rows per im2col tile of `rows` im2col rows: a power of two
    (see pointwise.gemm_block_rows)."""
    cols = min(MAX_TILE, max(MIN_TILE, WORKSPACE_BUDGET // (FLOAT * rows)))
    n = 1
    while 2 * n * width <= cols:
        n *= 2
    return n


def build_im2col(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue
    n, cout, group, kh, kw, ow = g.n, g.cout, g.group, g.kh, g.kw, g.ow
    (sh, sw), (dh, dw), (ph, pw) = g.strides, g.dilations, g.pads_begin
    cg, mg, kk, ohw = g.cg, cout // group, g.cg * kh * kw, g.ohw
    block = tile_rows(kk, ow)
    tile = min(block, g.oh) * ow
    wg = readonly(spec.weights.reshape(group, mg, kk)) if spec.has_const_weights else None
    kind, a, b, active = epi.code, epi.a, epi.b, epi.active
    tiles = [(i, t0, min(tile, ohw - t0)) for i in range(n) for t0 in range(0, ohw, tile)]
    tile_table = np.array(tiles, np.int64).reshape(-1, 3)
    parts = parts_for(len(tiles), NS_PER_MAC * cout * kk * tile)
    ranges = split_ranges(len(tiles), parts)
    cols_bytes = FLOAT * kk * tile  # the columns of one tile
    direct = bool(SGEMM) and sgemm_like_matmul(mg, min(t for _, _, t in tiles))

    def run_span(p0, p1, ins, outs, workspace):
        x, y = ins[0], outs[0]
        wm = wg if wg is not None else ins[1].reshape(group, mg, kk)
        bias, slope = epi.operands(ins)
        cols = workspace[:cols_bytes].view(np.float32)
        if direct:  # the whole part in one call, without the GIL
            _im2col_tiles(SGEMM, SGEMM_ILP64, x, wm, address(y), y.strides[0] >> 2,
                          y.strides[1] >> 2, tile_table, ranges[p0][0], ranges[p1 - 1][1],
                          cols, cg, kh, kw, sh, sw, ph, pw, dh, dw, ow, bias, slope, kind,
                          a, b, active)
            return
        y3 = y.reshape(n, cout, ohw)
        for i, t0, t in tiles[ranges[p0][0]:ranges[p1 - 1][1]]:
            col = cols[:kk * t].reshape(kk, t)
            for gi in range(group):
                _im2col(x, i, gi * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, ow, t0, col)
                np.matmul(wm[gi], col, out=y3[i, gi * mg:(gi + 1) * mg, t0:t0 + t])
            if active:
                epilogue(y3[i], 0, cout, t0, t0 + t, bias, slope, kind, a, b)
    run, run_parts = by_parts(run_span, parts)
    return Kernel(run, workspace=cols_bytes, row_block=block,
                  band_pads=True, parts=parts, run_parts=run_parts)


@njit(cache=True)
def _im2col_tiles(fn, ilp64, x, w, y_at, y_image, y_ld, tiles, q0, q1, cols, cg, kh, kw, sh,
                  sw, ph, pw, dh, dw, ow, bias, slope, kind, a, b, active):
    """Tiles q0 .. q1 - 1 of conv.im2col in one call: per tile (image i,
    output columns t0 .. t0 + t) and group, the im2col columns, one sgemm into
    Y (by address: a band of rows may be a strided view; image and channel
    strides in floats), then the epilogue while the tile is in cache."""
    group, mg, kk = w.shape
    for q in range(q0, q1):
        i, t0, t = tiles[q, 0], tiles[q, 1], tiles[q, 2]
        col = cols[:kk * t].reshape((kk, t))
        for gi in range(group):
            _im2col(x, i, gi * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, ow, t0, col)
            sgemm(fn, ilp64, mg, t, kk, w.ctypes.data + 4 * gi * mg * kk, kk, col.ctypes.data, t,
                  y_at + 4 * (i * y_image + gi * mg * y_ld + t0), y_ld)
        if active:
            for c in range(group * mg):
                act_row(floats_at(y_at + 4 * (i * y_image + c * y_ld + t0), t), bias[c], slope[c],
                        kind, a, b)


@njit(cache=True)
def _im2col(x, n, c0, cg, kh_, kw_, sh, sw, ph, pw, dh, dw, ow_, t0, col):
    """col[k, t] = padded x[n, c0 + ci, ih, iw] for output columns t0 .. t0+T,
    k = (ci, kh, kw) in weight order."""
    h, wd = x.shape[2], x.shape[3]
    t_ = col.shape[1]
    k = 0
    for ci in range(cg):
        xc = x[n, c0 + ci]
        for kh in range(kh_):
            for kw in range(kw_):
                crow, off = col[k], kw * dw - pw
                oh, o0, t = t0 // ow_, t0 % ow_, 0
                while t < t_:  # one output-row segment at a time
                    seg = min(ow_ - o0, t_ - t)
                    dst = crow[t:t + seg]
                    ih = oh * sh - ph + kh * dh
                    if ih < 0 or ih >= h:
                        dst[:] = 0
                    else:
                        lo, hi = _valid(o0 * sw + off, sw, seg, wd)
                        dst[:lo] = 0
                        dst[hi:] = 0
                        d, src = dst[lo:hi], xc[ih, (o0 + lo) * sw + off:]
                        if sw == 1:
                            for j in range(hi - lo):
                                d[j] = src[j]
                        else:
                            for j in range(hi - lo):
                                d[j] = src[j * sw]
                    t += seg
                    oh += 1
                    o0 = 0
                k += 1
