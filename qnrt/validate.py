"""One validation pass over a loaded graph, before any rewrite or kernel
sees it: wiring, every node's arity, the types of the attributes the ops
read, and the metadata the runtime reads. Each error is a GraphError naming
the node (or key), what it has and what is allowed.

Beyond types, each op may declare the ranges, lengths and choices of its
attributes in a schema kept next to its shape rule: a module-level
`SCHEMAS = {"OpName": Schema(attrs={"name": Attr(...)}, check=...)}` in the
module that defines the op's `infer` (see qnrt/ops/pool.py). The checks that
need shapes (an axis within the rank, a group dividing the channels) stay in
the shape rules, which name the node and attribute too.

Adding an op: a row in ARITY, a type in ATTRS for any attribute name not
listed there yet (or `Attr(kind=...)` in its schema), and a SCHEMAS entry for
what its attributes' values may be.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable

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


MAX_DIM = "max_dim"  # a bound that is the session's Limits.max_dim


@dataclass(frozen=True)
class Attr:
    """What one attribute's value may be, beyond its type in ATTRS: each number
    in [lo, hi] (hi may be MAX_DIM), a list of `length` entries (an int, or a
    (min, max) pair), one of `choices`, entries `distinct`. `kind` gives the
    type for a name ATTRS does not list (or overrides it for this op)."""
    lo: float | None = None
    hi: float | str | None = None
    length: int | tuple | None = None
    choices: tuple = ()
    distinct: bool = False
    kind: str | None = None


@dataclass(frozen=True)
class Schema:
    """An op's declared attributes; `check(node, constants)` returns what is
    wrong with the node beyond single attributes (e.g. constant inputs of the
    wrong rank), or None."""
    attrs: dict = field(default_factory=dict)
    check: Callable | None = None


# shared declarations for the op modules
BOOL = Attr(choices=(0, 1))
AXIS = Attr(lo=-6, hi=5)  # the runtime's ranks are at most 6 (ops._common.MAX_RANK)
AUTO_PAD = Attr(choices=("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", ""))
FINITE = Attr(lo=-math.inf, hi=math.inf)
WINDOW = {  # 2-D Conv and pools
    "kernel_shape": Attr(lo=1, hi=MAX_DIM, length=2), "strides": Attr(lo=1, hi=MAX_DIM, length=2),
    "dilations": Attr(lo=1, hi=MAX_DIM, length=2), "pads": Attr(lo=0, hi=MAX_DIM, length=4),
    "auto_pad": AUTO_PAD,
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
            if not lo <= given <= hi or not all(node.inputs[:max(lo, 1)]):
                allowed = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi < ANY else f"{lo} or more"
                raise GraphError(f"{label} has {given} inputs {node.inputs[:8]}; {node.op} "
                                 f"takes {allowed}, the first {max(lo, 1)} named")
            if not out_lo <= len(node.outputs) <= out_hi:
                allowed = f"{out_lo}" if out_lo == out_hi else f"{out_lo} to {out_hi}"
                raise GraphError(f"{label} has {len(node.outputs)} outputs; {node.op} makes "
                                 f"{allowed}")
        schema = schema_of(node.op)
        for name, value in node.attrs.items():
            spec = schema.attrs.get(name) if schema else None
            kind = spec.kind if spec is not None and spec.kind else ATTRS.get(name)
            if kind is not None and not _fits(kind, value):
                raise GraphError(f"{label}: attribute '{name}' must be {kind}, not {value!r}")
            if kind == FLOAT and not math.isfinite(float(value)) and name not in ("min", "max"):
                raise GraphError(f"{label}: attribute '{name}' must be finite, not {value!r}")
            if spec is not None:
                _check_attr(label, name, value, spec, max_dim)
        if schema is not None and schema.check is not None:
            problem = schema.check(node, graph.initializers)
            if problem:
                raise GraphError(f"{label}: {problem}")
    for v in graph.outputs:
        if v.name in constants:
            raise GraphError(f"graph output '{v.name}' is a constant, not computed")
    for v in graph.inputs:
        for d in v.shape:
            if not isinstance(d, str) and (not _is_int(d) or not 0 < d <= max_dim):
                raise GraphError(f"input '{v.name}' has dimension {d!r}; dimensions are "
                                 f"1 .. {max_dim:,} or a name")
    _metadata(graph.metadata, max_dim)


def schema_of(op: str) -> Schema | None:
    """The op's declared Schema: SCHEMAS[op] in the module defining its shape
    rule (None for an op without one, or unknown: get_op reports those)."""
    from . import ops

    module = ops._MODULE_OF.get(op)
    if module is None:
        return None
    infer = ops.get_op(op).infer
    return getattr(importlib.import_module(infer.__module__), "SCHEMAS", {}).get(op)


def _describe(spec: Attr, max_dim: int) -> str:
    if spec.choices:
        return "one of " + ", ".join(repr(c) for c in spec.choices)
    hi = max_dim if spec.hi == MAX_DIM else spec.hi
    parts = []
    if spec.length is not None:
        lo_n, hi_n = (spec.length, spec.length) if isinstance(spec.length, int) else spec.length
        parts.append(f"{lo_n} entries" if lo_n == hi_n else f"{lo_n} to {hi_n} entries")
    if spec.lo is not None and hi is not None and math.isinf(spec.lo) and math.isinf(hi):
        parts.append("finite")
    elif spec.lo is not None and hi is not None:
        parts.append(f"from {spec.lo:,} to {hi:,}")
    elif spec.lo is not None:
        parts.append(f"at least {spec.lo}")
    elif hi is not None:
        parts.append(f"at most {hi}")
    if spec.distinct:
        parts.append("all different")
    return ", ".join(parts)


def _check_attr(label: str, name: str, value, spec: Attr, max_dim: int) -> None:
    many = not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")
    items = list(value) if many else [value]
    ok = True
    if spec.length is not None:
        lo_n, hi_n = (spec.length, spec.length) if isinstance(spec.length, int) else spec.length
        ok = many and lo_n <= len(items) <= hi_n
    if ok and spec.choices:
        text = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in items]
        ok = all(v in spec.choices for v in text)
    if ok and (spec.lo is not None or spec.hi is not None):
        hi = max_dim if spec.hi == MAX_DIM else spec.hi
        for v in items:
            if not _is_real(v) or (isinstance(v, float) and math.isnan(v)):
                ok = False
            elif spec.lo is not None and math.isinf(spec.lo) and hi is not None and math.isinf(hi):
                ok = ok and math.isfinite(v)
            else:
                ok = ok and (spec.lo is None or v >= spec.lo) and (hi is None or v <= hi)
    if ok and spec.distinct:
        ok = len(set(items)) == len(items)
    if not ok:
        raise GraphError(f"{label}: attribute '{name}' is {value!r}; allowed: "
                         f"{_describe(spec, max_dim)}")


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
