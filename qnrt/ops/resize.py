"""Resize (opset 10: X, scales; 11+: X, roi, scales, sizes; opset 18 `axes`)
and Upsample (opset 7: `scales` attr; 9: scales input). Scales or sizes must
be constants.

Modes: nearest (any rank <= 6 after merging unscaled axes; nearest_mode
round_prefer_floor, round_prefer_ceil, floor, ceil) and linear (bilinear over
the last two axes; the others must keep their size). Coordinate modes:
half_pixel, half_pixel_symmetric, pytorch_half_pixel, align_corners,
asymmetric, tf_half_pixel_for_nn. Resize-10 and Upsample use asymmetric
coordinates and onnxruntime's legacy nearest rounding (ceil when shrinking,
floor when growing). Coordinates are computed in float32 in onnxruntime's
order (near-ties within TIE_EPS count as ties) so that nearest picks the same
pixels as onnxruntime. Like onnxruntime, an output of the input's shape is a
copy (whatever the scales), and every axis whose scale is 1 is copied (the
spec would shift such axes by half a pixel with tf_half_pixel_for_nn).

Not supported (GraphError): cubic, tf_crop_and_resize, antialias when
shrinking, keep_aspect_ratio_policy other than stretch.

Variants: resize.gather6 (nearest, and every same-shape copy: a per-axis
gather table), resize.bilinear (linear: 4 neighbours per output pixel),
resize.reference (one axis at a time, from the same per-axis tables: np.take
of the nearest indices, or the two linear taps weighted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import MAX_RANK, attr_str, const_of, fail, has_input, njit, norm_axis, numba_const
from ._gather import gather6, gather_plan
from ..validate import BOOL, FINITE, STR, Attr, Schema

COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
               "asymmetric", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
F = np.float32
# round_prefer_*: a coordinate this close to k + 0.5 is a tie (the float32
# rounding of an exact half, e.g. 1 / (2/7) = 3.4999998); measured on
# onnxruntime 1.32, which resolves such near-ties by the prefer rule too
TIE_EPS = 1e-6


def _settings(node):
    """(mode, coordinate mode, nearest mode, scales input index, sizes input index)."""
    legacy = node.op == "Upsample" or len(node.inputs) == 2  # Upsample, Resize-10
    mode = attr_str(node, "mode", "nearest") or "nearest"
    mode = "linear" if mode == "bilinear" else mode  # Upsample-1's spelling
    if mode not in ("nearest", "linear"):
        fail(node, f"unsupported mode '{mode}' (supported: nearest, linear)")
    if legacy:
        return mode, "asymmetric", "legacy", 1, None
    coord = attr_str(node, "coordinate_transformation_mode", "half_pixel") or "half_pixel"
    if coord not in COORD_MODES:
        fail(node, f"unsupported coordinate_transformation_mode '{coord}'")
    nearest = attr_str(node, "nearest_mode", "round_prefer_floor") or "round_prefer_floor"
    if nearest not in NEAREST_MODES:
        fail(node, f"unsupported nearest_mode '{nearest}'")
    policy = attr_str(node, "keep_aspect_ratio_policy", "stretch") or "stretch"
    if policy != "stretch":
        fail(node, f"keep_aspect_ratio_policy '{policy}' is not supported")
    return mode, coord, nearest, 2, 3


def _const_input(node, i, consts, what):
    """A const input as a flat array; None if omitted or empty."""
    if i is None or not has_input(node, i):
        return None
    c = const_of(node, i, consts)
    if c is None:
        fail(node, f"{what} must be a constant")
    c = np.asarray(c).reshape(-1)
    return c if c.size else None


def _geometry(node, x, consts):
    """(scales float32 per axis, output sizes, mode, coord, nearest)."""
    mode, coord, nearest, si, zi = _settings(node)
    r = len(x)
    axes = list(range(r))
    if "axes" in node.attrs and node.op == "Resize":
        axes = [norm_axis(node, int(a), r) for a in node.attrs["axes"]]
        if len(set(axes)) != len(axes):
            fail(node, f"repeated axes {axes}")
    if node.op == "Upsample" and len(node.inputs) < 2:
        scales = node.attrs.get("scales")
        scales = None if scales is None else np.asarray(scales, np.float64).reshape(-1)
    else:
        scales = _const_input(node, si, consts, "scales")
    sizes = _const_input(node, zi, consts, "sizes")
    if (scales is None) == (sizes is None):
        fail(node, "needs exactly one of scales and sizes (a non-empty constant)")
    given = scales if scales is not None else sizes
    if len(given) != len(axes):
        fail(node, f"{'scales' if sizes is None else 'sizes'} {given.tolist()} need "
                   f"{len(axes)} entries (axes {axes})")
    sc = [F(1)] * r
    out = list(x)
    for a, v in zip(axes, given):
        if sizes is not None:
            if int(v) < 1:
                fail(node, f"sizes {sizes.tolist()} must be positive")
            out[a] = int(v)
            sc[a] = F(F(out[a]) / F(x[a])) if x[a] else F(1)
        else:
            if not 0 < float(v) < math.inf:
                fail(node, f"scales {scales.tolist()} must be positive and finite")
            sc[a] = F(v)
            out[a] = int(np.floor(F(sc[a] * F(x[a]))))
    if any(o < 1 for o in out) or any(d < 1 for d in x):
        fail(node, f"resizing {tuple(x)} gives an empty output {tuple(out)}")
    if node.op == "Upsample" and any(s < 1 for s in sc):
        fail(node, f"Upsample scales {[float(s) for s in sc]} must be >= 1")
    if int(node.attrs.get("antialias", 0)) and mode == "linear" and any(s < 1 for s in sc):
        fail(node, "antialias when shrinking is not supported")
    if mode == "linear" and (r < 2 or any(o != d for o, d in zip(out[:-2], x[:-2]))
                             or any(s != 1 for s in sc[:-2])):
        fail(node, f"linear mode resizes only the last two axes (input {tuple(x)}, output "
                   f"{tuple(out)})")
    return sc, out, mode, coord, nearest


def _coords(n_in, n_out, scale, coord):
    """float32 source coordinate of every output coordinate along one axis."""
    o = np.arange(n_out, dtype=F)
    s, lo, li = F(scale), F(n_out), F(n_in)
    half, one = F(0.5), F(1)
    if coord == "half_pixel":
        return (o + half) / s - half
    if coord == "half_pixel_symmetric":  # onnxruntime: the last step in double
        adjustment = lo / (s * li)
        center = li / F(2)
        offset = center * (one - adjustment)
        return (np.float64(offset) + (o.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(F)
    if coord == "pytorch_half_pixel":
        return (o + half) / s - half if n_out > 1 else np.zeros(n_out, F)
    if coord == "tf_half_pixel_for_nn":
        return (o + half) / s
    if coord == "align_corners":
        return o * (li - one) / (lo - one) if n_out > 1 else np.zeros(n_out, F)
    return o / s  # asymmetric


def _nearest_table(n_in, n_out, scale, coord, nearest):
    if scale == 1 and n_in == n_out:  # as onnxruntime (tf_half_pixel_for_nn would shift)
        return np.arange(n_in, dtype=np.int64)
    x = _coords(n_in, n_out, scale, coord).astype(np.float64)  # exact
    away = np.sign(x) * np.floor(np.abs(x) + 0.5)  # std::round
    tie = np.abs(x - np.floor(x) - 0.5) <= TIE_EPS
    if nearest == "legacy":
        i = np.ceil(x) if scale < 1 else np.trunc(x)
    elif nearest == "round_prefer_floor":
        i = np.where(tie, np.floor(x), away)
    elif nearest == "round_prefer_ceil":
        i = np.where(tie, np.floor(x) + 1, away)
    elif nearest == "floor":
        i = np.floor(x)
    else:
        i = np.ceil(x)
    return np.clip(i, 0, n_in - 1).astype(np.int64)


def _linear_table(n_in, n_out, scale, coord):
    """(i0, i1, w0, w1): each output reads w0 * x[i0] + w1 * x[i1]."""
    if scale == 1 and n_in == n_out:  # copied, as in onnxruntime
        i = np.arange(n_in, dtype=np.int64)
        return i, i, np.ones(n_in, F), np.zeros(n_in, F)
    x = np.clip(_coords(n_in, n_out, scale, coord), F(0), F(n_in - 1)).astype(F)
    i0 = np.minimum(x.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    d0, d1 = np.abs(x - i0.astype(F)), np.abs(x - i1.astype(F))
    same = i0 == i1
    d0, d1 = np.where(same, F(0.5), d0), np.where(same, F(0.5), d1)
    return i0, i1, d1.astype(F), d0.astype(F)  # the weight of i0 is the distance to i1


def _merged_length(x, y) -> int:
    """An upper bound on gather_plan's table length: axes that keep their size
    may be merged with their neighbours (Python ints: no overflow)."""
    longest, run = 1, 1
    for n, o in zip(x, y):
        run = run * n if n == o else 1
        longest = max(longest, run, o)
    return longest


def infer(node, in_shapes, consts):
    x = in_shapes[0] if in_shapes else None
    if x is None:
        fail(node, "needs an input")
    return [tuple(_geometry(node, tuple(int(d) for d in x), consts)[1])]


@dataclass(frozen=True, eq=False)
class ResizeSpec:
    x: tuple
    y: tuple
    scales: tuple  # float32 per axis
    gather: bool  # nearest, or a same-shape copy (as in onnxruntime)
    tables: tuple  # per axis: gather: input index of each output index; linear: (i0, i1, w0, w1)
    plan: tuple | None  # gather: gather_plan(tables)
    cx: np.ndarray | None  # const input, flat


def analyse(node, in_shapes, out_shapes, consts):
    x = tuple(int(d) for d in in_shapes[0])
    sc, out, mode, coord, nearest = _geometry(node, x, consts)
    y = tuple(out)
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    cx = const_of(node, 0, consts)
    cx = numba_const(cx).reshape(-1) if cx is not None else None
    gather = mode == "nearest" or y == x  # (same shape: a copy, as in onnxruntime)
    if gather:
        tables = [_nearest_table(n, o, s if y != x else F(1), coord, nearest)
                  for n, o, s in zip(x, out, sc)]
        # gather6's table has MAX_RANK rows as long as the longest run of
        # same-size axes merged: built only while it is not larger than the
        # output (else the reference's per-axis tables do)
        plan = (gather_plan(node, x, tables)
                if 8 * MAX_RANK * _merged_length(x, y) <= 4 * max(int(np.prod(y, dtype=object)), 1 << 16)
                else None)
    else:
        tables, plan = [_linear_table(n, o, s, coord) for n, o, s in zip(x, out, sc)], None
    return ResizeSpec(x, y, tuple(sc), gather, tuple(tables), plan, cx)


# --- resize.gather6 ----------------------------------------------------------------

def _build_gather6(s: ResizeSpec) -> Kernel:
    (tab, xs, shape, lo, hi), cx = s.plan, s.cx
    size, xsize = int(np.prod(s.y)), int(np.prod(s.x))

    def run(ins, outs, workspace):
        gather6(cx if cx is not None else ins[0].reshape(xsize), xs, tab,
                outs[0].reshape(size), shape, 0.0, lo, hi)
    return Kernel(run)


# --- resize.bilinear ---------------------------------------------------------------

def _build_bilinear(s: ResizeSpec) -> Kernel:
    x, out, cx = s.x, s.y, s.cx
    xsize = int(np.prod(x))
    h, w, oh, ow = x[-2], x[-1], out[-2], out[-1]
    planes = int(np.prod(x[:-2]))
    ry, rx = s.tables[-2], s.tables[-1]

    def run(ins, outs, workspace):
        src = cx if cx is not None else ins[0].reshape(xsize)
        _bilinear(src.reshape(planes, h, w), outs[0].reshape(planes, oh, ow), *ry, *rx)
    return Kernel(run)


@njit(cache=True)
def _bilinear(x, y, y0, y1, wy0, wy1, x0, x1, wx0, wx1):
    """y[p, i, j] = sum of the 4 neighbours x[p, y0|y1[i], x0|x1[j]] weighted
    by wy * wx (the tables analyse built: indices inside x)."""
    for p in range(x.shape[0]):
        xp, yp = x[p], y[p]
        for i in range(y.shape[1]):
            r0, r1, a, b, row = xp[y0[i]], xp[y1[i]], wy0[i], wy1[i], yp[i]
            for j in range(y.shape[2]):
                u, v, c, d = x0[j], x1[j], wx0[j], wx1[j]
                row[j] = a * (c * r0[u] + d * r0[v]) + b * (c * r1[u] + d * r1[v])


# --- resize.reference ------------------------------------------------------------------

def _build_reference(s: ResizeSpec) -> Kernel:
    """One axis at a time: nearest takes each output's source index, linear
    weights its two source taps (separable, so n-linear); an axis that keeps
    its size with scale 1 is copied."""
    def run(ins, outs, workspace):
        v = np.asarray(ins[0], np.float32).reshape(s.x)
        for axis, (t, n, o, sc) in enumerate(zip(s.tables, s.x, s.y, s.scales)):
            if s.gather:
                v = np.take(v, t, axis=axis)
            elif not (sc == 1 and n == o):
                i0, i1, w0, w1 = t
                shape = [1] * v.ndim
                shape[axis] = -1
                with np.errstate(all="ignore"):
                    v = (w0.reshape(shape) * np.take(v, i0, axis=axis)
                         + w1.reshape(shape) * np.take(v, i1, axis=axis))
        outs[0][...] = v
    return Kernel(run)


_SCALES = Attr(lo=1e-30, hi=float(1 << 20), length=(1, 6))  # positive, finite
SCHEMAS = {
    "Resize": Schema({"mode": Attr(choices=("nearest", "linear", "bilinear", "cubic")),
                      "coordinate_transformation_mode": Attr(choices=COORD_MODES
                                                             + ("tf_crop_and_resize",)),
                      "nearest_mode": Attr(choices=NEAREST_MODES), "antialias": BOOL,
                      "exclude_outside": BOOL, "axes": Attr(lo=-6, hi=5, length=(1, 6),
                                                            distinct=True),
                      "keep_aspect_ratio_policy": Attr(choices=("stretch", "not_larger",
                                                                "not_smaller"), kind=STR),
                      "cubic_coeff_a": FINITE, "extrapolation_value": FINITE}),
    "Upsample": Schema({"mode": Attr(choices=("nearest", "linear", "bilinear")),
                        "scales": _SCALES}),
}

register(["Resize", "Upsample"], infer, [
    Variant("resize.gather6", _build_gather6, lambda s: s.gather and s.plan is not None),
    Variant("resize.bilinear", _build_bilinear, lambda s: not s.gather),
    Variant("resize.reference", _build_reference),
], analyse=analyse)
