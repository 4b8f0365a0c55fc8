"""Add, Sub, Mul, Div with numpy (multidirectional) broadcasting, rank <= 6."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import (bcast_strides, binary6, broadcast_shapes, c_strides, coalesce, const_of,
                      fail, numba_const)

OPS = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3}


def infer(node, in_shapes, consts):
    if len(in_shapes) != 2 or None in in_shapes:
        fail(node, "needs two inputs")
    return [broadcast_shapes(node, *in_shapes)]


def prepare(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    dims = coalesce(y, c_strides(y), bcast_strides(in_shapes[0], y),
                    bcast_strides(in_shapes[1], y))
    if dims is None:
        fail(node, f"broadcasting {in_shapes} needs more than 6 dims")
    shape, _, sa, sb = dims
    ca, cb = (const_of(node, i, consts) for i in (0, 1))
    ca = numba_const(ca).reshape(-1) if ca is not None else None
    cb = numba_const(cb).reshape(-1) if cb is not None else None
    op, size = OPS[node.op], int(np.prod(y))

    def run(ins, outs, workspace):
        a = ca if ca is not None else ins[0].reshape(-1)
        b = cb if cb is not None else ins[1].reshape(-1)
        binary6(a, sa, b, sb, outs[0].reshape(size), shape, op)
    return Kernel(run)


register(list(OPS), infer, prepare, inplace=True)
