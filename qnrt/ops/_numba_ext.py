"""Numba extensions the kernels use: a call to numpy's cblas_sgemm at an
address given at run time, and a float32 array over raw memory. Imported only
where a kernel compiles with Numba (backend.jit_only): a process served by the
`qnrt compile` build never loads this module or numba."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic, register_jitable

_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS_ORDER, CBLAS_TRANSPOSE


def _sgemm_codegen(int_bits: int):
    def codegen(context, builder, sig, args):
        fn, m, n, k, a, lda, b, ldb, c, ldc = args
        i32, blasint = ir.IntType(32), ir.IntType(int_bits)
        f32, fptr = ir.FloatType(), ir.FloatType().as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, blasint, blasint, blasint, f32,
                                               fptr, blasint, fptr, blasint, f32, fptr, blasint])
        callee = builder.inttoptr(fn, fnty.as_pointer())

        def integer(v):
            return builder.trunc(v, blasint) if int_bits < 64 else v

        def pointer(v):
            return builder.inttoptr(v, fptr)
        builder.call(callee, [ir.Constant(i32, _ROW_MAJOR), ir.Constant(i32, _NO_TRANS),
                              ir.Constant(i32, _NO_TRANS), integer(m), integer(n), integer(k),
                              ir.Constant(f32, 1.0), pointer(a), integer(lda), pointer(b),
                              integer(ldb), ir.Constant(f32, 0.0), pointer(c), integer(ldc)])
        return context.get_dummy_value()
    return codegen


@intrinsic
def _sgemm64(typingctx, fn, m, n, k, a, lda, b, ldb, c, ldc):
    return types.void(types.int64, *[types.int64] * 9), _sgemm_codegen(64)


@intrinsic
def _sgemm32(typingctx, fn, m, n, k, a, lda, b, ldb, c, ldc):
    return types.void(types.int64, *[types.int64] * 9), _sgemm_codegen(32)


@register_jitable
def sgemm(fn, ilp64, m, n, k, a, lda, b, ldb, c, ldc):
    """C (m, n) = A (m, k) @ B (k, n): row-major float32 matrices at addresses
    a, b, c with leading dimensions (row strides, in floats) lda, ldb, ldc,
    through the cblas_sgemm at address fn (integers 64-bit if ilp64): the call
    np.matmul makes for the same operands."""
    if ilp64:
        _sgemm64(fn, m, n, k, a, lda, b, ldb, c, ldc)
    else:
        _sgemm32(fn, m, n, k, a, lda, b, ldb, c, ldc)


@intrinsic
def _voidptr(typingctx, address):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(types.int64), codegen


@register_jitable
def floats_at(address, count):
    """A 1-D float32 array over `count` floats at `address` (no copy)."""
    return carray(_voidptr(address), (count,), np.float32)
