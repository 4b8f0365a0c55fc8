"""One validation pass over an ONNX ModelProto before it is imported, the
ONNX side of qnrt/validate.py: what `qnrt convert` is handed may be
malformed, so every field the importer reads is checked first and a
GraphError names the node, tensor or attribute and what is allowed.

Checked: names are text (valid UTF-8); there is an opset and a graph output,
and a graph input that is not an initializer; every tensor (initializer,
Constant value) has a known data type, non-negative dims and exactly as much
stored data as its dims say, within a size limit, and is not stored outside the
file; graph inputs and outputs have a known element type and text dim names;
every node of the default domain has the attributes its ONNX schema requires,
each of the type the schema gives (no graph, sparse or type attributes on ops
that take none), and Cast a known `to`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from qnrt.errors import QnrtError
from qnrt.graph import GraphError

MAX_TENSOR_BYTES = 2 << 30  # one initializer: more than this is not a model for a device
# ONNX's shape inference (C++, run by the importer) does int64 arithmetic on
# dims and aborts the process on some overflowed results (a std::clamp
# assertion after a Pad of 2^62 was seen): the values it computes dims from
# are bounded first
MAX_DIM_VALUE = 1 << 31
_DIM_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "output_padding",
              "output_shape")
# op -> its inputs that give dims or pads (ints) or scales (floats)
_DIM_INPUTS = {"Pad": (1,), "Reshape": (1,), "Expand": (1,), "Tile": (1,),
               "ConstantOfShape": (0,), "Resize": (2, 3), "Upsample": (1,)}
# TensorProto data types and the field holding their values when not raw_data
_TYPED_FIELD = {
    TensorProto.FLOAT: "float_data", TensorProto.DOUBLE: "double_data",
    TensorProto.INT32: "int32_data", TensorProto.INT16: "int32_data",
    TensorProto.INT8: "int32_data", TensorProto.UINT8: "int32_data",
    TensorProto.UINT16: "int32_data", TensorProto.BOOL: "int32_data",
    TensorProto.FLOAT16: "int32_data", TensorProto.BFLOAT16: "int32_data",
    TensorProto.INT64: "int64_data", TensorProto.UINT32: "uint64_data",
    TensorProto.UINT64: "uint64_data",
}
_NO_SUBGRAPHS = {AttributeProto.GRAPH, AttributeProto.GRAPHS, AttributeProto.SPARSE_TENSOR,
                 AttributeProto.SPARSE_TENSORS, AttributeProto.TYPE_PROTO,
                 AttributeProto.TYPE_PROTOS}
_ATTR_TYPE_NAMES = {v: k for k, v in AttributeProto.AttributeType.items()}


def check_model(model: onnx.ModelProto, source: str = "model") -> None:
    """GraphError for the first malformed thing in `model` (see the module doc)."""
    opset = _opset(model, source)
    g = model.graph
    _text(g.name, "graph name")
    for prop in model.metadata_props:
        _text(prop.key, "metadata key")
        _text(prop.value, f"metadata '{prop.key}'")
    inits = set()
    for t in g.initializer:
        _tensor(t, "initializer")
        inits.add(t.name)
    for t in g.sparse_initializer:
        raise GraphError(f"sparse initializer '{_text(t.values.name, 'tensor name')}' is "
                         "not supported")
    real = []
    for v in g.input:
        _value_info(v, "graph input")
        if v.name not in inits:
            real.append(v)
    if not real:
        raise GraphError(f"{source}: the graph has no input that is not a constant "
                         "(nothing to run on)")
    if not len(g.output):
        raise GraphError(f"{source}: the graph has no output")
    for v in g.output:
        _value_info(v, "graph output")
        if not v.name:
            raise GraphError(f"{source}: a graph output has no name")
    for v in g.value_info:
        _text(v.name, "value_info name")
    constants = {t.name: t for t in g.initializer}
    for k, node in enumerate(g.node):
        _node(node, k, opset)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == AttributeProto.TENSOR and len(node.output):
                    constants[node.output[0]] = a.t
        for i in _DIM_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in constants:
                _dim_values(constants[node.input[i]], node, k, i)


def survives_shape_inference(model: onnx.ModelProto, source: str = "model",
                             input_shape=None) -> None:
    """GraphError if ONNX's shape inference kills the process on this model.

    It is C++ built with assertions: a node inferring a negative dim (say a
    ConvTranspose whose pads exceed its output) makes a later Slice's
    inference abort (std::clamp), and no Python exception is raised. So it is
    tried first in a forked child, with the first real input fixed to
    `input_shape` as the importer will (POSIX only; elsewhere nothing is tried)."""
    if not hasattr(os, "fork"):
        return
    m = model
    if input_shape:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        inits = {t.name for t in m.graph.initializer}
        first = next(v for v in m.graph.input if v.name not in inits)
        shape = first.type.tensor_type.shape
        shape.ClearField("dim")
        for d in input_shape:
            shape.dim.add().dim_value = int(d)
    pid = os.fork()
    if pid == 0:  # the child: only the inference, then out without clean-up
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # its assertion text is not ours
            onnx.shape_inference.infer_shapes(m, data_prop=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise GraphError(f"{source}: ONNX shape inference crashes on this model (signal "
                         f"{os.WTERMSIG(status)}): a node gives an impossible shape, such "
                         "as a negative dimension")


def _opset(model, source) -> int:
    found = None
    for o in model.opset_import:
        _text(o.domain, "opset domain")
        if o.domain in ("", "ai.onnx"):
            found = o.version
    if found is None:
        raise GraphError(f"{source}: no opset for the default ONNX domain")
    return found


def _text(value, what: str) -> str:
    """Protobuf hands an invalid UTF-8 string field back as bytes."""
    if not isinstance(value, str):
        shown = bytes(value)[:40] if isinstance(value, (bytes, bytearray)) else value
        raise GraphError(f"{what} {shown!r} is not valid UTF-8 text")
    return value


def _value_info(v, what: str) -> None:
    name = _text(v.name, f"{what} name")
    t = v.type.tensor_type
    if v.type.HasField("tensor_type") and t.elem_type:
        try:
            helper.tensor_dtype_to_np_dtype(t.elem_type)
        except Exception:
            raise GraphError(f"{what} '{name}' has unknown element type {t.elem_type}") from None
    if v.type.HasField("tensor_type") and t.HasField("shape"):
        for i, d in enumerate(t.shape.dim):  # (a dim <= 0 is dynamic to the importer)
            _text(d.dim_param, f"{what} '{name}' dimension {i}")


def _tensor(t: TensorProto, what: str) -> None:
    """Known type, dims >= 0, the stored data exactly as long as the dims say."""
    name = _text(t.name, f"{what} name")
    label = f"{what} '{name}'" if name else what
    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        raise GraphError(f"{label} is stored outside the file (external data); save the "
                         "model with its weights inside")
    if t.data_type not in _TYPED_FIELD and t.data_type != TensorProto.STRING:
        known = sorted(TensorProto.DataType.Name(k) for k in _TYPED_FIELD)
        raise GraphError(f"{label} has data type {t.data_type}, which is not supported "
                         f"(supported: {', '.join(known)})")
    if t.data_type == TensorProto.STRING:
        raise GraphError(f"{label} is a string tensor, which is not supported")
    count = 1
    for d in t.dims:
        if d < 0:
            raise GraphError(f"{label} has dims {list(t.dims)}: a dimension is negative")
        count *= d
    itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if count * itemsize > MAX_TENSOR_BYTES:
        raise GraphError(f"{label} has dims {list(t.dims)}: {count * itemsize:,} bytes, more "
                         f"than {MAX_TENSOR_BYTES:,}")
    if t.HasField("raw_data"):
        stored, unit = len(t.raw_data), itemsize
        if stored != count * itemsize:
            raise GraphError(f"{label} has dims {list(t.dims)} ({count:,} values of "
                             f"{unit} bytes) but {stored:,} bytes of data")
        return
    typed = _TYPED_FIELD[t.data_type]
    stored = len(getattr(t, typed))
    for other in set(_TYPED_FIELD.values()) - {typed}:
        if len(getattr(t, other)):
            raise GraphError(f"{label} of type {TensorProto.DataType.Name(t.data_type)} "
                             f"stores its values in {other}, not {typed}")
    if stored != count:
        raise GraphError(f"{label} has dims {list(t.dims)} ({count:,} values) but stores "
                         f"{stored:,} values")


def _node(node, k: int, opset: int) -> None:
    op = _text(node.op_type, f"node {k}'s op type")
    name = _text(node.name, f"node {k}'s name")
    label = f"node {k} '{name}' ({op})" if name else f"node {k} ({op})"
    domain = _text(node.domain, f"{label} domain")
    if not op:
        raise GraphError(f"{label} has no op type")
    for i in list(node.input) + list(node.output):
        _text(i, f"{label} tensor name")
    if not len(node.output) or not node.output[0]:
        raise GraphError(f"{label} has no output (its first output needs a name)")
    schema = None
    if domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(op, opset)
        except Exception:  # an op unknown to ONNX: the importer names it as unsupported
            schema = None
    given = {}
    for a in node.attribute:
        key = _text(a.name, f"{label} attribute name")
        if a.type not in _ATTR_TYPE_NAMES or a.type == AttributeProto.UNDEFINED:
            raise GraphError(f"{label}: attribute '{key}' has unknown type {a.type}")
        if a.type in _NO_SUBGRAPHS and op not in ("If", "Loop", "Scan"):
            raise GraphError(f"{label}: attribute '{key}' is a "
                             f"{_ATTR_TYPE_NAMES[a.type].lower()}, which {op} does not take")
        if a.type == AttributeProto.TENSOR:
            _tensor(a.t, f"{label} attribute '{key}'")
        if key in _DIM_ATTRS and a.type in (AttributeProto.INTS, AttributeProto.INT):
            values = list(a.ints) if a.type == AttributeProto.INTS else [a.i]
            if any(abs(v) > MAX_DIM_VALUE for v in values):
                raise GraphError(f"{label}: attribute '{key}' is {values}; dims and pads are "
                                 f"at most {MAX_DIM_VALUE:,} in size")
        if a.type == AttributeProto.STRING:
            _attr_text(a.s, label, key)
        if a.type == AttributeProto.STRINGS:
            for s in a.strings:
                _attr_text(s, label, key)
        given[key] = a.type
    if schema is None:
        return
    for key, spec in schema.attributes.items():
        want = int(spec.type.value) if hasattr(spec.type, "value") else int(spec.type)
        if key in given and want and given[key] != want:
            raise GraphError(f"{label}: attribute '{key}' is {_ATTR_TYPE_NAMES[given[key]]}, "
                             f"{op} takes {_ATTR_TYPE_NAMES.get(want, want)}")
        if spec.required and key not in given:
            raise GraphError(f"{label} has no attribute '{key}', which {op} requires")
    if op == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        try:
            helper.tensor_dtype_to_np_dtype(to)
        except Exception:
            raise GraphError(f"{label}: attribute 'to' is {to}, not a known data type") from None
    if op == "Constant" and sum(1 for a in node.attribute if a.name.startswith("value")
                                or a.name == "sparse_value") != 1:
        raise GraphError(f"{label} needs exactly one value attribute")


def _dim_values(t: TensorProto, node, k: int, i: int) -> None:
    """A constant input giving dims, pads or scales: within MAX_DIM_VALUE."""
    if t.data_type in (TensorProto.STRING,) or _count(t) > 64:
        return
    values = numpy_helper.to_array(t).reshape(-1)
    bad = [v for v in values.tolist()
           if not (isinstance(v, (int, float)) and abs(v) <= MAX_DIM_VALUE)]
    if bad:
        raise GraphError(f"node {k} '{node.name}' ({node.op_type}): input {i} "
                         f"'{node.input[i]}' holds {bad[0]!r}; dims, pads and scales are at "
                         f"most {MAX_DIM_VALUE:,} in size")


def _count(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _attr_text(value: bytes, label: str, key: str) -> None:
    try:
        bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise GraphError(f"{label}: attribute '{key}' is not valid UTF-8 text") from None


@contextmanager
def malformed(source: str):
    """The last resort behind check_model, around the import: an exception of
    the kinds malformed input raises deep in the importer becomes a GraphError
    naming the file and what was found (check_model should have named it)."""
    try:
        yield
    except QnrtError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration,
            ZeroDivisionError, OverflowError, UnicodeError, RecursionError) as exc:
        raise GraphError(f"{source}: malformed ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'})"
                         ) from exc
