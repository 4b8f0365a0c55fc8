"""MatMul with numpy semantics (batch broadcasting, 1-D operands).

Variants: matmul.blas (numpy's matmul into the output), matmul.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import broadcast_shapes, const_of, fail


def infer(node, in_shapes, consts):
    if len(in_shapes) != 2 or None in in_shapes:
        fail(node, "needs two inputs")
    a, b = (tuple(s) for s in in_shapes)
    if not a or not b:
        fail(node, "operands must have rank >= 1")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        fail(node, f"inner dims differ: {a} @ {b}")
    out = broadcast_shapes(node, a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return [out]


@dataclass(frozen=True, eq=False)
class MatMulSpec:
    ca: np.ndarray | None  # const operands (float32)
    cb: np.ndarray | None


def analyse(node, in_shapes, out_shapes, consts):
    if tuple(out_shapes[0]) != infer(node, in_shapes, consts)[0]:
        fail(node, f"output shape {out_shapes[0]} does not match the inputs")
    ca, cb = (const_of(node, i, consts) for i in (0, 1))
    return MatMulSpec(None if ca is None else np.asarray(ca, np.float32),
                      None if cb is None else np.asarray(cb, np.float32))


def _build_blas(s: MatMulSpec) -> Kernel:
    ca, cb = s.ca, s.cb

    def run(ins, outs, workspace):
        np.matmul(ca if ca is not None else ins[0], cb if cb is not None else ins[1],
                  out=outs[0])
    return Kernel(run)


def _build_reference(s: MatMulSpec) -> Kernel:
    """numpy.matmul's definition (ONNX MatMul's), in float64, then rounded."""
    def run(ins, outs, workspace):
        a, b = (np.asarray(v, np.float64) for v in ins[:2])
        with np.errstate(all="ignore"):
            outs[0][...] = np.matmul(a, b).astype(np.float32)
    return Kernel(run)


register("MatMul", infer, [
    Variant("matmul.blas", _build_blas),
    Variant("matmul.reference", _build_reference),
], analyse=analyse)
