"""Op registry: one file (or package) per op family, each holding the ops'
shape rule and their kernel variants, the last of which is the reference.

The contract every op family fulfils (see docs/architecture.md):

    infer(node, in_shapes, consts) -> list[tuple]
        Output shapes from input shapes (None for an omitted optional input).
        `consts` maps initializer names to arrays (for Reshape's shape, ...).
        Raises GraphError naming the node for anything it cannot run.

    analyse(node, in_shapes, out_shapes, consts) -> spec      (optional)
        Validates everything a kernel will index (Numba does not bounds-check)
        and returns what the variants need; the default is a NodeSpec.

    variants: [Variant(name, build, applies, prefers), ..., reference]
        `applies(spec)`: the variant computes this node correctly (tests run
        every variant wherever it applies). `prefers(spec)`: where it is also
        the fast choice (thresholds). The first variant that applies and
        prefers runs the node; a forced variant needs only to apply.
        `build(spec)` returns a Kernel whose `run(ins, outs, workspace)` writes
        `outs` (preallocated float32 C-contiguous arrays) without allocating.
        The last variant is the op's reference: plain code that follows the
        ONNX definition directly for every attribute combination the op
        accepts; every other variant is tested against it.

    alias=True:   the output is the input's bytes under another shape
                  (Reshape, Flatten, Identity); the planner gives both one buffer.
    inplace=True: the kernel may write its output over input 0 when shapes
                  match and input 0 dies here (elementwise ops).
    rows(spec) -> RowWindow | None                            (optional)
                  How output rows (NCHW axis 2) read input rows, for ops that
                  can run band by band (qnrt.streaming); a variant that gives
                  its Kernel a row_block computes every element of a band
                  exactly as it does in a whole run.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..graph import GraphError, Node


@dataclass(frozen=True)
class Kernel:
    """What one step runs: `run(ins, outs, workspace)` plus its scratch bytes.
    `name` is the variant that built it (set by OpDef.prepare).

    row_block > 0 says the kernel is band-invariant: run on a window of input
    rows (same pads, fewer rows), every output row whose taps all lie in the
    window or in the real padding comes out bit-identical to the whole run,
    provided the window's first output row is a multiple of row_block (the
    kernel's internal blocking, e.g. one BLAS call per row_block rows).
    0: the arithmetic depends on the whole extent (not streamable).
    strided_input: input 0 may be a view of some rows of a larger (N, C, H, W)
    array (it is read only through NumPy/BLAS, which take strides).
    inplace: outs[0] may be ins[0]'s memory when their shapes match (the
    kernel copies what it still needs into its workspace first); the
    compiler then lets the output take over an input that dies at this step.
    band_pads: a row's arithmetic does not depend on whether rows beyond its
    taps are padding, so a band kernel may be built with the band's own row
    pads (no rows computed and dropped).
    run_rows(ins, outs, workspace, r0, r1): run() computing only output rows
    [r0, r1) (the rest of outs[0] is left as it was), for kernels that drop
    rows in a band.
    parts > 1 and run_parts(p0, p1, ins, outs, workspace[, r0, r1]): the
    kernel splits into `parts` pieces that write disjoint parts of the output,
    each with the same arithmetic as run(), so spans of them may run at once on
    several threads (qnrt.threads), each thread given its own `workspace`
    bytes of scratch; run() is all the parts in order. r0, r1 are passed where
    the kernel has run_rows."""
    run: Callable
    workspace: int = 0  # bytes
    name: str = ""
    row_block: int = 0
    strided_input: bool = False
    inplace: bool = False
    band_pads: bool = False
    run_rows: Callable | None = None
    parts: int = 1
    run_parts: Callable | None = None


@dataclass(frozen=True)
class RowWindow:
    """Output row o of an op reads input rows o * stride - pad_begin + [0, extent)
    (rows outside the input are the op's padding). `pads`: the op's resolved
    ONNX pads, which the kernels for a band of rows are built with (so that
    auto_pad is not re-resolved for fewer rows); `taps`: input values read per
    output value (the schedule's work estimate)."""
    extent: int
    stride: int
    pad_begin: int
    pads: tuple = ()
    taps: int = 1


@dataclass(frozen=True)
class NodeSpec:
    """The default spec: a node with its concrete shapes and the constants."""
    node: Node
    in_shapes: list
    out_shapes: list
    consts: dict


def always(spec) -> bool:
    return True


@dataclass(frozen=True)
class Variant:
    name: str  # dotted, family first: "conv.dw3x3.padded", "pool.reference"
    build: Callable[[Any], Kernel]
    applies: Callable[[Any], bool] = always
    prefers: Callable[[Any], bool] = always

    @property
    def is_reference(self) -> bool:
        return self.name.endswith(".reference")


def _node_spec(node, in_shapes, out_shapes, consts):
    return NodeSpec(node, list(in_shapes), list(out_shapes), consts)


@dataclass
class OpDef:
    name: str
    infer: Callable
    variants: list[Variant]
    analyse: Callable = _node_spec
    alias: bool = False
    inplace: bool = False
    rows: Callable | None = None  # spec -> RowWindow | None

    @property
    def reference(self) -> Variant:
        return self.variants[-1]

    def spec(self, node, in_shapes, out_shapes, consts):
        return self.analyse(node, in_shapes, out_shapes, consts)

    def applicable(self, spec) -> list[Variant]:
        return [v for v in self.variants if v.applies(spec)]

    def choose(self, spec) -> Variant:
        """The first variant that applies and prefers this node (the reference
        always applies, so there is one)."""
        return next(v for v in self.variants
                    if v.applies(spec) and (v.prefers(spec) or v is self.reference))

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def prepare(self, node, in_shapes, out_shapes, consts, variant: str | None = None) -> Kernel:
        """The kernel for this node: the named variant (GraphError if it does not
        apply here), else the first variant that applies and prefers it."""
        return self.build(node, self.spec(node, in_shapes, out_shapes, consts), variant)

    def build(self, node, spec, variant: str | None = None) -> Kernel:
        """prepare() for a spec already made by self.spec()."""
        if variant is None:
            chosen = self.choose(spec)
        else:
            try:
                chosen = self.variant(variant)
            except KeyError:
                raise GraphError(f"{node.where()}: {self.name} has no kernel variant "
                                 f"'{variant}'; it has {[v.name for v in self.variants]}") from None
            if not chosen.applies(spec):
                raise GraphError(f"{node.where()}: kernel variant '{variant}' does not apply "
                                 f"to this node; these do: "
                                 f"{[v.name for v in self.applicable(spec)]}")
        return dataclasses.replace(chosen.build(spec), name=chosen.name)


REGISTRY: dict[str, OpDef] = {}

# The elementwise activations: each is an op of its own (ops/activation.py) and
# can be fused into a Conv's epilogue (rewrite.fuse_activations; its code for the
# Numba kernels is _common.ACT_CODES). The one list all three derive from.
ACTIVATIONS = ("Relu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu",
               "Tanh", "SiLU")

# Where each op lives: a model imports only the kernel files it uses, which
# keeps a device's cold start short. (tests/test_ops.py checks this table
# against what the files register.)
OP_MODULES = {
    "conv": ["Conv"],
    "conv_transpose": ["ConvTranspose"],
    "pool": ["AveragePool", "MaxPool"],
    "global_pool": ["GlobalAveragePool", "GlobalMaxPool"],
    "activation": sorted(ACTIVATIONS),
    "binary": ["Add", "Div", "Mul", "Sub"],
    "unary_math": ["Abs", "Exp", "Log", "Neg", "Pow", "Reciprocal", "Sqrt"],
    "batchnorm": ["BatchNormalization"],
    "gemm": ["Gemm"],
    "matmul": ["MatMul"],
    "softmax": ["Softmax"],
    "reduce": ["ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum"],
    "transpose": ["Transpose"],
    "concat": ["Concat"],
    "reshape": ["Dropout", "Flatten", "Identity", "Reshape", "Squeeze", "Unsqueeze"],
    "pad": ["Pad"],
    "resize": ["Resize", "Upsample"],
    "split": ["Split"],
    "slice": ["Slice"],
    "gather": ["Gather"],
    "layernorm": ["LayerNormalization"],
}
_MODULE_OF = {op: mod for mod, ops in OP_MODULES.items() for op in ops}
SUPPORTED_OPS = frozenset(_MODULE_OF)  # known without importing a kernel (or numba)


def register(names, infer, variants, analyse=None, alias=False, inplace=False, rows=None):
    if not variants or not variants[-1].is_reference:
        raise ValueError(f"{names}: the last variant must be the reference")
    for name in ([names] if isinstance(names, str) else names):
        REGISTRY[name] = OpDef(name, infer, list(variants), analyse or _node_spec, alias, inplace,
                               rows)


def _load_all():
    for mod in OP_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def get_op(name: str) -> OpDef:
    if name not in REGISTRY and name in _MODULE_OF:
        importlib.import_module(f"{__name__}.{_MODULE_OF[name]}")
    if name not in REGISTRY:
        raise GraphError(f"unsupported op '{name}'")
    return REGISTRY[name]


def supported_ops() -> list[str]:
    return sorted(SUPPORTED_OPS)


def all_variants() -> dict[str, list[str]]:
    """op -> its variant names, in the order they are tried (reference last)."""
    _load_all()
    return {op: [v.name for v in REGISTRY[op].variants] for op in sorted(REGISTRY)}
