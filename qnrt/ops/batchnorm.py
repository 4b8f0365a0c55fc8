"""BatchNormalization, inference form: y = x * s + t per channel (axis 1).

Variants: batchnorm.affine (s, t folded once in float64 when the parameters
are consts), batchnorm.reference."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from . import Kernel, Variant, register
from ._common import const_of, fail, njit
from ..validate import BOOL, FINITE, Attr, Schema


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


@dataclass(frozen=True, eq=False)
class BatchNormSpec:
    n: int
    c: int
    hw: int  # elements per (image, channel)
    eps: float
    fixed: tuple | None  # (s, t) float32 when scale, B, mean, var are consts


def _affine(eps, scale, bias, mean, var):
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return (s.astype(np.float32), (bias - mean * s).astype(np.float32))


def analyse(node, in_shapes, out_shapes, consts):
    x = infer(node, in_shapes, consts)[0]
    eps = float(node.attrs.get("epsilon", 1e-5))
    params = [const_of(node, i, consts) for i in range(1, 5)]
    fixed = _affine(eps, *params) if all(p is not None for p in params) else None
    return BatchNormSpec(int(x[0]), int(x[1]), int(np.prod(x[2:])), eps, fixed)


def _build_affine(s: BatchNormSpec) -> Kernel:
    n, c, hw, eps, fixed = s.n, s.c, s.hw, s.eps, s.fixed

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


def _build_reference(s: BatchNormSpec) -> Kernel:
    """y = (x - mean) / sqrt(var + epsilon) * scale + B, channels on axis 1
    (in float64, then rounded)."""
    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float64).reshape(s.n, s.c, s.hw)
        scale, bias, mean, var = (np.asarray(p, np.float64).reshape(1, s.c, 1) for p in ins[1:5])
        with np.errstate(all="ignore"):
            y = (x - mean) / np.sqrt(var + s.eps) * scale + bias
            outs[0][...] = y.astype(np.float32).reshape(outs[0].shape)
    return Kernel(run)


def _constant_parameters(node, constants):
    """scale, B, mean and var given as constants are vectors of one length (the
    rewrites fold them into a Conv before any shape rule runs)."""
    given = [(name, constants[i]) for name, i in zip(("scale", "B", "mean", "var"),
                                                     node.inputs[1:5]) if i in constants]
    shapes = {tuple(getattr(a, "shape", ())) for _, a in given}
    if given and (len(shapes) > 1 or len(next(iter(shapes))) != 1):
        return ("scale, B, mean and var must be vectors of the same length, not "
                + ", ".join(f"{name} {tuple(a.shape)}" for name, a in given))
    return None


SCHEMAS = {"BatchNormalization": Schema({"epsilon": Attr(lo=0.0, hi=math.inf),
                                         "momentum": FINITE, "training_mode": BOOL},
                                        check=_constant_parameters)}

register("BatchNormalization", infer, [
    Variant("batchnorm.affine", _build_affine),
    Variant("batchnorm.reference", _build_reference),
], analyse=analyse, inplace=True)
