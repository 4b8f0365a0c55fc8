"""NumPy helpers for the reference variants: plain array code that follows
the ONNX definitions, with no Numba (a reference runs where no kernel has
been compiled). Float32 in, float32 out; IEEE results (inf, NaN) where the
definition gives them."""
from __future__ import annotations

import numpy as np

F32 = np.float32


def activation(kind: str, v: np.ndarray, slope=None, a: float = 0.0, b: float = 0.0) -> np.ndarray:
    """ONNX activation `kind` ('' for none) of float32 v. slope broadcasts
    against v (PRelu); a, b are the parameters rewrite/_common use
    (Clip: min, max; HardSigmoid: alpha, beta; LeakyRelu: alpha)."""
    v = np.asarray(v, F32)
    one, zero = F32(1), F32(0)
    with np.errstate(all="ignore"):
        if kind == "":
            return v
        if kind == "Relu":
            return np.where(v <= 0, zero, v).astype(F32)  # NaN passes, as in ONNX Runtime
        if kind == "PRelu":
            return np.where(v >= 0, v, v * np.asarray(slope, F32)).astype(F32)
        if kind == "LeakyRelu":
            return np.where(v >= 0, v, v * F32(a)).astype(F32)
        if kind == "Clip":
            return np.minimum(np.maximum(v, F32(a)), F32(b)).astype(F32)
        if kind == "Sigmoid":
            return (one / (one + np.exp(-v))).astype(F32)
        if kind == "HardSigmoid":
            return np.maximum(zero, np.minimum(one, F32(a) * v + F32(b))).astype(F32)
        if kind == "HardSwish":
            return (v * np.maximum(zero, np.minimum(one, v / F32(6) + F32(0.5)))).astype(F32)
        if kind == "Tanh":
            return np.tanh(v).astype(F32)
        if kind == "SiLU":
            return (v / (one + np.exp(-v))).astype(F32)
    raise ValueError(f"no reference for activation '{kind}'")
