"""BatchNormalization, inference form: y = x * s + t per channel (axis 1)."""
from __future__ import annotations

import numpy as np

from . import Kernel, register
from ._common import const_of, fail, njit


def infer(node, in_shapes, consts):
    if len(in_shapes) != 5 or None in in_shapes:
        fail(node, "needs inputs X, scale, B, mean, var")
    x = in_shapes[0]
    if len(x) < 2:
        fail(node, f"input {x} has no channel axis")
    for name, s in zip(("scale", "B", "mean", "var"), in_shapes[1:]):
        if tuple(s) != (x[1],):
            fail(node, f"{name} has shape {s}, needs ({x[1]},)")
    if int(node.attrs.get("training_mode", 0)) or any(node.outputs[1:]):
        fail(node, "only the inference form (one output, training_mode=0) is supported")
    return [tuple(x)]


def _affine(eps, scale, bias, mean, var):
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return (s.astype(np.float32), (bias - mean * s).astype(np.float32))


def prepare(node, in_shapes, out_shapes, consts):
    x = infer(node, in_shapes, consts)[0]
    n, c, hw = int(x[0]), int(x[1]), int(np.prod(x[2:]))
    eps = float(node.attrs.get("epsilon", 1e-5))
    params = [const_of(node, i, consts) for i in range(1, 5)]
    fixed = _affine(eps, *params) if all(p is not None for p in params) else None

    def run(ins, outs, workspace):
        s, t = fixed if fixed is not None else _affine(eps, *ins[1:5])
        x3, y3 = ins[0].reshape(n, c, hw), outs[0].reshape(n, c, hw)
        _scale_shift(x3, y3, s, t)
    return Kernel(run)


@njit(cache=True)
def _scale_shift(x, y, s, t):
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            xr, yr, sc, tc = x[n, c], y[n, c], s[c], t[c]
            for i in range(xr.size):
                yr[i] = xr[i] * sc + tc


register("BatchNormalization", infer, prepare, inplace=True)
