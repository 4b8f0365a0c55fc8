"""Op registry: one file per op (or op family), each holding the op's shape
rule, its Numba kernel(s) and the `prepare` that binds them.

The contract every op file fulfils:

    infer(node, in_shapes, consts) -> list[tuple]
        Output shapes from input shapes (None for an omitted optional input).
        `consts` maps initializer names to arrays (for Reshape's shape, ...).
        Raises GraphError naming the node for anything it cannot run.

    prepare(node, in_shapes, out_shapes, consts) -> Kernel
        Validates everything a kernel will index (Numba does not bounds-check)
        and returns a Kernel whose `run(ins, outs, workspace)` writes `outs`
        (preallocated float32 C-contiguous arrays) without allocating.
        `Kernel.workspace` is the scratch bytes it needs during the step.

    alias=True:   the output is the input's bytes under another shape
                  (Reshape, Flatten, Identity); the planner gives both one buffer.
    inplace=True: the kernel may write its output over input 0 when shapes
                  match and input 0 dies here (elementwise ops).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..graph import GraphError


@dataclass
class Kernel:
    run: Callable  # run(ins: list[ndarray], outs: list[ndarray], workspace: ndarray | None)
    workspace: int = 0  # bytes
    # A variant needing less workspace (maybe slower). The session takes it where
    # this kernel's workspace would lift the arena above the tensors' own peak.
    fallback: "Kernel | None" = None


@dataclass
class OpDef:
    name: str
    infer: Callable
    prepare: Callable
    alias: bool = False
    inplace: bool = False


REGISTRY: dict[str, OpDef] = {}

# Where each op lives: a model imports only the kernel files it uses, which
# keeps a device's cold start short. (tests/test_ops.py checks this table
# against what the files register.)
OP_MODULES = {
    "conv": ["Conv"],
    "conv_transpose": ["ConvTranspose"],
    "pool": ["AveragePool", "MaxPool"],
    "global_pool": ["GlobalAveragePool", "GlobalMaxPool"],
    "activation": ["Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "PRelu", "Relu", "SiLU",
                   "Sigmoid", "Tanh"],
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
}
_MODULE_OF = {op: mod for mod, ops in OP_MODULES.items() for op in ops}


def register(names, infer, prepare, alias=False, inplace=False):
    for name in ([names] if isinstance(names, str) else names):
        REGISTRY[name] = OpDef(name, infer, prepare, alias, inplace)


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
    _load_all()
    return sorted(REGISTRY)
