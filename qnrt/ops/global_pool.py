"""GlobalAveragePool and GlobalMaxPool: reduce every spatial dim to 1."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import fail


def infer(node, in_shapes, consts):
    x = in_shapes[0]
    if x is None or len(x) < 3:
        fail(node, f"needs an (N, C, spatial...) input, got {x}")
    return [tuple(x[:2]) + (1,) * (len(x) - 2)]


def prepare(node, in_shapes, out_shapes, consts):
    infer(node, in_shapes, consts)
    x = in_shapes[0]
    rows, size = int(x[0] * x[1]), int(np.prod(x[2:]))
    if size < 1:
        fail(node, f"empty spatial dims in {x}")
    reduce = np.maximum.reduce if node.op == "GlobalMaxPool" else np.add.reduce
    scale = np.float32(1.0 / size) if node.op == "GlobalAveragePool" else None

    def run(ins, outs, workspace):  # numpy's reductions: vectorized, pairwise sums
        y = outs[0].reshape(rows)
        reduce(ins[0].reshape(rows, size), axis=1, out=y)
        if scale is not None:
            np.multiply(y, scale, out=y)
    return Kernel(run)


register(["GlobalAveragePool", "GlobalMaxPool"], infer, prepare)
