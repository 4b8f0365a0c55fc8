"""Ops whose output is the input's bytes under a new shape: Reshape, Flatten,
Identity, Dropout (inference), Squeeze, Unsqueeze. The planner normally gives
input and output one buffer.

Variants: reshape.alias (nothing to do when the output shares the input's
bytes, a copy when it does not), reshape.reference (always a copy)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, Variant, register
from ._common import attr_ints, const_of, fail, has_input, int_list, norm_axis
from ..validate import AXIS, BOOL, Attr, Schema


def _axes(node, consts):
    """Squeeze/Unsqueeze axes: const input 1 (opset 13+) or attr; None if absent."""
    if has_input(node, 1):
        c = const_of(node, 1, consts)
        if c is None:
            fail(node, "axes must be a constant")
        return int_list(c)
    return attr_ints(node, "axes")


def _reshape(node, x, consts):
    shape = const_of(node, 1, consts) if has_input(node, 1) else None
    if shape is None:
        fail(node, "the target shape must be a constant")
    shape, allowzero = int_list(shape), int(node.attrs.get("allowzero", 0))
    out = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:  # 0 copies the input's dim
            if i >= len(x):
                fail(node, f"shape {shape} copies dim {i}, which input {x} lacks")
            d = x[i]
        out.append(d)
    if out.count(-1) > 1 or min(out, default=0) < -1:
        fail(node, f"shape {shape} is invalid")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0 or int(np.prod(x)) % known:
            fail(node, f"cannot infer -1 in {shape} for input {x}")
        out[out.index(-1)] = int(np.prod(x)) // known
    return out


def infer(node, in_shapes, consts):
    x = in_shapes[0] if in_shapes else None
    if x is None:
        fail(node, "needs an input")
    x = tuple(int(d) for d in x)
    op = node.op
    if op == "Reshape":
        out = _reshape(node, x, consts)
    elif op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + len(x) if axis < 0 else axis  # range [-r, r]
        if not 0 <= axis <= len(x):
            fail(node, f"axis {node.attrs['axis']} is out of range for rank {len(x)}")
        out = [int(np.prod(x[:axis])), int(np.prod(x[axis:]))]
    elif op == "Squeeze":
        axes = _axes(node, consts)
        axes = [i for i, d in enumerate(x) if d == 1] if axes is None else \
            [norm_axis(node, a, len(x)) for a in axes]
        if any(x[a] != 1 for a in axes):
            fail(node, f"cannot squeeze axes {axes} of {x}: not of size 1")
        out = [d for i, d in enumerate(x) if i not in axes]
    elif op == "Unsqueeze":
        axes = _axes(node, consts)
        if not axes:
            fail(node, "axes are required")
        rank = len(x) + len(axes)
        axes = sorted(norm_axis(node, a, rank) for a in axes)
        if len(set(axes)) != len(axes):
            fail(node, f"repeated axes {axes}")
        rest = iter(x)
        out = [1 if i in axes else next(rest) for i in range(rank)]
    else:  # Identity, Dropout
        if op == "Dropout":
            if any(node.outputs[1:]):
                fail(node, "the mask output is not supported (inference only)")
            mode = const_of(node, 2, consts)
            if has_input(node, 2) and (mode is None or bool(np.asarray(mode).reshape(-1)[0])):
                fail(node, "training_mode must be a constant false")
        out = list(x)
    if int(np.prod(out)) != int(np.prod(x)):
        fail(node, f"cannot view input {x} as {tuple(out)}")
    return [tuple(out)]


@dataclass(frozen=True, eq=False)
class ReshapeSpec:
    y: tuple
    cx: np.ndarray | None  # const input


def analyse(node, in_shapes, out_shapes, consts):
    y = infer(node, in_shapes, consts)[0]
    if tuple(out_shapes[0]) != y:
        fail(node, f"output shape {out_shapes[0]} != {y}")
    return ReshapeSpec(y, const_of(node, 0, consts))


def _data(a):
    return a.__array_interface__["data"][0]


def _build_alias(s: ReshapeSpec) -> Kernel:
    y, cx = s.y, s.cx

    def run(ins, outs, workspace):
        x, out = (cx if cx is not None else ins[0]), outs[0]
        if _data(x) != _data(out):  # the planner did not alias: copy
            np.copyto(out, np.reshape(x, y))
    return Kernel(run)


def _build_reference(s: ReshapeSpec) -> Kernel:
    """The input's elements, in order, under the output's shape."""
    def run(ins, outs, workspace):
        outs[0][...] = np.reshape(np.asarray(ins[0], np.float32), s.y)
    return Kernel(run)


_AXES = Attr(lo=-6, hi=5, length=(0, 6), distinct=True)
SCHEMAS = {"Reshape": Schema({"allowzero": BOOL}), "Flatten": Schema({"axis": AXIS}),
           "Squeeze": Schema({"axes": _AXES}), "Unsqueeze": Schema({"axes": _AXES}),
           "Dropout": Schema({"ratio": Attr(lo=0.0, hi=1.0), "training_mode": BOOL})}

register(["Reshape", "Flatten", "Identity", "Dropout", "Squeeze", "Unsqueeze"], infer, [
    Variant("reshape.alias", _build_alias),
    Variant("reshape.reference", _build_reference),
], analyse=analyse, alias=True)
