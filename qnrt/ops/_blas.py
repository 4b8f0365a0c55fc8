"""numpy's own cblas_sgemm, for kernels that call BLAS from Numba code.

A kernel that loops over matmuls in Python holds the GIL between them, so
its parts cannot run on several threads at once, and each call costs a few
microseconds. Kernels that call numpy's BLAS directly from Numba (through
qnrt.ops._numba_ext.sgemm) run a whole loop of matmuls and epilogues in one
call without the GIL, on the same BLAS routine np.matmul uses, so the
results are the same bits.

Found without importing numba (the `qnrt compile` build has none): the
address of numpy's cblas_sgemm and whether its integers are 64-bit. Where
numpy's BLAS is not a recognisable OpenBLAS, ADDRESS is 0 and the kernels
keep their np.matmul loops.
"""
from __future__ import annotations

import ctypes
import glob
import os

# numpy's bundled OpenBLAS (scipy-openblas), 64-bit integers first; then a
# plain OpenBLAS a system numpy may link.
_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True),
            ("scipy_cblas_sgemm", False), ("cblas_sgemm", False))


def _find() -> tuple[int, bool]:
    if os.environ.get("QNRT_NUMPY_MATMUL") == "1":  # the np.matmul loops, for comparison
        return 0, False
    try:
        import numpy as np
        folder = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        libs = sorted(glob.glob(os.path.join(folder, "*openblas*")))
        if not libs:
            return 0, False
        lib = ctypes.CDLL(libs[0])
    except (ImportError, OSError):
        return 0, False
    for name, ilp64 in _SYMBOLS:
        fn = getattr(lib, name, None)
        if fn is not None:
            return ctypes.cast(fn, ctypes.c_void_p).value or 0, ilp64
    return 0, False


ADDRESS, ILP64 = _find()
