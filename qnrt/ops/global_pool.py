"""GlobalAveragePool and GlobalMaxPool: reduce every spatial dim to 1.

Variants: global_pool.rows (numpy's reductions over (N*C, spatial) rows),
global_pool.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import fail


def infer(node, in_shapes, consts):
    x = in_shapes[0]
    if x is None or len(x) < 3:
        fail(node, f"needs an (N, C, spatial...) input, got {x}")
    return [tuple(x[:2]) + (1,) * (len(x) - 2)]


@dataclass(frozen=True)
class GlobalPoolSpec:
    is_max: bool
    rank: int
    rows: int  # N * C
    size: int  # spatial elements per row


def analyse(node, in_shapes, out_shapes, consts):
    infer(node, in_shapes, consts)
    x = in_shapes[0]
    rows, size = int(x[0] * x[1]), int(np.prod(x[2:]))
    if size < 1:
        fail(node, f"empty spatial dims in {x}")
    return GlobalPoolSpec(node.op == "GlobalMaxPool", len(x), rows, size)


def _build_rows(s: GlobalPoolSpec) -> Kernel:
    rows, size = s.rows, s.size
    reduce = np.maximum.reduce if s.is_max else np.add.reduce
    scale = None if s.is_max else np.float32(1.0 / size)

    def run(ins, outs, workspace):  # numpy's reductions: vectorized, pairwise sums
        y = outs[0].reshape(rows)
        reduce(ins[0].reshape(rows, size), axis=1, out=y)
        if scale is not None:
            np.multiply(y, scale, out=y)
    return Kernel(run)


def _build_reference(s: GlobalPoolSpec) -> Kernel:
    """The max, or the mean (summed in float64), over all spatial dims."""
    axes = tuple(range(2, s.rank))

    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float32)
        with np.errstate(all="ignore"):
            if s.is_max:
                outs[0][...] = np.max(x, axis=axes, keepdims=True)
            else:
                outs[0][...] = np.mean(x, axis=axes, dtype=np.float64, keepdims=True)
    return Kernel(run)


register(["GlobalAveragePool", "GlobalMaxPool"], infer, [
    Variant("global_pool.rows", _build_rows),
    Variant("global_pool.reference", _build_reference),
], analyse=analyse)
