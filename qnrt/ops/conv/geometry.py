"""Conv's shape rule: the geometry of a 2-D NCHW convolution, validated once
for every variant (Numba does not bounds-check what a kernel indexes)."""
from __future__ import annotations

from dataclasses import dataclass

from .._common import attr_ints, fail, has_input, window_geometry
from ...validate import BOOL, MAX_DIM, WINDOW, Attr, Schema
from .. import ACTIVATIONS


@dataclass(frozen=True)
class ConvGeometry:
    n: int
    cin: int
    h: int
    w: int
    cout: int
    cg: int  # input channels per group
    kh: int
    kw: int
    group: int
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads_begin: tuple[int, int]
    pads_end: tuple[int, int]
    oh: int
    ow: int

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def ohw(self) -> int:
        return self.oh * self.ow

    @property
    def out_shape(self) -> tuple:
        return (self.n, self.cout, self.oh, self.ow)

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding, one group: Y[n] = W @ X[n]."""
        return ((self.kh, self.kw, self.group) == (1, 1, 1) and self.strides == (1, 1)
                and self.pads_begin == self.pads_end == (0, 0))

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (output channel m reads input m // multiplier)."""
        return self.group == self.cin and self.cg == 1

    @property
    def multiplier(self) -> int:
        return self.cout // self.cin

    @property
    def is_dw3x3(self) -> bool:
        """QuickNet's depthwise window: 3x3, stride 1, dilation 1, pad 1."""
        return (self.is_depthwise and (self.kh, self.kw) == (3, 3) and self.strides == (1, 1)
                and self.dilations == (1, 1) and self.pads_begin == self.pads_end == (1, 1))


def conv_geometry(node, in_shapes) -> ConvGeometry:
    x, w = in_shapes[0], in_shapes[1] if len(in_shapes) > 1 else None
    if x is None or w is None:
        fail(node, "needs inputs X and W")
    if len(x) != 4 or len(w) != 4:
        fail(node, f"only 2-D convolution (NCHW) is supported; X {x}, W {w}")
    n, cin, h, wd = x
    cout, cg, kh, kw = w
    group = int(node.attrs.get("group", 1))
    if group < 1 or cin % group or cout % group:
        fail(node, f"group {group} must divide input channels {cin} and output channels {cout}")
    if cg != cin // group:
        fail(node, f"weight {w} needs {cin // group} input channels per group (X {x}, "
                   f"group {group})")
    kernel = attr_ints(node, "kernel_shape", [kh, kw])
    if kernel != [kh, kw]:
        fail(node, f"kernel_shape {kernel} does not match weight {w}")
    strides = attr_ints(node, "strides", [1, 1])
    dil = attr_ints(node, "dilations", [1, 1])
    begin, end, out = window_geometry(node, [h, wd], kernel, strides, dil)
    if min(out) < 1:
        fail(node, f"output would be empty: {out}")
    return ConvGeometry(n, cin, h, wd, cout, cg, kh, kw, group, tuple(strides), tuple(dil),
                        tuple(begin), tuple(end), out[0], out[1])


# what Conv's attributes may be (qnrt.validate checks them before this shape
# rule runs; that the group divides the channels needs shapes: conv_geometry)
def _constant_inputs(node, constants):
    """A constant weight is 4-D and a constant bias one value per output channel
    (batch-norm folding reads them before any shape rule runs)."""
    w = constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    b = constants.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if w is not None and len(w.shape) != 4:
        return f"weight '{node.inputs[1]}' has shape {tuple(w.shape)}, not (Cout, Cin, KH, KW)"
    if b is not None and (len(b.shape) != 1 or (w is not None and b.shape[0] != w.shape[0])):
        return (f"bias '{node.inputs[2]}' has shape {tuple(b.shape)}, not one value per output "
                "channel")
    return None


SCHEMAS = {"Conv": Schema({**WINDOW, "group": Attr(lo=1, hi=MAX_DIM),
                           "activation": Attr(choices=("",) + ACTIVATIONS),
                           "weights_int8": BOOL}, check=_constant_inputs)}

def infer(node, in_shapes, consts):
    g = conv_geometry(node, in_shapes)
    if has_input(node, 2) and tuple(in_shapes[2]) != (g.cout,):
        fail(node, f"bias shape {in_shapes[2]} must be ({g.cout},)")
    return [g.out_shape]
