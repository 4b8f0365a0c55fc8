"""One validation pass over a loaded graph, before any rewrite or kernel
sees it: wiring, every node's arity, the types of the attributes the ops
read, and the metadata the runtime reads. Each error is a GraphError naming
the node (or key), what it has and what is allowed.

The shape rules and kernels check sizes and values later (qnrt/ops); this
pass makes sure they are never handed a node whose inputs, outputs or
attributes are not even of the right kind.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import GraphError
from .graph import Graph

ANY = 1 << 30
# op -> (min inputs, max inputs, min outputs, max outputs), as ONNX defines
# them (Conv also takes the inputs qnrt's rewrites add: a fused PRelu slope
# and an int8 weight scale).
ARITY = {
    "Conv": (2, 5, 1, 1), "ConvTranspose": (2, 3, 1, 1),
    "MaxPool": (1, 1, 1, 2), "AveragePool": (1, 1, 1, 1),
    "GlobalAveragePool": (1, 1, 1, 1), "GlobalMaxPool": (1, 1, 1, 1),
    "Relu": (1, 1, 1, 1), "Sigmoid": (1, 1, 1, 1), "Tanh": (1, 1, 1, 1),
    "HardSigmoid": (1, 1, 1, 1), "HardSwish": (1, 1, 1, 1), "LeakyRelu": (1, 1, 1, 1),
    "SiLU": (1, 1, 1, 1), "PRelu": (2, 2, 1, 1), "Clip": (1, 3, 1, 1),
    "Add": (2, 2, 1, 1), "Sub": (2, 2, 1, 1), "Mul": (2, 2, 1, 1), "Div": (2, 2, 1, 1),
    "Abs": (1, 1, 1, 1), "Exp": (1, 1, 1, 1), "Log": (1, 1, 1, 1), "Neg": (1, 1, 1, 1),
    "Reciprocal": (1, 1, 1, 1), "Sqrt": (1, 1, 1, 1), "Pow": (2, 2, 1, 1),
    "BatchNormalization": (5, 5, 1, 3), "Gemm": (2, 3, 1, 1), "MatMul": (2, 2, 1, 1),
    "Softmax": (1, 1, 1, 1), "ReduceMax": (1, 2, 1, 1), "ReduceMean": (1, 2, 1, 1),
    "ReduceMin": (1, 2, 1, 1), "ReduceSum": (1, 2, 1, 1), "Transpose": (1, 1, 1, 1),
    "Concat": (1, ANY, 1, 1), "Dropout": (1, 3, 1, 2), "Flatten": (1, 1, 1, 1),
    "Identity": (1, 1, 1, 1), "Reshape": (2, 2, 1, 1), "Squeeze": (1, 2, 1, 1),
    "Unsqueeze": (1, 2, 1, 1), "Pad": (1, 4, 1, 1), "Resize": (1, 4, 1, 1),
    "Upsample": (1, 2, 1, 1), "Split": (1, 2, 1, ANY), "Slice": (1, 5, 1, 1),
    "Gather": (2, 2, 1, 1), "LayerNormalization": (2, 3, 1, 1),
}
# attribute -> what its value must be, wherever it appears (ONNX names them consistently)
INT, FLOAT, INTS, FLOATS, STR = "an int", "a number", "a list of ints", "a list of numbers", "a string"
ATTRS = {
    "kernel_shape": INTS, "strides": INTS, "pads": INTS, "dilations": INTS, "perm": INTS,
    "axes": INTS, "output_padding": INTS, "output_shape": INTS, "split": INTS,
    "group": INT, "axis": INT, "keepdims": INT, "ceil_mode": INT, "count_include_pad": INT,
    "transA": INT, "transB": INT, "allowzero": INT, "storage_order": INT,
    "noop_with_empty_axes": INT, "weights_int8": INT, "training_mode": INT,
    "stash_type": INT,
    "alpha": FLOAT, "beta": FLOAT, "epsilon": FLOAT, "momentum": FLOAT, "min": FLOAT,
    "max": FLOAT, "ratio": FLOAT, "extrapolation_value": FLOAT, "cubic_coeff_a": FLOAT,
    "scales": FLOATS,
    "auto_pad": STR, "mode": STR, "activation": STR, "coordinate_transformation_mode": STR,
    "nearest_mode": STR,
}


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _fits(kind: str, v) -> bool:
    if kind == INT:
        return _is_int(v) or isinstance(v, bool)
    if kind == FLOAT:
        return _is_real(v)
    if kind == STR:
        return isinstance(v, (str, bytes))
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        return False
    items = list(v)
    return all(_is_int(i) for i in items) if kind == INTS else all(_is_real(i) for i in items)


def validate(graph: Graph, max_dim: int = 1 << 20) -> None:
    """GraphError for the first thing wrong with `graph` (see the module doc)."""
    constants, inputs = set(graph.initializers), {v.name for v in graph.inputs}
    produced: set[str] = set()
    for k, node in enumerate(graph.nodes):
        label = f"node {k} '{node.name}' ({node.op})" if node.name else f"node {k} ({node.op})"
        if not node.outputs or not all(isinstance(o, str) and o for o in node.outputs[:1]):
            raise GraphError(f"{label} has no output (its first output needs a name)")
        for o in node.outputs:
            if o in constants or o in inputs:
                raise GraphError(f"{label} writes '{o}', which is a "
                                 f"{'constant' if o in constants else 'graph input'}")
            if o and o in produced:
                raise GraphError(f"{label} writes '{o}', which another node writes too")
            produced.add(o)
        arity = ARITY.get(node.op)
        if arity is not None:
            lo, hi, out_lo, out_hi = arity
            given = len(node.inputs)
            if not lo <= given <= hi or not node.inputs[0]:
                allowed = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi < ANY else f"{lo} or more"
                raise GraphError(f"{label} has {given} inputs (first '{node.inputs[0] if given else ''}'); "
                                 f"{node.op} takes {allowed}, the first one named")
            if not out_lo <= len(node.outputs) <= out_hi:
                allowed = f"{out_lo}" if out_lo == out_hi else f"{out_lo} to {out_hi}"
                raise GraphError(f"{label} has {len(node.outputs)} outputs; {node.op} makes "
                                 f"{allowed}")
        for name, value in node.attrs.items():
            kind = ATTRS.get(name)
            if kind is not None and not _fits(kind, value):
                raise GraphError(f"{label}: attribute '{name}' must be {kind}, not {value!r}")
            if kind == FLOAT and not math.isfinite(float(value)) and name not in ("min", "max"):
                raise GraphError(f"{label}: attribute '{name}' must be finite, not {value!r}")
    for v in graph.outputs:
        if v.name in constants:
            raise GraphError(f"graph output '{v.name}' is a constant, not computed")
    for v in graph.inputs:
        for d in v.shape:
            if not isinstance(d, str) and (not _is_int(d) or not 0 < d <= max_dim):
                raise GraphError(f"input '{v.name}' has dimension {d!r}; dimensions are "
                                 f"1 .. {max_dim:,} or a name")
    _metadata(graph.metadata, max_dim)


def _metadata(meta: dict, max_dim: int) -> None:
    size = meta.get("preprocess.size")
    if size is not None:
        if (isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2
                or not all(_is_int(d) and 0 < d <= max_dim for d in size)):
            raise GraphError(f"metadata 'preprocess.size' must be [height, width], two ints "
                             f"from 1 to {max_dim:,}, not {size!r}")
    labels = meta.get("labels")
    if labels is not None and (isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__")
                               or not all(isinstance(x, str) for x in labels)):
        raise GraphError(f"metadata 'labels' must be a list of strings, not {labels!r}")
