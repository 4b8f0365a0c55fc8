"""Register-tiled float32 multiply-adds for Numba kernels, written as LLVM
vector code (Numba intrinsics), for the 1x1 convolutions' GEMM.

Numba's own loops keep a GEMM's accumulators in memory (it cannot prove the
output does not alias the inputs), so they never reach the FMA units' rate.
Each tile intrinsic computes an MR x (NV * LANES) tile of Y = W @ X with its MR * NV
accumulators in vector registers for the whole sum over k (6 x 16 floats: 12
of AVX2's 16 registers, 24 of NEON's 32), then adds the bias and applies
ReLU or PRelu before the one store. W and X are read in place: W's rows at any
stride (no packing, so a memory-mapped W is never copied), X's rows at
stride ldx.

Every output is the same chain of fused multiply-adds, acc = fma(w[r, k],
x[k, j], acc) for k = 0 .. K-1 from acc = 0, then + bias, then the
activation, whatever the tile's shape and position. So any split of the
columns, rows or channels (bands of rows, threads' parts, overlapping tiles)
gives the same bits, on every machine: unlike a BLAS call, whose blocking
depends on the matrix extents.

Imported only where kernels compile with Numba (backend.jit_only); the
`qnrt compile` build holds this code compiled in.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, register_jitable

from ..backend import JIT_OPTIONS
from ._numba_ext import floats_at

MR = 6  # rows of a full tile
NV = 2  # vectors per row of a wide tile
LANES = 8  # floats per vector: one AVX2 register, two NEON registers
WIDE = NV * LANES  # columns of a wide tile

# epilogue modes (what happens between the sum and the store)
RAW, BIAS, BIAS_RELU, BIAS_PRELU = 0, 1, 2, 3

_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()


def _fma_fn(module, vt):
    name = f"llvm.fma.v{vt.count}f32"
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(vt, [vt] * 3), name)


def _broadcast(builder, value, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))


def _tile_codegen(mr: int, nv: int, lanes: int):
    def codegen(context, builder, sig, args):
        w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode = args
        vt = ir.VectorType(_F32, lanes)
        fptr, vptr = _F32.as_pointer(), vt.as_pointer()
        fma = _fma_fn(builder.module, vt)

        def c(v):
            return ir.Constant(_I64, v)

        wp, xp, yp = (builder.inttoptr(v, fptr) for v in (w_at, x_at, y_at))
        zero = ir.Constant(vt, [0.0] * lanes)
        pre = builder.block
        loop = builder.append_basic_block("tile.k")
        done = builder.append_basic_block("tile.sum")
        builder.cbranch(builder.icmp_signed(">", k, c(0)), loop, done)

        builder.position_at_end(loop)  # one k: nv loads of X, mr broadcasts of W
        kk = builder.phi(_I64)
        acc = [[builder.phi(vt) for _ in range(nv)] for _ in range(mr)]
        xrow = builder.gep(xp, [builder.mul(kk, ldx)])
        xs = [builder.load(builder.bitcast(builder.gep(xrow, [c(lanes * v)]), vptr), align=4)
              for v in range(nv)]
        new = []
        for r in range(mr):
            wv = builder.load(builder.gep(wp, [builder.add(builder.mul(c(r), w_r), kk)]), align=4)
            wb = _broadcast(builder, wv, vt)
            new.append([builder.call(fma, [wb, xs[v], acc[r][v]]) for v in range(nv)])
        k_next = builder.add(kk, c(1))
        body_end = builder.block
        kk.add_incoming(c(0), pre)
        kk.add_incoming(k_next, body_end)
        for r in range(mr):
            for v in range(nv):
                acc[r][v].add_incoming(zero, pre)
                acc[r][v].add_incoming(new[r][v], body_end)
        builder.cbranch(builder.icmp_signed("<", k_next, k), loop, done)

        builder.position_at_end(done)
        sums = []
        for r in range(mr):
            row = []
            for v in range(nv):
                p = builder.phi(vt)
                p.add_incoming(zero, pre)
                p.add_incoming(new[r][v], body_end)
                row.append(p)
            sums.append(row)
        # the epilogue, one block per mode, then the one store of each vector
        bp, sp = builder.inttoptr(bias_at, fptr), builder.inttoptr(slope_at, fptr)
        end = builder.append_basic_block("tile.end")
        blocks = [builder.append_basic_block(f"tile.{name}")
                  for name in ("raw", "bias", "relu", "prelu")]
        switch = builder.switch(mode, blocks[RAW])
        for m in (BIAS, BIAS_RELU, BIAS_PRELU):
            switch.add_case(c(m), blocks[m])
        for m, block in enumerate(blocks):
            builder.position_at_end(block)
            for r in range(mr):
                if m != RAW:
                    bv = _broadcast(builder, builder.load(builder.gep(bp, [c(r)]), align=4), vt)
                if m == BIAS_PRELU:
                    sv = _broadcast(builder, builder.load(builder.gep(sp, [c(r)]), align=4), vt)
                for v in range(nv):
                    out = sums[r][v]
                    if m != RAW:
                        out = builder.fadd(out, bv)
                    if m == BIAS_RELU:  # 0 if t <= 0 else t (NaN stays NaN)
                        out = builder.select(builder.fcmp_ordered("<=", out, zero), zero, out)
                    elif m == BIAS_PRELU:  # t if t >= 0 else t * slope (NaN stays NaN)
                        out = builder.select(builder.fcmp_ordered(">=", out, zero), out,
                                             builder.fmul(out, sv))
                    dst = builder.gep(yp, [builder.add(builder.mul(c(r), ldy), c(lanes * v))])
                    builder.store(out, builder.bitcast(dst, vptr), align=4)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()
    return codegen


def _tile(mr: int, nv: int, lanes: int):
    @intrinsic
    def tile(typingctx, w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode):
        return types.void(*[types.int64] * 10), _tile_codegen(mr, nv, lanes)
    return tile


# (rows, vectors, lanes): wide tiles of 6 x 16, narrow ones of 6 x 8, and one
# column at a time for the few columns a narrow tile cannot cover
_WIDE = [_tile(r, NV, LANES) for r in range(1, MR + 1)]
_NARROW = [_tile(r, 1, LANES) for r in range(1, MR + 1)]
_COLUMN = [_tile(r, 1, 1) for r in range(1, MR + 1)]


def _dispatch(tiles):
    t1, t2, t3, t4, t5, t6 = tiles

    @register_jitable
    def run(mr, w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode):
        if mr == 6:
            t6(w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode)
        elif mr == 5:
            t5(w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode)
        elif mr == 4:
            t4(w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode)
        elif mr == 3:
            t3(w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode)
        elif mr == 2:
            t2(w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode)
        else:
            t1(w_at, w_r, x_at, ldx, k, y_at, ldy, bias_at, slope_at, mode)
    return run


_wide, _narrow, _column = _dispatch(_WIDE), _dispatch(_NARROW), _dispatch(_COLUMN)


# one function the kernels call: compiled once, not once per caller
@njit(**dict(JIT_OPTIONS, cache=True))
def gemm_tiles(k, rows, cols, w_at, ldw, x_at, ldx, y_at, ldy, bias_at, slope_at, kind, copy_at):
    """Y (rows, cols) = epilogue(W (rows, k) @ X (k, cols)), float32 matrices
    at addresses w_at, x_at, y_at with row strides ldw, ldx, ldy (in floats);
    bias and slope (float32, one per row) at bias_at, slope_at. kind is the
    activation's code (_common.ACT_CODES): none (0), Relu (1) and PRelu (2)
    run in registers with the bias; for any other the sum is stored as it is,
    and the caller adds the bias and applies it.

    Columns go in panels of WIDE, each through every row in tiles of MR rows.
    Where copy_at is 0, the last panel is moved back to end at `cols` (it
    recomputes a few columns, with the same bits), narrower matrices go in
    panels of LANES, and fewer than LANES columns one by one. Where copy_at
    is the address of k * WIDE floats, Y may be X's own memory: each panel of
    X is copied there before its columns of Y are written (a column of Y
    reads only its own column of X), and the panels do not overlap (the last
    few columns go in a panel of LANES and one by one)."""
    mode = kind + 1 if kind <= 2 else RAW  # ACT_CODES "", Relu, PRelu -> BIAS, BIAS_RELU, BIAS_PRELU
    j = 0
    while j < cols:
        rest = cols - j
        if rest >= WIDE:
            width = WIDE
        elif copy_at:
            width = LANES if rest >= LANES else 1
        elif cols >= WIDE:
            width, j = WIDE, cols - WIDE
        elif cols >= LANES:
            width, j = LANES, min(j, cols - LANES)
        else:
            width = 1
        xa, ld = x_at + 4 * j, ldx
        if copy_at:
            _copy_panel(xa, ldx, k, width, copy_at)
            xa, ld = copy_at, width
        for r in range(0, rows, MR):
            mr = min(MR, rows - r)
            wa, ya = w_at + 4 * r * ldw, y_at + 4 * (r * ldy + j)
            ba, sa = bias_at + 4 * r, slope_at + 4 * r
            if width == WIDE:
                _wide(mr, wa, ldw, xa, ld, k, ya, ldy, ba, sa, mode)
            elif width == LANES:
                _narrow(mr, wa, ldw, xa, ld, k, ya, ldy, ba, sa, mode)
            else:
                _column(mr, wa, ldw, xa, ld, k, ya, ldy, ba, sa, mode)
        j += width


@register_jitable
def _copy_panel(src_at, ld, k, width, dst_at):
    """dst[kk * width + c] = X[kk, c] for kk < k, c < width (X at src_at, row stride ld)."""
    src, dst = floats_at(src_at, (k - 1) * ld + width), floats_at(dst_at, k * width)
    for kk in range(k):
        row, out = src[kk * ld:kk * ld + width], dst[kk * width:(kk + 1) * width]
        for c in range(width):
            out[c] = row[c]
