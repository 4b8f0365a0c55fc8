"""Gemm: Y = alpha * A' @ B' + beta * C (A' = A or A.T, B' = B or B.T).

Variants: gemm.blas (numpy's matmul into Y, the scalars applied in place;
a const C is folded with beta once), gemm.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import broadcast_shapes, const_of, fail, has_input
from ..validate import BOOL, Schema


def infer(node, in_shapes, consts):
    if len(in_shapes) < 2 or in_shapes[0] is None or in_shapes[1] is None:
        fail(node, "needs inputs A and B")
    a, b = in_shapes[0], in_shapes[1]
    if len(a) != 2 or len(b) != 2:
        fail(node, f"A {a} and B {b} must be 2-D")
    m, k = a[::-1] if node.attrs.get("transA", 0) else a
    k2, n = b[::-1] if node.attrs.get("transB", 0) else b
    if k != k2:
        fail(node, f"inner dims differ: A {a}, B {b} (transA/transB applied)")
    if has_input(node, 2) and broadcast_shapes(node, in_shapes[2], (m, n)) != (m, n):
        fail(node, f"C {in_shapes[2]} does not broadcast to {(m, n)}")
    return [(m, n)]


@dataclass(frozen=True, eq=False)
class GemmSpec:
    alpha: float
    beta: float
    trans_a: bool
    trans_b: bool
    has_c: bool
    ca: np.ndarray | None  # const inputs
    cb: np.ndarray | None
    cc: np.ndarray | None


def analyse(node, in_shapes, out_shapes, consts):
    infer(node, in_shapes, consts)
    return GemmSpec(float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0)),
                    bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0)),
                    has_input(node, 2), *(const_of(node, i, consts) for i in (0, 1)),
                    const_of(node, 2, consts) if has_input(node, 2) else None)


def _build_blas(s: GemmSpec) -> Kernel:
    alpha, beta, ta, tb, ca, cb = s.alpha, s.beta, s.trans_a, s.trans_b, s.ca, s.cb
    use_c = s.has_c and beta != 0.0
    cc = s.cc if use_c else None
    if cc is not None:  # fold beta into the (small) bias once
        cc = (np.asarray(cc, np.float64) * beta).astype(np.float32)

    def run(ins, outs, workspace):
        a = ca if ca is not None else ins[0]
        b = cb if cb is not None else ins[1]
        y = outs[0]
        np.matmul(a.T if ta else a, b.T if tb else b, out=y)
        if cc is not None:
            if alpha != 1.0:
                np.multiply(y, np.float32(alpha), out=y)
            np.add(y, cc, out=y)
        elif use_c:  # run-time C: y = beta * (alpha / beta * AB + C), no temporaries
            if alpha != beta:
                np.multiply(y, np.float32(alpha / beta), out=y)
            np.add(y, ins[2], out=y)
            if beta != 1.0:
                np.multiply(y, np.float32(beta), out=y)
        elif alpha != 1.0:
            np.multiply(y, np.float32(alpha), out=y)
    return Kernel(run)


def _build_reference(s: GemmSpec) -> Kernel:
    """The definition in float64, then rounded."""
    def run(ins, outs, workspace):
        a, b = (np.asarray(v, np.float64) for v in ins[:2])
        a, b = a.T if s.trans_a else a, b.T if s.trans_b else b
        with np.errstate(all="ignore"):
            y = s.alpha * (a @ b)
            if s.has_c:
                y = y + s.beta * np.asarray(ins[2], np.float64)
            outs[0][...] = y.astype(np.float32)
    return Kernel(run)


SCHEMAS = {"Gemm": Schema({"transA": BOOL, "transB": BOOL})}

register("Gemm", infer, [
    Variant("gemm.blas", _build_blas),
    Variant("gemm.reference", _build_reference),
], analyse=analyse)
