"""ONNX model -> qnrt Graph.

One pass over the (topologically ordered) ONNX nodes:
  * initializers, Constant nodes and graph inputs that are also initializers
    become constants;
  * attributes are normalised to the IR form (opset >= 13 ONNX): schema defaults
    filled in, Conv/pool strides/dilations/pads/kernel_shape made explicit,
    auto_pad turned into pads when shapes are known, Clip min/max (< 11) and
    Squeeze/Unsqueeze axes (< 13) moved to constant inputs, old Softmax marked
    `legacy_axis_semantics`;
  * Identity, Dropout and Casts to the same type are removed by rewiring;
  * nodes whose inputs are all constant are evaluated in NumPy (Shape too, when
    shape inference gives its input a static shape).
Shapes: a dim that is not a positive int (-1, 0, a name, none) is dynamic.
ONNX shape inference runs from the inputs (fixed by input_shapes where given)
with the file's value_info dropped (exporters leave it stale); each node kept
then gets its output shapes from the runtime's own shape rule as well, so a
Reshape whose target came through arithmetic ONNX cannot follow (shapes cast
to float and back) still has a static output and every Shape after it folds.
Where dims stay dynamic, that rule runs on probe values: a dim computed from
the input's dims gets a symbol of its own (which remembers the input dims it
depends on), so a later Shape of it folds symbolically too.
With cleanup=True (what `qnrt convert` uses) two more things happen:
  * shape arithmetic on dynamic dims is folded symbolically: Shape gives a
    vector of ints and dim symbols, Gather/Slice/Concat/Unsqueeze/Mul/... carry
    them, and a Reshape whose target ends up as [N, -1] (N the input's own
    dynamic batch) gets the target [0, -1]: the batch stays dynamic; a node
    left computing with a dim symbol is an error that names the input dims
    the symbol was computed from;
  * exporters.cleanup rewrites what converters spell out (Transpose pairs, batch
    norm as Mul/Add after a Conv, SiLU/HardSwish/ReLU6/LeakyRelu patterns).
Min/Max forms of Relu/Clip/LeakyRelu are always rewritten (exporters.cleanup.legalize).
Whatever remains must be a runtime op, else one GraphError names every offender.
"""
from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from functools import reduce

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnrt.graph import Graph, GraphError, Node, ValueInfo
from qnrt.ops import SUPPORTED_OPS

MIN_OPSET = 7
_POOLS = ("Conv", "MaxPool", "AveragePool")


def supported_ops() -> set[str]:
    """The runtime's op set (qnrt.ops.OP_MODULES: known without importing a kernel)."""
    return set(SUPPORTED_OPS)


