"""Conv's fused epilogue: per-output-channel bias, then an activation.

Extra Conv attrs (set by rewrite.fuse_activations): `activation`, an ONNX
activation name in ACT_CODES, with `activation_alpha`/`activation_beta`
(HardSigmoid, LeakyRelu) and `activation_min`/`activation_max` (Clip); for
PRelu the per-output-channel slope is input 3. Bias and slope are captured
constants, or arrive at run time as inputs 2 and 3."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._common import ACT_CODES, activation_params, attr_str, const_of, fail, has_input, numba_const


@dataclass(frozen=True)
class Epilogue:
    kind: str  # ONNX activation name, "" for none
    a: float  # activation parameters as _common.activation_params gives them
    b: float
    cout: int
    has_bias: bool  # input 2 is present (const or at run time)
    bias: np.ndarray | None = field(repr=False)  # const, Numba-readable float32 (cout,)
    slope: np.ndarray | None = field(repr=False)  # const PRelu slope (cout,)
    zeros: np.ndarray = field(repr=False)  # (cout,): the bias or slope that is absent

    @property
    def code(self) -> int:
        """The activation's code for the Numba kernels (_common._act)."""
        return ACT_CODES[self.kind]

    @property
    def active(self) -> bool:
        """Whether there is anything to do after the product."""
        return self.has_bias or self.kind != ""

    def operands(self, ins) -> tuple[np.ndarray, np.ndarray]:
        """(bias, slope) for one run: the captured consts, else the run-time
        inputs, else zeros. A one-value run-time slope is broadcast (this
        allocates; only run-time slopes, which fused graphs do not have)."""
        bias = self.bias if self.bias is not None else (
            ins[2].reshape(-1) if self.has_bias else self.zeros)
        if self.slope is not None or self.kind != "PRelu":
            return bias, (self.slope if self.slope is not None else self.zeros)
        s = ins[3].reshape(-1)
        return bias, (s if s.size == self.cout else np.full(self.cout, s[0], np.float32))


def conv_epilogue(node, in_shapes, consts, cout) -> Epilogue:
    kind = attr_str(node, "activation", "")
    if kind not in ACT_CODES:
        fail(node, f"unsupported fused activation '{kind}'")
    a, b = activation_params(kind, node.attrs.get("activation_alpha"),
                             node.attrs.get("activation_beta"),
                             node.attrs.get("activation_min"), node.attrs.get("activation_max"))
    bias = slope = None
    if has_input(node, 2):
        bias = const_of(node, 2, consts)
        bias = numba_const(bias) if bias is not None else None
    if kind == "PRelu":
        if not has_input(node, 3) or int(np.prod(in_shapes[3])) not in (1, cout):
            fail(node, f"fused PRelu needs a slope of {cout} values as input 3")
        slope = const_of(node, 3, consts)
        if slope is not None:
            slope = numba_const(np.broadcast_to(np.asarray(slope).reshape(-1), (cout,)))
    return Epilogue(kind, a, b, cout, has_input(node, 2), bias, slope,
                    np.zeros(cout, np.float32))
