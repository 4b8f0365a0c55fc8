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

# op files, imported lazily so `import qnrt` stays cheap
_MODULES = (
    "conv", "pool", "global_pool", "activation", "binary", "batchnorm",
    "gemm", "matmul", "softmax", "transpose", "concat", "reshape",
    "pad", "conv_transpose", "resize", "split", "slice", "unary_math", "reduce",
)
_loaded = False


def register(names, infer, prepare, alias=False, inplace=False):
    for name in ([names] if isinstance(names, str) else names):
        REGISTRY[name] = OpDef(name, infer, prepare, alias, inplace)


def _load_all():
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(f"{__name__}.{mod}")
        _loaded = True


def get_op(name: str) -> OpDef:
    _load_all()
    if name not in REGISTRY:
        raise GraphError(f"unsupported op '{name}'")
    return REGISTRY[name]


def supported_ops() -> list[str]:
    _load_all()
    return sorted(REGISTRY)