def from_onnx(model_or_path, input_shapes: dict | None = None, *, cleanup: bool = False,
              report: Counter | None = None) -> Graph:
    """ONNX (model, path or bytes) -> IR Graph.

    input_shapes: fix the dynamic dims of named inputs.
    cleanup: also fold shape arithmetic on dynamic dims and run exporters.cleanup.
    report: a Counter that receives what was folded and rewritten (see
    exporters.cleanup.summary)."""
    counts: Counter = Counter()
    model = _load(model_or_path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise GraphError(f"ONNX opset {opset} is not supported (need >= {MIN_OPSET})")
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [_input(v, (input_shapes or {}).get(v.name)) for v in g.input
              if v.name not in consts]
    unknown = set(input_shapes or {}) - {v.name for v in inputs}
    if unknown:
        raise GraphError(f"input_shapes names {sorted(unknown)}, which are not graph inputs "
                         f"(inputs: {[v.name for v in inputs]})")
    symbols = _Symbols(inputs)  # dims nothing can be matched with, and what they come from
    types = _infer(model, inputs)
    for v in inputs:
        types[v.name] = (np.dtype(v.dtype), v.shape)

    alias: dict[str, str] = {}  # removed node's output -> the tensor it copied
    kept: list[Node] = []
    names: set[str] = set()
    graph_outputs = {v.name for v in g.output}
    for index, proto in enumerate(g.node):
        name = proto.name or f"{proto.op_type}_{index}"
        while name in names:
            name += "_"
        names.add(name)
        attrs = {a.name: _attr_value(a) for a in proto.attribute}
        op = proto.op_type if proto.domain in ("", "ai.onnx") else f"{proto.domain}.{proto.op_type}"
        node = Node(op, [alias.get(i, i) for i in proto.input], list(proto.output), attrs, name)
        if op == "Constant":
            consts[node.outputs[0]] = _constant(node)
            counts["constants folded"] += 1
            continue
        _normalize(node, opset, consts, types)
        x = node.inputs[0] if node.inputs else ""
        if op in ("Identity", "Dropout") or (op == "Cast" and _dtype(x, consts, types)
                                              == helper.tensor_dtype_to_np_dtype(attrs["to"])):
            # Dropout's mask output is never read at inference; if it is, keep the node
            if not any(o in graph_outputs or _read_later(o, g.node, index)
                       for o in node.outputs[1:]):
                alias[node.outputs[0]] = x
                counts["no-op nodes removed"] += 1
                continue
        if op == "Shape":
            shape = consts[x].shape if x in consts else types.get(x, (None, None))[1]
            if shape is not None and all(isinstance(d, int) for d in shape):
                dims = list(shape)[attrs.get("start", 0):attrs.get("end", len(shape))]
                consts[node.outputs[0]] = np.array(dims, np.int64)
                counts["constants folded"] += 1
                continue
            if cleanup and shape is not None:  # symbols for the dynamic dims
                dims = [d if isinstance(d, str) or _static(d) else symbols.fresh()
                        for d in shape][attrs.get("start", 0):attrs.get("end", len(shape))]
                consts[node.outputs[0]] = _symbolic(dims)
                counts["constants folded"] += 1
                continue
        elif op in _FOLD and node.inputs and all(i in consts for i in node.inputs if i):
            ins = [consts[i] if i else None for i in node.inputs]
            if any(_is_symbolic(v) for v in ins):
                values = _fold_symbolic(op, ins, attrs, symbols)
                if values is None:  # e.g. a dynamic dim reaching Expand's shape
                    kept.append(node)
                    continue
            else:
                try:
                    values = _FOLD[op](ins, attrs)
                except Exception as exc:
                    raise GraphError(f"{node.where()}: cannot fold constant inputs: "
                                     f"{exc}") from exc
                values = [np.array(v, order="C") for v in values]
            consts.update(zip(node.outputs, values))
            counts["constants folded"] += 1
            continue
        elif op == "Reshape" and len(node.inputs) > 1 and _is_symbolic(consts.get(node.inputs[1])):
            target = _resolve_target(consts[node.inputs[1]], types.get(x, (None, None))[1],
                                     attrs.get("allowzero", 0))
            if target is not None:
                name = f"{node.name}.shape"
                while name in consts:
                    name += "_"
                consts[name] = target
                node.inputs[1] = name
                counts["dynamic reshapes resolved"] += 1
        if op == "LayerNormalization":  # Mean and InvStdDev are training outputs
            while len(node.outputs) > 1 and not (node.outputs[-1] in graph_outputs or
                                                  _read_later(node.outputs[-1], g.node, index)):
                node.outputs.pop()
        kept.append(node)
        _propagate(node, consts, types, symbols)

    outputs, renamed = [], {}
    for v in g.output:
        src = alias.get(v.name, v.name)
        src = renamed.get(src, src)
        if src in consts:
            consts[v.name] = consts[src]
        elif src != v.name:
            if src in graph_outputs or src in {i.name for i in inputs}:
                # two names for one tensor: keep the copy (the check below reports it)
                kept.append(Node("Identity", [src], [v.name], {}, f"Identity_{v.name}"))
            else:  # give the producer the output's name
                renamed[src] = v.name
                for n in kept:
                    n.inputs = [v.name if i == src else i for i in n.inputs]
                    n.outputs = [v.name if o == src else o for o in n.outputs]
        dtype, shape = _merge(v, types.get(v.name))
        outputs.append(ValueInfo(v.name, shape, dtype))

    ok = supported_ops()
    dynamic = [n for n in kept if any(_is_symbolic(consts.get(i)) for i in n.inputs)]
    if dynamic:
        raise GraphError(f"{len(dynamic)} node(s) compute with the input's dynamic dims: "
                         + ", ".join(f"'{n.name}' ({n.op}, {symbols.explain(n, consts)})"
                                     for n in dynamic)
                         + "; fix them with input_shapes (qnrt convert --input-shape)")
    used = {i for n in kept for i in n.inputs} | {v.name for v in outputs}
    graph = Graph(kept, inputs, outputs, {k: v for k, v in consts.items() if k in used},
                  {p.key: _json_or_str(p.value) for p in model.metadata_props},
                  g.name or "graph")
    from . import cleanup as rewrites

    if cleanup:
        rewrites.cleanup(graph, ok, counts, {k: v[1] for k, v in types.items()
                                             if v[1] is not None})
    else:
        rewrites.legalize(graph, ok, counts)
    bad = [n for n in graph.nodes if n.op not in ok]
    if bad:
        hint = ""
        if any(n.op == "Shape" for n in bad):
            hint = (f" (Shape of a tensor with dynamic dims{symbols.inputs_note()}: pass "
                    "input_shapes to fold it, qnrt convert --input-shape)")
        raise GraphError(f"{len(bad)} unsupported node(s): "
                         + ", ".join(f"'{n.name}' ({n.op})" for n in bad) + hint)
    graph.validate()
    if report is not None:
        report.update(+counts)
        report["nodes in source"] += len(g.node)
    if any(not isinstance(d, int) for v in outputs for d in (v.shape or ("?",))):
        _refine_outputs(graph)
    return graph


def _refine_outputs(graph: Graph) -> None:
    """Infer output shapes again on the folded graph: with Shape chains gone (and
    input_shapes applied) ONNX inference can often pin dims it could not before,
    or name them by the input's symbols (a Reshape to [0, -1] keeps 'N')."""
    from .onnx_export import to_onnx

    draft = Graph(graph.nodes, graph.inputs,
                  [ValueInfo(v.name, None, v.dtype) for v in graph.outputs],
                  graph.initializers, {}, graph.name)
    try:
        model = to_onnx(draft)
    except Exception:  # best effort: the shapes found so far stay valid
        return
    types = _infer(model, graph.inputs)
    symbols = {d for v in graph.inputs for d in v.shape or () if isinstance(d, str)}
    refined = []
    for v in graph.outputs:
        got = types.get(v.name, (None, None))[1]
        if v.shape is None or got is None or len(got) != len(v.shape):
            refined.append(v if got is None else ValueInfo(
                v.name, tuple(d if isinstance(d, int) and d > 0 else d if isinstance(d, str)
                              else f"{v.name}.{i}" for i, d in enumerate(got)), v.dtype))
            continue
        shape = []
        for old, new in zip(v.shape, got):
            if isinstance(old, int):
                shape.append(old)
            elif isinstance(new, int) and new > 0 or new in symbols:
                shape.append(new)
            else:
                shape.append(old)
        refined.append(ValueInfo(v.name, tuple(shape), v.dtype))
    graph.outputs = refined


# ---- loading, types and shapes -------------------------------------------------

def _load(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    return onnx.load(os.fspath(model_or_path))


def _dims(type_proto):
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else
                 d.dim_param if d.HasField("dim_param") else None for d in t.shape.dim)


def _np_dtype(elem_type):
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None


def _input(v: onnx.ValueInfoProto, fixed) -> ValueInfo:
    dims = _dims(v.type) or ()
    # unnamed dynamic dims (none, 0 or -1: anything but a positive int) get a
    # stable symbol so they can still be matched up
    dims = tuple(d if isinstance(d, str) or _static(d) else f"{v.name}.{i}"
                 for i, d in enumerate(dims))
    if fixed is not None:
        if len(fixed) != len(dims):
            raise GraphError(f"input_shapes['{v.name}'] = {tuple(fixed)} has rank {len(fixed)}, "
                             f"the model's input has shape {dims}")
        for d, f in zip(dims, fixed):
            if isinstance(d, int) and f is not None and not isinstance(f, str) and int(f) != d:
                raise GraphError(f"input_shapes['{v.name}'] = {tuple(fixed)} contradicts the "
                                 f"model's static shape {dims}")
        dims = tuple(d if f is None else f if isinstance(f, str) else int(f)
                     for d, f in zip(dims, fixed))
    dtype = _np_dtype(v.type.tensor_type.elem_type) or np.dtype(np.float32)
    return ValueInfo(v.name, dims, dtype.name)


def _infer(model: onnx.ModelProto, inputs: list[ValueInfo]) -> dict:
    """name -> (dtype, dims) from ONNX shape inference run from our input shapes.

    The file's own value_info and output shapes are dropped first: exporters
    leave them stale (symbolic names, -1 for a dynamic dim, or the size the
    model was traced at), and ONNX inference would keep a -1 or refuse a
    conflict rather than take what the fixed input implies. A dim that is not
    a positive int comes back as None (dynamic)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for v in m.graph.output:
        v.type.tensor_type.ClearField("shape")
    by_name = {v.name: v for v in inputs}
    for v in m.graph.input:
        if v.name in by_name:
            shape = v.type.tensor_type.shape
            shape.ClearField("dim")
            for d in by_name[v.name].shape:
                dim = shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # e.g. custom-domain ops: the file's own shapes are all there is
        m.graph.value_info.extend(model.graph.value_info)
    types = {}
    for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        got = _dims(v.type)
        if got is not None:
            got = tuple(d if isinstance(d, str) or _static(d) else None for d in got)
        types[v.name] = (_np_dtype(v.type.tensor_type.elem_type), got)
    return types


def _static(d) -> bool:
    """A fixed dimension: a positive int (0 and -1 are how exporters say 'dynamic')."""
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0


# Values substituted for a dim symbol when the runtime's shape rule runs on a
# symbolic shape: two runs with different primes tell a dim that is the symbol
# itself (it follows the probe) from one computed from it (it does not). A run
# with small values guards the dims that look static: Slice(x, 0, 25) of a
# dynamic axis gives 25 for both large probes, but not for an axis of 3.
_PROBES = ((7919, 7927, 7933, 7937, 7949, 7951, 7963, 7993),
           (8009, 8011, 8017, 8039, 8053, 8059, 8069, 8081))
_SMALL_PROBE = (2, 3, 5, 7, 11, 13, 17, 19)


def _propagate(node: Node, consts: dict, types: dict, symbols: "_Symbols") -> None:
    """Output shapes of a kept node from the runtime's own shape rule. ONNX
    inference loses track where shape arithmetic it cannot follow (a Cast to
    float and back) feeds a Reshape, and every Shape downstream would stay
    dynamic although the input is fixed. Dims named by a symbol (a dynamic
    batch) are probed: an output dim that follows one symbol keeps its name;
    one computed from symbols gets a new symbol, which remembers the input
    dims it depends on (the probes find them: it moves when they move)."""
    if node.op not in SUPPORTED_OPS:
        return
    shapes = []
    for name in node.inputs:
        if not name:
            shapes.append(None)
            continue
        shape = consts[name].shape if name in consts else types.get(name, (None, None))[1]
        if shape is None or not all(_static(d) or isinstance(d, str) for d in shape):
            return
        shapes.append(tuple(shape))
    names = sorted({d for sh in shapes if sh for d in sh if isinstance(d, str)})
    if len(names) > len(_PROBES[0]):
        return
    from qnrt.ops import get_op

    def run(values):
        concrete = [None if sh is None else tuple(values.get(d, d) for d in sh) for sh in shapes]
        return get_op(node.op).infer(node, concrete, consts)

    base = [dict(zip(names, probe)) for probe in _PROBES]
    try:
        runs = [run(v) for v in (base if names else base[:1])]
        # one run per symbol with only that symbol moved: which output dims follow it
        moved = [run({**base[0], n: base[1][n]}) for n in names] if names else []
    except Exception:  # the runtime reports it later, with the node's name
        return
    small = None
    if names:
        try:
            small = run(dict(zip(names, _SMALL_PROBE)))
        except Exception:  # e.g. a kernel larger than the small input: unknown
            small = None
    first = _dtype(node.inputs[0], consts, types) if node.inputs else None
    for k, name in enumerate(node.outputs):
        if not name or k >= len(runs[0]) or runs[0][k] is None:
            continue
        dims = []
        for i in range(len(runs[0][k])):
            seen = [int(r[k][i]) for r in runs]
            if len(set(seen)) == 1 and (not names or (small is not None
                                                       and int(small[k][i]) == seen[0])):
                dims.append(seen[0])
                continue
            same = [n for n in names if seen == [base[0][n], base[1][n]]]
            if same:
                dims.append(same[0])
            else:  # the input dims it moves with (all of them if it only moved once)
                parents = [n for n, m in zip(names, moved) if int(m[k][i]) != seen[0]]
                dims.append(symbols.fresh(*(parents or names)))
        dtype = types.get(name, (None, None))[0] or first
        types[name] = (dtype, tuple(dims))


class _Symbols:
    """The dim symbols shape arithmetic meets, and for each the graph-input dims
    it was computed from (so an error can say which dims to fix)."""

    def __init__(self, inputs: list[ValueInfo]):
        self.origin: dict[str, set] = {}
        self.count = itertools.count()
        for v in inputs:
            for i, d in enumerate(v.shape or ()):
                if isinstance(d, str):
                    self.origin.setdefault(d, set()).add((v.name, i))
        self.dynamic = sorted(set().union(*self.origin.values())) if self.origin else []

    def fresh(self, *parents) -> str:
        """A new symbol computed from `parents` (symbols; ints are ignored). Without
        any, it is a dim whose origin was lost (ONNX inference could not follow)."""
        name = f"?{next(self.count)}"
        parents = [p for p in parents if isinstance(p, str)]
        self.origin[name] = set().union(*(self.origin.get(p, {None}) for p in parents)) \
            if parents else {None}
        return name

    def explain(self, node: Node, consts: dict) -> str:
        """'from x dims 2, 3' for the input dims behind the symbols node reads."""
        found: set = set()
        for name in node.inputs:
            value = consts.get(name)
            if _is_symbolic(value):
                for v in value.reshape(-1):
                    if isinstance(v, str):
                        found |= self.origin.get(v, {None})
        known = sorted(d for d in found if d is not None)
        if None in found or not known:
            known = self.dynamic  # shape inference lost the trail: all of them may matter
        return "from " + self._dims_text(known)

    def inputs_note(self) -> str:
        """', from 'x' dims 0, 2, 3' (every dynamic input dim), or ''."""
        return f", from {self._dims_text(self.dynamic)}" if self.dynamic else ""

    @staticmethod
    def _dims_text(dims) -> str:
        by_input: dict[str, list[int]] = {}
        for name, axis in dims:
            by_input.setdefault(name, []).append(axis)
        return "; ".join(f"'{k}' dim{'s' if len(v) > 1 else ''} " + ", ".join(map(str, v))
                         for k, v in by_input.items())


def _dtype(name, consts, types):
    return consts[name].dtype if name in consts else types.get(name, (None, None))[0]


def _merge(v: onnx.ValueInfoProto, inferred):
    """Output ValueInfo: a static dim from either source, else a symbol."""
    declared, got = _dims(v.type), inferred[1] if inferred else None
    dtype = _np_dtype(v.type.tensor_type.elem_type) or (inferred and inferred[0]) or np.float32
    if declared is None and got is None:
        return np.dtype(dtype).name, None
    first = declared if declared is not None else got
    second = got if got is not None and len(got) == len(first) else first
    shape = []
    for i, pair in enumerate(zip(first, second)):
        static = [d for d in pair if isinstance(d, int) and d > 0]
        symbol = [d for d in pair if isinstance(d, str) and not d.startswith("?")]
        shape.append(static[0] if static else symbol[0] if symbol else f"{v.name}.{i}")
    return np.dtype(dtype).name, tuple(shape)


def _read_later(name, protos, index):
    return any(name in p.input for p in protos[index + 1:])


def _json_or_str(text):
    try:
        return json.loads(text)
    except ValueError:  # metadata from other producers is plain text
        return text


# ---- attributes -------------------------------------------------------------

def _attr_value(a: onnx.AttributeProto):
    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated"):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _constant(node: Node) -> np.ndarray:
    a = node.attrs
    if "value" in a:
        return np.asarray(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype)
    raise GraphError(f"{node.where()}: Constant with {sorted(a)} is not supported")


def _normalize(node: Node, opset: int, consts: dict, types: dict) -> None:
    """Rewrite `node` in place into the IR's (opset >= 13 ONNX) form."""
    op, a = node.op, node.attrs
    try:
        schema = onnx.defs.get_schema(op, opset)
        for key, spec in schema.attributes.items():
            if key not in a and key != "auto_pad" and spec.default_value.type:
                a[key] = _attr_value(spec.default_value)
    except onnx.defs.SchemaError:
        return  # not an ONNX op; reported as unsupported later

    def const_input(index, base, value):
        name = f"{node.name}.{base}"
        consts[name] = value
        node.inputs += [""] * (index + 1 - len(node.inputs))
        node.inputs[index] = name

    if op == "Clip" and opset < 11:
        lo, hi = a.pop("min", None), a.pop("max", None)
        if lo is not None:
            const_input(1, "min", np.float32(lo))
        if hi is not None:
            const_input(2, "max", np.float32(hi))
    elif op in ("Squeeze", "Unsqueeze") and opset < 13 and "axes" in a:
        const_input(1, "axes", np.asarray(a.pop("axes"), np.int64))
    elif op == "Softmax" and opset < 13:
        a["legacy_axis_semantics"] = True
    elif op in _POOLS:
        _explicit_window(node, consts, types)


def _explicit_window(node: Node, consts: dict, types: dict) -> None:
    """Conv/MaxPool/AveragePool: kernel_shape, strides, dilations, pads made explicit."""
    a = node.attrs
    if "kernel_shape" not in a:  # Conv only: taken from the weight
        w = consts[node.inputs[1]].shape if node.inputs[1] in consts else \
            types.get(node.inputs[1], (None, None))[1]
        if w is None or not all(isinstance(d, int) for d in w[2:]):
            return
        a["kernel_shape"] = list(w[2:])
    k = list(a["kernel_shape"])
    a.setdefault("strides", [1] * len(k))
    if node.op != "AveragePool":
        a.setdefault("dilations", [1] * len(k))
    auto = a.get("auto_pad", "NOTSET")
    if auto == "VALID":
        a["pads"] = [0] * 2 * len(k)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        shape = types.get(node.inputs[0], (None, None))[1]
        spatial = shape[2:] if shape is not None else ()
        if len(spatial) != len(k) or not all(isinstance(d, int) and d > 0 for d in spatial):
            return  # unknown size: keep auto_pad, the kernels resolve it at run time
        begin, end = [], []
        for size, kk, s, d in zip(spatial, k, a["strides"], a.get("dilations", [1] * len(k))):
            total = max(0, (-(-size // s) - 1) * s + (kk - 1) * d + 1 - size)
            small = total // 2  # the odd pixel goes at the end for UPPER, start for LOWER
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        a["pads"] = begin + end
    else:
        a.setdefault("pads", [0] * 2 * len(k))
    a.pop("auto_pad", None)


# ---- constant folding ---------------------------------------------------------

def _is_symbolic(value) -> bool:
    """A shape vector holding dim symbols (object array of int | str)."""
    return isinstance(value, np.ndarray) and value.dtype == object


def _symbolic(values) -> np.ndarray:
    """An object array of ints and symbols, or int64 once no symbol is left."""
    a = np.empty(np.shape(values), dtype=object)
    a[...] = values
    flat = [v for v in a.reshape(-1)]
    if all(isinstance(v, (int, np.integer)) for v in flat):
        return np.array([int(v) for v in flat], np.int64).reshape(a.shape)
    return np.array([int(v) if isinstance(v, (int, np.integer)) else v for v in flat],
                    dtype=object).reshape(a.shape)


def _fold_symbolic(op, ins, a, symbols: "_Symbols"):
    """Fold shape arithmetic where some entries are dim symbols; None: cannot."""
    def arith(fn, neutral):
        def f(x, y):
            if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)):
                return int(fn(np.int64(x), np.int64(y)))
            if isinstance(y, (int, np.integer)) and y == neutral:  # N * 1, N + 0, ...
                return x
            if op in ("Mul", "Add") and isinstance(x, (int, np.integer)) and x == neutral:
                return y
            return symbols.fresh(x, y)
        return np.frompyfunc(f, 2, 1)

    ops = {"Add": (np.add, 0), "Sub": (np.subtract, 0), "Mul": (np.multiply, 1),
           "Div": (lambda x, y: _int_div(x, y), 1)}
    objs = [None if v is None else np.asarray(v, dtype=object) for v in ins]
    try:
        if op in ops:
            return [_symbolic(arith(*ops[op])(objs[0], objs[1]))]
        if op == "ReduceProd" and objs[0].ndim == 1 and len(ins) == 1 and "axes" not in a:
            value = reduce(lambda x, y: arith(np.multiply, 1)(x, y), list(objs[0]), 1)
            value = np.array(value, dtype=object)
            return [_symbolic(value.reshape((1,) if a.get("keepdims", 1) else ()))]
        if op in ("Cast", "Floor", "Ceil"):
            # a dim symbol is an integer: these keep it (shapes cast to float and
            # back); a computed one ('?k', maybe N / 2) becomes a new unknown
            same = np.frompyfunc(lambda v: symbols.fresh(v) if isinstance(v, str)
                                 and v.startswith("?") else v, 1, 1)
            return [_symbolic(same(objs[0]))]
        if op in ("Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose"):
            if op != "Concat" and any(_is_symbolic(v) for v in ins[1:]):
                return None  # a symbol used as an index or a shape
            out = _FOLD[op]([objs[0]] + list(ins[1:]) if op != "Concat" else objs, a)
            return [_symbolic(v) for v in out]
    except Exception:
        return None
    return None


def _resolve_target(target, x_shape, allowzero) -> np.ndarray | None:
    """A Reshape target with dim symbols as a constant: a symbol that is the
    input's own dim at that position copies it (0), one other unknown entry is
    inferred (-1). None if that does not pin the target."""
    out, unknown = [], 0
    for i, v in enumerate(np.asarray(target).reshape(-1)):
        if isinstance(v, (int, np.integer)):
            out.append(int(v))
        elif not allowzero and x_shape is not None and i < len(x_shape) and x_shape[i] == v:
            out.append(0)
        else:
            unknown += 1
            out.append(-1)
    if unknown > 1 or out.count(-1) > 1:
        return None
    return np.array(out, np.int64)


def _int_div(x, y):
    if np.issubdtype(np.result_type(x, y), np.integer):  # ONNX truncates toward zero
        return (np.abs(x) // np.abs(y) * np.sign(x) * np.sign(y)).astype(np.result_type(x, y))
    return x / y


def _reshape(ins, a):
    x, shape = ins[0], [int(s) for s in ins[1]]
    if not a.get("allowzero", 0):  # 0 copies the input's dim
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _slice(ins, a):
    x, starts, ends = ins[:3]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):  # Python slices clamp like ONNX
        index[int(ax)] = slice(int(s), int(e), int(st))
    return [x[tuple(index)]]


def _constant_of_shape(ins, a):
    value = np.asarray(a.get("value", np.zeros(1, np.float32)))
    return [np.full(tuple(int(d) for d in ins[0]), value.reshape(-1)[0], value.dtype)]


def _reduce(fn):
    def fold(ins, a):
        x = ins[0]
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("axes")
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = None
        else:
            axes = tuple(int(v) for v in np.asarray(axes).reshape(-1))
        return [np.asarray(fn(x, axis=axes, keepdims=bool(a.get("keepdims", 1)))).astype(x.dtype)]
    return fold


_FOLD = {
    "Gather": lambda i, a: [np.take(i[0], i[1], axis=a.get("axis", 0))],
    "Slice": _slice,
    "Concat": lambda i, a: [np.concatenate([x for x in i if x is not None], axis=a["axis"])],
    "Unsqueeze": lambda i, a: [np.expand_dims(i[0], tuple(int(x) for x in i[1]))],
    "Squeeze": lambda i, a: [np.squeeze(i[0], None if len(i) < 2 or i[1] is None
                                        else tuple(int(x) for x in i[1]))],
    "Cast": lambda i, a: [i[0].astype(helper.tensor_dtype_to_np_dtype(a["to"]))],
    "Reshape": _reshape,
    "Range": lambda i, a: [np.arange(i[0], i[1], i[2]).astype(i[0].dtype)],
    "Expand": lambda i, a: [np.broadcast_to(i[0], np.broadcast_shapes(
        i[0].shape, tuple(int(d) for d in i[1]))).copy()],
    "ConstantOfShape": _constant_of_shape,
    "Add": lambda i, a: [np.add(i[0], i[1])],
    "Sub": lambda i, a: [np.subtract(i[0], i[1])],
    "Mul": lambda i, a: [np.multiply(i[0], i[1])],
    "Div": lambda i, a: [_int_div(i[0], i[1])],
    "Transpose": lambda i, a: [np.transpose(i[0], a.get("perm"))],
    "Neg": lambda i, a: [np.negative(i[0])],
    "Abs": lambda i, a: [np.abs(i[0])],
    "Sqrt": lambda i, a: [np.sqrt(i[0])],
    "Reciprocal": lambda i, a: [np.reciprocal(i[0])],
    "Exp": lambda i, a: [np.exp(i[0])],
    "Log": lambda i, a: [np.log(i[0])],
    "Floor": lambda i, a: [np.floor(i[0])],
    "Ceil": lambda i, a: [np.ceil(i[0])],
    "Relu": lambda i, a: [np.maximum(i[0], 0).astype(i[0].dtype)],
    "Pow": lambda i, a: [np.power(i[0], i[1]).astype(i[0].dtype)],
    "Max": lambda i, a: [reduce(np.maximum, [x for x in i if x is not None])],
    "Min": lambda i, a: [reduce(np.minimum, [x for x in i if x is not None])],
    "Sum": lambda i, a: [reduce(np.add, [x for x in i if x is not None])],
    "Equal": lambda i, a: [np.equal(i[0], i[1])],
    "Less": lambda i, a: [np.less(i[0], i[1])],
    "Greater": lambda i, a: [np.greater(i[0], i[1])],
    "Not": lambda i, a: [np.logical_not(i[0])],
    "Where": lambda i, a: [np.where(i[0], i[1], i[2])],
    "Clip": lambda i, a: [np.clip(i[0], *(b if b is not None else v for b, v in zip(
        (i + [None, None])[1:3], (-np.inf, np.inf)))).astype(i[0].dtype)],
    "Flatten": lambda i, a: [i[0].reshape(int(np.prod(i[0].shape[:a.get("axis", 1)])), -1)],
    "Tile": lambda i, a: [np.tile(i[0], [int(r) for r in i[1]])],
    "ReduceProd": _reduce(np.prod),
    "ReduceSum": _reduce(np.sum),
    "ReduceMean": _reduce(np.mean),
    "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
}
