"""conv.reference: the ONNX Conv definition in NumPy, for every group,
window, stride, pad and dilation, with the fused epilogue (bias, then the
activation). Written to be read, not to be fast; the oracle every other
Conv variant is tested against. Sums are taken in float64, then rounded."""
from __future__ import annotations

import numpy as np

from .. import Kernel
from .._reference import activation


def conv2d(x, w, bias, g) -> np.ndarray:
    """y[n, m, i, j] = bias[m] + sum over c in m's group, taps (p, q) of
    x_padded[n, c, i*sh + p*dh, j*sw + q*dw] * w[m, c, p, q]."""
    (sh, sw), (dh, dw) = g.strides, g.dilations
    (pt, pl), (pb, pr) = g.pads_begin, g.pads_end
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    mg = g.cout // g.group
    y = np.zeros((g.n, g.cout, g.oh, g.ow), np.float64)
    for grp in range(g.group):
        xs = xp[:, grp * g.cg:(grp + 1) * g.cg]
        ws = w[grp * mg:(grp + 1) * mg].astype(np.float64)
        for p in range(g.kh):
            for q in range(g.kw):
                window = xs[:, :, p * dh:p * dh + sh * (g.oh - 1) + 1:sh,
                            q * dw:q * dw + sw * (g.ow - 1) + 1:sw]
                y[:, grp * mg:(grp + 1) * mg] += np.einsum("ncij,mc->nmij", window, ws[:, :, p, q])
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return y.astype(np.float32)


def build_reference(spec) -> Kernel:
    g, epi = spec.geometry, spec.epilogue

    def run(ins, outs, workspace):
        w = spec.weights if spec.has_const_weights else ins[1]
        bias, slope = epi.operands(ins)
        y = conv2d(ins[0], w, bias if epi.has_bias else None, g)
        with np.errstate(all="ignore"):
            outs[0][...] = activation(epi.kind, y, np.asarray(slope).reshape(1, -1, 1, 1),
                                      epi.a, epi.b)
    return Kernel(run)
