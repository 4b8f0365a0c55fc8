"""GlobalAveragePool and GlobalMaxPool: reduce every spatial dim to 1."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import fail, njit


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
    is_max = node.op == "GlobalMaxPool"

    def run(ins, outs, workspace):
        _reduce(ins[0].reshape(rows, size), outs[0].reshape(rows), is_max)
    return Kernel(run)


@njit
def _reduce(x, y, is_max):
    for r in range(x.shape[0]):
        row = x[r]
        if is_max:
            m = row[0]
            for v in row[1:]:
                m = max(m, v)
            y[r] = m
        else:
            s = 0.0  # float64 accumulation: planes can be large
            for v in row:
                s += v
            y[r] = s / row.size


register(["GlobalAveragePool", "GlobalMaxPool"], infer, prepare)
