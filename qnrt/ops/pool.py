"""MaxPool and AveragePool over 2-D (NCHW) windows."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import attr_ints, fail, njit, window_geometry


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


def prepare(node, in_shapes, out_shapes, consts):
    (kh, kw), (sh, sw), (dh, dw), (ph, pw), (eh, ew), out = _geometry(node, in_shapes)
    if tuple(out_shapes[0]) != tuple(infer(node, in_shapes, consts)[0]):
        fail(node, f"output shape {out_shapes[0]} does not match the input")
    is_max = node.op == "MaxPool"
    include_pad = int(node.attrs.get("count_include_pad", 0))

    def run(ins, outs, workspace):
        _pool(ins[0], outs[0], kh, kw, sh, sw, ph, pw, eh, ew, dh, dw, is_max, include_pad)
    return Kernel(run)


@njit
def _pool(x, y, kh_, kw_, sh, sw, ph, pw, eh, ew, dh, dw, is_max, include_pad):
    n_, c_, h, w = x.shape
    oh_, ow_ = y.shape[2], y.shape[3]
    for n in range(n_):
        for c in range(c_):
            xc, yc = x[n, c], y[n, c]
            for oh in range(oh_):
                h0 = oh * sh - ph
                for ow in range(ow_):
                    w0 = ow * sw - pw
                    acc = np.float32(-np.inf) if is_max else np.float32(0)
                    count = 0  # taps inside the image
                    padded = 0  # taps inside the padded image
                    for kh in range(kh_):
                        ih = h0 + kh * dh
                        if ih < -ph or ih >= h + eh:
                            continue
                        for kw in range(kw_):
                            iw = w0 + kw * dw
                            if iw < -pw or iw >= w + ew:
                                continue
                            padded += 1
                            if 0 <= ih < h and 0 <= iw < w:
                                count += 1
                                v = xc[ih, iw]
                                if is_max:
                                    if v > acc:
                                        acc = v
                                else:
                                    acc += v
                    if not is_max:
                        acc = acc / np.float32(padded if include_pad else max(count, 1))
                    yc[oh, ow] = acc


register(["MaxPool", "AveragePool"], infer, prepare)
