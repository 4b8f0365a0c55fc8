"""Softmax along one axis (opset 13+), or over the trailing dims flattened at
`axis` when attrs["legacy_axis_semantics"] is set (opset < 13).

Variants: softmax.rows (along axis 1 of an (outer, axis, inner) view),
softmax.reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import fail, njit, norm_axis
from ..validate import AXIS, INT, Attr, Schema


def infer(node, in_shapes, consts):
    if not in_shapes or in_shapes[0] is None:
        fail(node, "needs an input")
    return [tuple(in_shapes[0])]


@dataclass(frozen=True)
class SoftmaxSpec:
    shape3: tuple  # (outer, softmax length, inner): the input viewed in 3-D


def analyse(node, in_shapes, out_shapes, consts):
    x = infer(node, in_shapes, consts)[0]
    legacy = bool(node.attrs.get("legacy_axis_semantics", False))
    axis = norm_axis(node, int(node.attrs.get("axis", 1 if legacy else -1)), len(x))
    outer = int(np.prod(x[:axis]))
    if legacy:  # softmax over everything from axis on, as one row
        shape3 = (outer, int(np.prod(x[axis:])), 1)
    else:
        shape3 = (outer, int(x[axis]), int(np.prod(x[axis + 1:])))
    if shape3[1] < 1:
        fail(node, f"softmax over an empty axis of {x}")
    return SoftmaxSpec(shape3)


def _build_rows(s: SoftmaxSpec) -> Kernel:
    shape3 = s.shape3

    def run(ins, outs, workspace):
        _softmax(ins[0].reshape(shape3), outs[0].reshape(shape3))
    return Kernel(run)


@njit(cache=True)
def _softmax(x, y):
    """Softmax along axis 1 of (outer, A, inner); y may be x."""
    for o in range(x.shape[0]):
        for i in range(x.shape[2]):
            m = x[o, 0, i]
            for a in range(1, x.shape[1]):
                m = max(m, x[o, a, i])
            s = np.float32(0)
            for a in range(x.shape[1]):
                e = np.exp(x[o, a, i] - m)
                y[o, a, i] = e
                s += e
            inv = np.float32(1) / s
            for a in range(x.shape[1]):
                y[o, a, i] *= inv


def _build_reference(s: SoftmaxSpec) -> Kernel:
    """exp(x - max) / sum(exp(x - max)) along the softmax axis (float64 sums)."""
    def run(ins, outs, workspace):
        x = np.asarray(ins[0], np.float64).reshape(s.shape3)
        with np.errstate(all="ignore"):
            e = np.exp(x - np.max(x, axis=1, keepdims=True))
            y = e / np.sum(e, axis=1, keepdims=True)
            outs[0][...] = y.astype(np.float32).reshape(outs[0].shape)
    return Kernel(run)


SCHEMAS = {"Softmax": Schema({"axis": AXIS, "legacy_axis_semantics": Attr(kind=INT)})}

register("Softmax", infer, [
    Variant("softmax.rows", _build_rows),
    Variant("softmax.reference", _build_reference),
], analyse=analyse, inplace=True)
