"""MatMul with numpy semantics (batch broadcasting, 1-D operands)."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
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


def prepare(node, in_shapes, out_shapes, consts):
    if tuple(out_shapes[0]) != infer(node, in_shapes, consts)[0]:
        fail(node, f"output shape {out_shapes[0]} does not match the inputs")
    ca, cb = (const_of(node, i, consts) for i in (0, 1))
    ca = None if ca is None else np.asarray(ca, np.float32)
    cb = None if cb is None else np.asarray(cb, np.float32)

    def run(ins, outs, workspace):
        np.matmul(ca if ca is not None else ins[0], cb if cb is not None else ins[1],
                  out=outs[0])
    return Kernel(run)


register("MatMul", infer, prepare)
