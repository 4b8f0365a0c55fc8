"""Conv (2-D, NCHW) with an optional fused bias + activation epilogue.

Variants, in the order they are tried (docs/architecture.md lists all ops'):

| variant                  | applies to                         | module       |
|--------------------------|------------------------------------|--------------|
| conv.pointwise.skinny    | 1x1, const W, <= 4 columns in all  | pointwise.py |
| conv.pointwise.batched   | 1x1 (preferred: batches of small)  | pointwise.py |
| conv.pointwise.tiled     | 1x1                                | pointwise.py |
| conv.pointwise.gemm      | 1x1                                | pointwise.py |
| conv.depthwise.nhwc      | depthwise, multiplier 1            | depthwise.py |
| conv.dw3x3.padded        | depthwise 3x3/s1/p1                | depthwise.py |
| conv.dw3x3.plane         | depthwise 3x3/s1/p1, W >= 2        | depthwise.py |
| conv.depthwise.rows      | depthwise                          | depthwise.py |
| conv.im2col              | any                                | im2col.py    |
| conv.reference           | any                                | reference.py |

int8 weights (attr `weights_int8` = 1, set by rewrite.quantize_pointwise_int8
for Session(weights="int8")): input 1 is an int8 constant q and input 4 a
float32 per-output-channel scale, W = scale[co] * q[co, ...]. The skinny
pointwise kernel reads q itself (4x fewer weight bytes); every other variant
runs on weights dequantized once at build time (correct, saves no memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ...graph import Node
from .. import RowWindow, Variant, register
from .._common import const_of, fail, numba_const
from . import depthwise, im2col, pointwise, reference
from .epilogue import Epilogue, conv_epilogue
from .geometry import ConvGeometry, conv_geometry, infer


@dataclass(frozen=True)
class Int8Weights:
    q: np.ndarray  # int8 (Cout, Cin/group, KH, KW)
    scale: np.ndarray  # float32 (Cout,)


@dataclass(eq=False)
class ConvSpec:
    """A Conv node with its geometry, epilogue and weights, validated."""
    node: Node
    consts: dict = field(repr=False)
    geometry: ConvGeometry
    epilogue: Epilogue
    int8: Int8Weights | None = field(repr=False)

    @property
    def has_const_weights(self) -> bool:
        return self.int8 is not None or const_of(self.node, 1, self.consts) is not None

    @cached_property
    def weights(self) -> np.ndarray | None:
        """W as float32 C-contiguous (dequantized once for int8), or None when
        it arrives at run time."""
        if self.int8 is not None:
            q, scale = self.int8.q, self.int8.scale
            return (q.astype(np.float32) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        w = const_of(self.node, 1, self.consts)
        return None if w is None else np.ascontiguousarray(w, dtype=np.float32)


def analyse(node, in_shapes, out_shapes, consts) -> ConvSpec:
    g = conv_geometry(node, in_shapes)
    infer(node, in_shapes, consts)
    if tuple(out_shapes[0]) != g.out_shape:
        fail(node, f"output shape {out_shapes[0]} != {g.out_shape}")
    epi = conv_epilogue(node, in_shapes, consts, g.cout)
    int8 = _int8_weights(node, g, consts) if node.attrs.get("weights_int8") else None
    return ConvSpec(node, consts, g, epi, int8)


def _int8_weights(node, g, consts) -> Int8Weights:
    """Input 1 (int8 q) and input 4 (float32 scale per output channel), checked:
    the Numba kernel does not bounds-check."""
    q, scale = const_of(node, 1, consts), const_of(node, 4, consts)
    if q is None or scale is None:
        fail(node, "weights_int8 needs a constant int8 weight (input 1) and a constant "
                   "scale (input 4)")
    q, scale = np.asarray(q), np.asarray(scale)
    if q.dtype != np.int8:
        fail(node, f"weights_int8: weight has dtype {q.dtype}, not int8")
    if tuple(q.shape) != (g.cout, g.cg, g.kh, g.kw):
        fail(node, f"weights_int8: weight shape {q.shape} does not match the geometry")
    if scale.dtype != np.float32 or scale.size != g.cout:
        fail(node, f"weights_int8: scale must be {g.cout} float32 values, not "
                   f"{scale.size} {scale.dtype}")
    return Int8Weights(np.ascontiguousarray(q), numba_const(scale.reshape(g.cout)))


VARIANTS = [
    Variant("conv.pointwise.skinny", pointwise.build_skinny, pointwise.skinny_applies,
            pointwise.skinny_prefers),
    Variant("conv.pointwise.batched", pointwise.build_batched, pointwise.batched_applies,
            pointwise.batched_prefers),
    Variant("conv.pointwise.tiled", pointwise.build_tiled, pointwise.tiled_applies,
            pointwise.tiled_prefers),
    Variant("conv.pointwise.gemm", pointwise.build_gemm, pointwise.gemm_applies),
    Variant("conv.depthwise.nhwc", depthwise.build_nhwc, depthwise.nhwc_applies,
            depthwise.nhwc_prefers),
    Variant("conv.dw3x3.padded", depthwise.build_dw3x3_padded, depthwise.dw3x3_applies,
            depthwise.dw3x3_padded_prefers),
    Variant("conv.dw3x3.plane", depthwise.build_dw3x3_plane, depthwise.dw3x3_plane_applies),
    Variant("conv.depthwise.rows", depthwise.build_rows, depthwise.rows_applies),
    Variant("conv.im2col", im2col.build_im2col),
    Variant("conv.reference", reference.build_reference),
]

def rows(spec: ConvSpec) -> RowWindow:
    g = spec.geometry
    return RowWindow((g.kh - 1) * g.dilations[0] + 1, g.strides[0], g.pads_begin[0],
                     pads=tuple(g.pads_begin) + tuple(g.pads_end), taps=g.cg * g.kh * g.kw)


register("Conv", infer, VARIANTS, analyse=analyse, rows=rows)
