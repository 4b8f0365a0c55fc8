"""ConvTranspose (1-D or 2-D, NCHW): group, strides, dilations, pads,
output_padding, output_shape, auto_pad, optional bias.

Pads follow the ONNX formulas (with output_shape or SAME_*: total padding
split with the odd pixel at the end for SAME_UPPER, at the beginning
otherwise). SAME_* sizes the output input * stride, like onnxruntime never
larger than the unpadded output (when kernel extent + output_padding <
stride). output_padding may be up to max(stride, dilation) - 1 (the spec's
bound; onnxruntime refuses output_padding >= stride).

Variants: conv_transpose.col2im (per image, group and tile of input pixels:
columns = W_g^T (Mg*KH*KW, Cg) @ X tile (Cg, T) in BLAS, the tile's columns
in the workspace, then col2im adds every column into the output, which
starts as the bias), conv_transpose.reference (the definition: each input
pixel adds x * W into the output window it maps to, in float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, attr_str, const_of, fail, has_input, njit, numba_const
from ._common import valid_range as _valid
from .conv.im2col import tile_columns
from ..validate import AUTO_PAD, MAX_DIM, Attr, Schema



def _geometry(node, in_shapes):
    x, w = in_shapes[0], in_shapes[1] if len(in_shapes) > 1 else None
    if x is None or w is None:
        fail(node, "needs inputs X and W")
    if len(x) not in (3, 4) or len(w) != len(x):
        fail(node, f"only 1-D and 2-D ConvTranspose (NCHW) are supported; X {x}, W {w}")
    r = len(x) - 2
    n, cin, spatial = int(x[0]), int(x[1]), [int(d) for d in x[2:]]
    group = int(node.attrs.get("group", 1))
    if group < 1 or cin % group:
        fail(node, f"group {group} must divide the input channels {cin}")
    if int(w[0]) != cin:
        fail(node, f"weight {w} needs {cin} input channels (X {x})")
    mg, kernel = int(w[1]), [int(d) for d in w[2:]]
    if attr_ints(node, "kernel_shape", kernel) != kernel:
        fail(node, f"kernel_shape {node.attrs['kernel_shape']} does not match weight {w}")
    strides = attr_ints(node, "strides", [1] * r)
    dil = attr_ints(node, "dilations", [1] * r)
    opad = attr_ints(node, "output_padding", [0] * r)
    if len(strides) != r or len(dil) != r or len(opad) != r:
        fail(node, f"strides {strides}, dilations {dil}, output_padding {opad} need {r} entries")
    if min(strides) < 1 or min(dil) < 1 or min(kernel) < 1:
        fail(node, f"strides {strides}, dilations {dil} and kernel {kernel} must be positive")
    if any(p < 0 or p >= max(s, d) for p, s, d in zip(opad, strides, dil)):
        fail(node, f"output_padding {opad} must be in [0, max(stride, dilation))")
    full = [s * (i - 1) + p + (k - 1) * d + 1
            for i, s, p, k, d in zip(spatial, strides, opad, kernel, dil)]
    auto = attr_str(node, "auto_pad", "NOTSET") or "NOTSET"
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        fail(node, f"unknown auto_pad '{auto}'")
    out_shape = attr_ints(node, "output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:  # input * stride, or the full output when that is smaller
            total = [max(0, f - i * s) for f, i, s in zip(full, spatial, strides)]
            out = [f - t for f, t in zip(full, total)]
        else:
            if len(out_shape) not in (r, r + 2):
                fail(node, f"output_shape {out_shape} needs {r} spatial sizes")
            out = out_shape[-r:]
            total = [f - o for f, o in zip(full, out)]
            if min(total) < 0:
                fail(node, f"output_shape {out_shape} is larger than the full output {full}")
        if auto == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
    elif auto == "VALID":
        begin, out = [0] * r, full
    else:
        pads = attr_ints(node, "pads", [0] * 2 * r)
        if len(pads) != 2 * r or min(pads) < 0:
            fail(node, f"pads {pads} must be {2 * r} non-negative ints")
        begin = pads[:r]
        out = [f - b - e for f, b, e in zip(full, pads[:r], pads[r:])]
    if min(out) < 1:
        fail(node, f"output would be empty: {out}")
    if r == 1:  # 1-D runs as 2-D with H = 1
        spatial, kernel, strides, dil, begin, out = ([1] + spatial, [1] + kernel, [1] + strides,
                                                     [1] + dil, [0] + begin, [1] + out)
    return dict(n=n, cin=cin, h=spatial[0], w=spatial[1], mg=mg, cout=mg * group, group=group,
                kh=kernel[0], kw=kernel[1], strides=strides, dil=dil, begin=begin,
                oh=out[0], ow=out[1], rank=r)


def _out_shape(g):
    sp = (g["ow"],) if g["rank"] == 1 else (g["oh"], g["ow"])
    return (g["n"], g["cout"]) + sp


def infer(node, in_shapes, consts):
    g = _geometry(node, in_shapes)
    if has_input(node, 2) and tuple(in_shapes[2]) != (g["cout"],):
        fail(node, f"bias shape {in_shapes[2]} must be ({g['cout']},)")
    return [_out_shape(g)]


@dataclass(frozen=True, eq=False)
class ConvTransposeSpec:
    n: int
    cin: int
    h: int  # input plane (H = 1 for 1-D)
    w: int
    mg: int  # output channels per group
    cout: int
    group: int
    kh: int
    kw: int
    strides: tuple
    dil: tuple
    begin: tuple  # pads (top, left): the output starts this far into the full output
    oh: int
    ow: int
    has_bias: bool
    w_c: np.ndarray | None  # const weight (Cin, Mg, KH, KW)
    b_c: np.ndarray | None  # const bias, flat


def analyse(node, in_shapes, out_shapes, consts):
    g = _geometry(node, in_shapes)
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    has_bias = has_input(node, 2)
    b_c = const_of(node, 2, consts) if has_bias else None
    return ConvTransposeSpec(g["n"], g["cin"], g["h"], g["w"], g["mg"], g["cout"], g["group"],
                             g["kh"], g["kw"], tuple(g["strides"]), tuple(g["dil"]),
                             tuple(g["begin"]), g["oh"], g["ow"], has_bias,
                             const_of(node, 1, consts),
                             numba_const(b_c).reshape(-1) if b_c is not None else None)


# --- conv_transpose.col2im ------------------------------------------------------------

def _build_col2im(s: ConvTransposeSpec) -> Kernel:
    n, cin, group, mg, cout = s.n, s.cin, s.group, s.mg, s.cout
    kh, kw, h, w, oh, ow = s.kh, s.kw, s.h, s.w, s.oh, s.ow
    (sh, sw), (dh, dw), (ph, pw) = s.strides, s.dil, s.begin
    cg, kk, hw = cin // group, mg * kh * kw, h * w
    tile = max(1, tile_columns(kk, hw))  # input pixels per tile, as Conv's im2col
    w_c = s.w_c
    # (group, Mg*KH*KW, Cg): the transposed weights of each group, contiguous
    wt_c = None if w_c is None else np.ascontiguousarray(
        np.asarray(w_c, np.float32).reshape(group, cg, kk).transpose(0, 2, 1))
    has_bias, b_c = s.has_bias, s.b_c
    zeros = np.zeros(cout, np.float32)

    def run(ins, outs, workspace):
        x3, y4 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, oh, ow)
        wt = wt_c if wt_c is not None else ins[1].reshape(group, cg, kk).transpose(0, 2, 1)
        bias = b_c if b_c is not None else (ins[2].reshape(-1) if has_bias else zeros)
        cols = workspace[:kk * tile * 4].view(np.float32)
        for i in range(n):
            yi = y4[i]
            _fill(yi, bias)
            for t0 in range(0, hw, tile):
                t = min(tile, hw - t0)
                col = cols[:kk * t].reshape(kk, t)
                for gi in range(group):
                    np.matmul(wt[gi], x3[i, gi * cg:(gi + 1) * cg, t0:t0 + t], out=col)
                    _col2im(col, yi, gi * mg, kh, kw, sh, sw, ph, pw, dh, dw, w, t0)
    return Kernel(run, workspace=kk * tile * 4)


@njit(cache=True)
def _fill(y, bias):
    """y[m] = bias[m] for y (M, OH, OW)."""
    for m in range(y.shape[0]):
        y[m] = bias[m]


@njit(cache=True)
def _col2im(col, y, m0, kh_, kw_, sh, sw, ph, pw, dh, dw, w_in, t0):
    """y[m0 + m, ih*sh - ph + a*dh, iw*sw - pw + b*dw] += col[(m, a, b), t] for
    the input pixels t0 + t = ih * w_in + iw, t < col.shape[1]; taps that land
    outside y are dropped (the padding)."""
    oh_, ow_ = y.shape[1], y.shape[2]
    t_ = col.shape[1]
    mg = col.shape[0] // (kh_ * kw_)
    k = 0
    for m in range(mg):
        ym = y[m0 + m]
        for a in range(kh_):
            for b in range(kw_):
                crow, off = col[k], b * dw - pw
                ih, iw0, t = t0 // w_in, t0 % w_in, 0
                while t < t_:  # one input-row segment at a time
                    seg = min(w_in - iw0, t_ - t)
                    oh = ih * sh - ph + a * dh
                    if oh >= 0 and oh < oh_:
                        start = iw0 * sw + off
                        lo, hi = _valid(start, sw, seg, ow_)
                        if hi > lo:
                            dst, src = ym[oh, start + lo * sw:], crow[t + lo:t + hi]
                            if sw == 1:
                                for j in range(hi - lo):
                                    dst[j] += src[j]
                            else:
                                for j in range(hi - lo):
                                    dst[j * sw] += src[j]
                    t += seg
                    ih += 1
                    iw0 = 0
                k += 1


# --- conv_transpose.reference ---------------------------------------------------------

def _build_reference(s: ConvTransposeSpec) -> Kernel:
    """y[n, g*Mg + m, ih*sh - ph + a*dh, iw*sw - pw + b*dw] += x[n, g*Cg + c, ih, iw]
    * w[g*Cg + c, m, a, b], over an uncropped canvas that is then cropped to
    the output (taps landing in the pads are dropped); plus the bias."""
    (sh, sw), (dh, dw), (ph, pw) = s.strides, s.dil, s.begin
    cg = s.cin // s.group
    # the canvas: every tap's position, and the whole output (output_padding)
    ch = max((s.h - 1) * sh + (s.kh - 1) * dh + 1, ph + s.oh)
    cw = max((s.w - 1) * sw + (s.kw - 1) * dw + 1, pw + s.ow)

    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float64).reshape(s.n, s.group, cg, s.h, s.w)
        w = np.asarray(ins[1], np.float64).reshape(s.group, cg, s.mg, s.kh, s.kw)
        canvas = np.zeros((s.n, s.group, s.mg, ch, cw), np.float64)
        with np.errstate(all="ignore"):
            for a in range(s.kh):
                for b in range(s.kw):
                    canvas[..., a * dh:a * dh + (s.h - 1) * sh + 1:sh,
                           b * dw:b * dw + (s.w - 1) * sw + 1:sw] += \
                        np.einsum("ngchw,gcm->ngmhw", x, w[..., a, b])
            y = canvas.reshape(s.n, s.cout, ch, cw)[:, :, ph:ph + s.oh, pw:pw + s.ow]
            if s.has_bias:
                y = y + np.asarray(ins[2], np.float64).reshape(1, s.cout, 1, 1)
            outs[0][...] = y.astype(np.float32).reshape(outs[0].shape)
    return Kernel(run)


_SPATIAL = (1, 2)  # 1-D and 2-D
SCHEMAS = {"ConvTranspose": Schema({
    "kernel_shape": Attr(lo=1, hi=MAX_DIM, length=_SPATIAL),
    "strides": Attr(lo=1, hi=MAX_DIM, length=_SPATIAL),
    "dilations": Attr(lo=1, hi=MAX_DIM, length=_SPATIAL),
    "pads": Attr(lo=0, hi=MAX_DIM, length=(2, 4)), "auto_pad": AUTO_PAD,
    "group": Attr(lo=1, hi=MAX_DIM), "output_padding": Attr(lo=0, hi=MAX_DIM, length=_SPATIAL),
    "output_shape": Attr(lo=1, hi=MAX_DIM, length=_SPATIAL)})}

register("ConvTranspose", infer, [
    Variant("conv_transpose.col2im", _build_col2im),
    Variant("conv_transpose.reference", _build_reference),
], analyse=analyse)
