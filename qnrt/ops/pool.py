"""MaxPool and AveragePool over 2-D (NCHW) windows."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import attr_ints, fail, njit, valid_range as _valid, window_geometry


# A max over a window that lies entirely in the padding: ONNX Runtime (and so
# qnrt) answers the lowest finite float32, not -inf.
LOWEST = np.float32(np.finfo(np.float32).min)


def _geometry(node, in_shapes):
    x = in_shapes[0]
    if x is None or len(x) != 4:
        fail(node, f"only 2-D pooling (NCHW) is supported, input {x}")
    if len(node.outputs) > 1 and any(node.outputs[1:]):
        fail(node, "the Indices output is not supported")
    kernel = attr_ints(node, "kernel_shape")
    if kernel is None:
        fail(node, "kernel_shape is required")
    strides = attr_ints(node, "strides", [1] * len(kernel))
    dil = attr_ints(node, "dilations", [1] * len(kernel))
    ceil = bool(node.attrs.get("ceil_mode", 0))
    begin, end, out = window_geometry(node, list(x[2:]), kernel, strides, dil, ceil)
    if any(p >= k for p, k in zip(begin + end, kernel + kernel)):
        fail(node, f"pads {begin + end} must be smaller than the kernel {kernel}")
    if min(out) < 1:
        fail(node, f"output would be empty: {out}")
    return kernel, strides, dil, begin, end, out


def infer(node, in_shapes, consts):
    out = _geometry(node, in_shapes)[-1]
    return [(in_shapes[0][0], in_shapes[0][1], out[0], out[1])]


def _counts(n, out, k, s, d, pb, pe, include_pad):
    """Taps of each window (along one dim) inside the image, or inside the
    padded image with count_include_pad; windows are separable, so an
    AveragePool divisor is count_h[oh] * count_w[ow]."""
    lo, hi = (-pb, n + pe) if include_pad else (0, n)
    start = np.arange(out)[:, None] * s - pb + np.arange(k)[None, :] * d
    return np.maximum(((start >= lo) & (start < hi)).sum(1), 1).astype(np.float32)


def prepare(node, in_shapes, out_shapes, consts):
    (kh, kw), (sh, sw), (dh, dw), (ph, pw), (eh, ew), (oh, ow) = _geometry(node, in_shapes)
    if tuple(out_shapes[0]) != tuple(infer(node, in_shapes, consts)[0]):
        fail(node, f"output shape {out_shapes[0]} does not match the input")
    is_max = node.op == "MaxPool"
    inc = int(node.attrs.get("count_include_pad", 0))
    h, w = in_shapes[0][2:]
    cnt_h, cnt_w = _counts(h, oh, kh, sh, dh, ph, eh, inc), _counts(w, ow, kw, sw, dw, pw, ew, inc)

    if (is_max and (kh, kw, sh, sw, dh, dw, ph, pw) == (2, 2, 2, 2, 1, 1, 0, 0)
            and 2 * oh <= h and 2 * ow <= w):  # (ceil_mode may add a partial window)
        def run(ins, outs, workspace):  # QuickNet's pool: one pass per output row
            _max2x2(ins[0].reshape(-1, h, w), outs[0].reshape(-1, oh, ow))
        return Kernel(run)

    def run(ins, outs, workspace):
        _pool(ins[0], outs[0], kh, kw, sh, sw, ph, pw, dh, dw, is_max, cnt_h, cnt_w)
    return Kernel(run)


@njit(cache=True)
def _max2x2(x, y):
    """MaxPool 2x2 stride 2 without padding over (planes, H, W) views."""
    for p in range(x.shape[0]):
        for oh in range(y.shape[1]):
            r0, r1, out = x[p, 2 * oh], x[p, 2 * oh + 1], y[p, oh]
            for j in range(y.shape[2]):
                out[j] = max(max(r0[2 * j], r0[2 * j + 1]), max(r1[2 * j], r1[2 * j + 1]))


@njit(cache=True)
def _pool(x, y, kh_, kw_, sh, sw, ph, pw, dh, dw, is_max, cnt_h, cnt_w):
    """Each output row combines, tap by tap, the column range where the tap is
    inside the image (padding never wins a max and adds 0 to a sum; a window
    with no tap inside gives LOWEST, as in ONNX Runtime)."""
    n_, c_, h, w = x.shape
    oh_, ow_ = y.shape[2], y.shape[3]
    for n in range(n_):
        for c in range(c_):
            xc, yc = x[n, c], y[n, c]
            for oh in range(oh_):
                row = yc[oh]
                row[:] = LOWEST if is_max else 0
                for kh in range(kh_):
                    ih = oh * sh - ph + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    for kw in range(kw_):
                        off = kw * dw - pw
                        lo, hi = _valid(off, sw, ow_, w)
                        dst, src = row[lo:hi], xr[lo * sw + off:]
                        if is_max:
                            for j in range(hi - lo):
                                dst[j] = max(dst[j], src[j * sw])
                        else:
                            for j in range(hi - lo):
                                dst[j] += src[j * sw]
                if not is_max:
                    ch = cnt_h[oh]
                    for j in range(ow_):
                        row[j] /= ch * cnt_w[j]


register(["MaxPool", "AveragePool"], infer, prepare)
