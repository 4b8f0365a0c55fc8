"""Numba's start-up: one probe answered before the first kernel compiles."""
from __future__ import annotations

import os
import sys

_done = False


def skip_scipy_probe():
    """Cold start: the first Numba dispatch in a process (even of a cached
    kernel) imports numba.np.arraymath, which probes for SciPy's BLAS by
    importing scipy.linalg (0.3-0.5 s and ~16 MiB when SciPy is installed),
    only to choose the inner product np.correlate/np.convolve use inside
    Numba code. qnrt's kernels use neither, so that one probe is answered
    "no BLAS" (as on a device without SciPy); numba.np.linalg.ensure_blas is
    restored at once, so np.dot & co. in Numba code keep using SciPy's BLAS.
    Skipped when SciPy's linalg is already loaded (the probe is then free) or
    with QNRT_NUMBA_BLAS_PROBE=1."""
    global _done
    if _done:
        return
    _done = True
    if (os.environ.get("QNRT_NUMBA_BLAS_PROBE") == "1" or "numba.np.arraymath" in sys.modules
            or "scipy.linalg" in sys.modules):
        return
    try:
        from numba.np import linalg
    except ImportError:
        return
    real = linalg.ensure_blas

    def no_blas():
        raise ImportError("qnrt: SciPy BLAS probe skipped")
    linalg.ensure_blas = no_blas
    try:
        import numba.np.arraymath as arraymath
        if getattr(arraymath, "ensure_blas", None) is no_blas:
            arraymath.ensure_blas = real
    except Exception:  # an optimization only: Numba reports real problems itself later
        pass
    finally:
        linalg.ensure_blas = real


