"""Gather along one axis with constant indices (of any shape, a 0-d index
drops the axis; negative indices count from the end), as the attention necks
exporters write use it: q, k, v = Gather(qkv, 0 / 1 / 2, axis=0). Indices
computed at run time are refused (the runtime's tensors are float32).

Variants: gather.blocks (copies whole inner blocks: the input viewed as
(outer, axis, inner)), gather.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import const_of, fail, njit, norm_axis, numba_const


def _indices(node, n, consts):
    """The constant indices, int64, normalized to [0, n) (GraphError otherwise)."""
    c = const_of(node, 1, consts)
    if c is None:
        fail(node, "indices must be a constant")
    c = np.asarray(c)
    if c.dtype.kind not in "iu":
        fail(node, f"indices have dtype {c.dtype}; Gather takes int32/int64 indices")
    idx = c.astype(np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        fail(node, f"indices {idx.reshape(-1).tolist()[:8]} are outside [-{n}, {n})")
    return np.where(idx < 0, idx + n, idx)


def infer(node, in_shapes, consts):
    if len(in_shapes) != 2 or in_shapes[0] is None or in_shapes[1] is None:
        fail(node, "needs data and indices")
    x = tuple(in_shapes[0])
    if not x:
        fail(node, "data must have rank >= 1")
    axis = norm_axis(node, int(node.attrs.get("axis", 0)), len(x))
    return [x[:axis] + tuple(in_shapes[1]) + x[axis + 1:]]


@dataclass(frozen=True, eq=False)
class GatherSpec:
    x: tuple
    y: tuple
    shape3: tuple  # (outer, axis length, inner): the input viewed in 3-D
    index: np.ndarray  # flat int64, each in [0, axis length)
    cx: np.ndarray | None  # const data, flat


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    x = tuple(int(d) for d in in_shapes[0])
    axis = norm_axis(node, int(node.attrs.get("axis", 0)), len(x))
    index = _indices(node, x[axis], consts).reshape(-1)
    if tuple(np.asarray(const_of(node, 1, consts)).shape) != tuple(in_shapes[1]):
        fail(node, "indices' shape does not match their constant")
    shape3 = (int(np.prod(x[:axis])), x[axis], int(np.prod(x[axis + 1:])))
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    return GatherSpec(x, y, shape3, np.ascontiguousarray(index, np.int64), cx)


def _build_blocks(s: GatherSpec) -> Kernel:
    outer, n, inner = s.shape3
    index, cx, size = s.index, s.cx, int(np.prod(s.x))
    ysize = outer * index.size * inner

    def run(ins, outs, workspace):
        src = cx if cx is not None else ins[0].reshape(size)
        _gather_blocks(src, outs[0].reshape(ysize), index, outer, n, inner)
    return Kernel(run)


@njit(cache=True)
def _gather_blocks(x, y, index, outer, n, inner):
    """y[o, k, :] = x[o, index[k], :] over flat (outer, n, inner) x and
    (outer, len(index), inner) y; every index is in [0, n) (checked in analyse)."""
    m = index.size
    for o in range(outer):
        for k in range(m):
            src = x[(o * n + index[k]) * inner:]
            dst = y[(o * m + k) * inner:]
            for j in range(inner):
                dst[j] = src[j]


def _build_reference(s: GatherSpec) -> Kernel:
    """numpy.take along the axis (ONNX Gather's definition)."""
    outer, n, inner = s.shape3

    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float32).reshape(outer, n, inner)
        outs[0][...] = np.take(x, s.index, axis=1).reshape(s.y)
    return Kernel(run)


register("Gather", infer, [
    Variant("gather.blocks", _build_blocks),
    Variant("gather.reference", _build_reference),
], analyse=analyse)
