"""qnrt Graph -> ONNX ModelProto.

The IR follows ONNX at opset >= 13 (Clip bounds, Squeeze/Unsqueeze axes and
Reshape shape are inputs), plus a few runtime-only extensions that are lowered
to plain ONNX here:
  * Conv with a fused `activation` (slope for PRelu as input 3, shape (Cout,))
    becomes Conv + the activation node;
  * SiLU (x * sigmoid(x), standalone or fused) becomes Sigmoid + Mul;
  * Reduce* axes and Split sizes move between attribute and input as the
    target opset wants (inputs from 18, ReduceSum and Split from 13);
  * Softmax with `legacy_axis_semantics` (opset < 13 meaning: flatten to 2-D at
    `axis`) is emulated on opset >= 13, and per-axis Softmax on opset < 13;
  * attributes that the op's ONNX schema does not define are dropped.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnrt import __version__
from qnrt.atomic import temp_beside
from qnrt.graph import Graph, GraphError, Node, ValueInfo, unique_name

MIN_OPSET = 11  # Clip takes min/max as inputs from 11 on; older forms are not emitted
# the opset from which these ops take their axes (Split: its sizes) as an input
AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18,
                    "ReduceProd": 18, "ReduceL1": 18, "ReduceL2": 18, "ReduceLogSum": 18,
                    "ReduceLogSumExp": 18, "ReduceSumSquare": 18, "Split": 13}


def to_onnx(graph: Graph, opset: int = 17) -> onnx.ModelProto:
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} not supported (use {MIN_OPSET}.."
                         f"{onnx.defs.onnx_opset_version()})")
    # Softmax lowering depends on ranks, which only ONNX shape inference knows:
    # a draft (Softmax as-is; it keeps its input's shape) supplies them
    draft = onnx.shape_inference.infer_shapes(_Exporter(graph, opset).model())
    shapes = {v.name: tuple(d.dim_value if d.HasField("dim_value") else None
                            for d in v.type.tensor_type.shape.dim)
              for v in list(draft.graph.value_info) + list(draft.graph.input)
              + list(draft.graph.output) if v.type.tensor_type.HasField("shape")}
    return _Exporter(graph, opset, shapes).model()


def save_onnx(graph: Graph, path, opset: int = 17) -> None:
    """Write atomically so a crash never leaves a truncated model at `path`."""
    data = to_onnx(graph, opset).SerializeToString()
    path = os.fspath(path)
    fd, tmp = temp_beside(path)  # also removes what a killed writer left
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"metadata value {value!r} is not JSON-serialisable")


def _value_info(vi):
    shape = None if vi.shape is None else [d if isinstance(d, str) else
                                           None if d is None else int(d) for d in vi.shape]
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(vi.dtype))
    return helper.make_tensor_value_info(vi.name, dtype, shape)


class _Exporter:
    def __init__(self, graph: Graph, opset: int, shapes: dict | None = None):
        # work on a topologically sorted copy: ONNX requires that order
        self.g = Graph(list(graph.nodes), graph.inputs, graph.outputs,
                       graph.initializers, graph.metadata, graph.name)
        self.g.toposort()
        self.g.validate()
        self.opset, self.shapes = opset, shapes  # shapes: None in the draft
        self.inits = dict(graph.initializers)
        self.taken = set(self.inits) | {v.name for v in graph.inputs}
        self.taken |= {t for n in graph.nodes for t in n.inputs + n.outputs}
        self.node_names: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []

    # ---- helpers -------------------------------------------------------
    def fresh(self, base: str) -> str:
        return unique_name(base, self.taken)

    def const(self, base: str, value) -> str:
        name = self.fresh(base)
        self.inits[name] = np.asarray(value)
        return name

    def emit(self, op, inputs, outputs, name, attrs=None):
        try:
            schema = onnx.defs.get_schema(op, self.opset)
        except onnx.defs.SchemaError:
            raise GraphError(f"node '{name}' ({op}) has no ONNX equivalent at opset "
                             f"{self.opset}") from None
        protos = []
        for key, value in (attrs or {}).items():
            spec = schema.attributes.get(key)
            if spec is None or value is None:
                continue  # a runtime-only hint, meaningless to ONNX
            protos.append(_make_attr(key, value, spec.type))
        inputs = list(inputs)
        while inputs and not inputs[-1]:
            inputs.pop()  # omitted trailing optional inputs
        base, k = name or outputs[0], 0
        unique = base
        while unique in self.node_names:
            k += 1
            unique = f"{base}_{k}"
        self.node_names.add(unique)
        node = helper.make_node(op, inputs, outputs, name=unique)
        node.attribute.extend(protos)
        self.nodes.append(node)

    # ---- lowering ------------------------------------------------------
    def node(self, n: Node):
        op, a, ins, outs = n.op, dict(n.attrs), list(n.inputs), list(n.outputs)
        name = n.name or outs[0]
        if op == "Conv":
            act = a.pop("activation", "") or ""
            if act:
                mid = self.fresh(f"{outs[0]}/conv")
                self.emit("Conv", ins[:3], [mid], name, a)
                slope = ins[3] if len(ins) > 3 else ""
                return self.activation(act, mid, outs[0], slope, a, f"{name}/{act}")
            return self.emit("Conv", ins[:3], outs, name, a)
        if op == "HardSwish":
            return self.hardswish(ins[0], outs[0], name)
        if op == "SiLU":
            return self.silu(ins[0], outs[0], name)
        if op == "Softmax":
            return self.softmax(ins[0], outs[0], name, a)
        if op == "Clip":
            ins += [""] * (3 - len(ins))
            for i, key in ((1, "min"), (2, "max")):
                if a.get(key) is not None:
                    ins[i] = self.const(f"{name}.{key}", np.float32(a.pop(key)))
        if op in ("Squeeze", "Unsqueeze"):
            axes = a.pop("axes", None)
            if self.opset >= 13 and axes is not None:
                ins = [ins[0], self.const(f"{name}.axes", np.asarray(axes, np.int64))]
            elif self.opset < 13 and len(ins) > 1 and ins[1]:
                if ins[1] not in self.inits:
                    raise GraphError(f"{n.where()}: opset {self.opset} needs constant axes")
                a["axes"] = self.inits[ins[1]].reshape(-1).tolist()
                ins = ins[:1]
            elif axes is not None:
                a["axes"] = axes
        if op in AXES_INPUT_SINCE:  # Reduce*/Split: axes (split sizes) attr <-> input
            key = "split" if op == "Split" else "axes"
            value = a.pop(key, None)
            if self.opset >= AXES_INPUT_SINCE[op]:
                if value is not None:
                    ins = [ins[0], self.const(f"{name}.{key}", np.asarray(value, np.int64))]
            elif len(ins) > 1 and ins[1]:
                if ins[1] not in self.inits:
                    raise GraphError(f"{n.where()}: opset {self.opset} needs constant {key}")
                a[key] = self.inits[ins[1]].reshape(-1).tolist()
                ins = ins[:1]
            elif value is not None:
                a[key] = value
            if op == "Split" and self.opset < 18:
                a.pop("num_outputs", None)
        if op == "Dropout" and self.opset >= 12 and "ratio" in a:
            ins = [ins[0], self.const(f"{name}.ratio", np.float32(a.pop("ratio")))]
        self.emit(op, ins, outs, name, a)

    def activation(self, act, x, y, slope, a, name):
        if act in ("Relu", "Sigmoid"):
            self.emit(act, [x], [y], name)
        elif act == "LeakyRelu":
            self.emit(act, [x], [y], name, {"alpha": a.get("activation_alpha", 0.01)})
        elif act == "HardSigmoid":
            self.emit(act, [x], [y], name, {"alpha": a.get("activation_alpha", 0.2),
                                            "beta": a.get("activation_beta", 0.5)})
        elif act == "HardSwish":
            self.hardswish(x, y, name)
        elif act == "SiLU":
            self.silu(x, y, name)
        elif act == "Clip":
            self.node(Node("Clip", [x], [y], {"min": a.get("activation_min"),
                                              "max": a.get("activation_max")}, name))
        elif act == "PRelu":
            if not slope:
                raise GraphError(f"node '{name}': fused PRelu needs a slope as Conv input 3")
            # the fused slope is (C,); ONNX broadcasts PRelu's slope against NCHW
            if slope in self.inits:
                s = self.const(f"{slope}/c11", self.inits[slope].reshape(-1, 1, 1))
            else:
                s = self.fresh(f"{slope}/c11")
                self.emit("Reshape", [slope, self.const(f"{s}.shape", np.array([-1, 1, 1]))],
                          [s], f"{name}/reshape")
            self.emit("PRelu", [x, s], [y], name)
        else:
            raise GraphError(f"node '{name}': unknown fused activation '{act}'")

    def hardswish(self, x, y, name):
        if self.opset >= 14:
            return self.emit("HardSwish", [x], [y], name)
        h = self.fresh(f"{y}/hsig")  # HardSwish(x) = x * HardSigmoid(x; 1/6, 1/2)
        self.emit("HardSigmoid", [x], [h], f"{name}/hsig", {"alpha": 1 / 6, "beta": 0.5})
        self.emit("Mul", [x, h], [y], name)

    def silu(self, x, y, name):
        s = self.fresh(f"{y}/sigmoid")  # SiLU(x) = x * Sigmoid(x)
        self.emit("Sigmoid", [x], [s], f"{name}/sigmoid")
        self.emit("Mul", [x, s], [y], name)

    def softmax(self, x, y, name, a):
        legacy = bool(a.get("legacy_axis_semantics", False))
        axis = int(a.get("axis", 1 if legacy else -1))
        dims = (self.shapes or {}).get(x)
        rank = None if dims is None else len(dims)
        if rank:
            axis %= rank
        last = axis == -1 or axis == (rank or 0) - 1  # there both meanings coincide
        if self.shapes is None or legacy == (self.opset < 13) or last:
            return self.emit("Softmax", [x], [y], name, {"axis": axis})
        if legacy and rank and sum(d is None for d in dims[axis:]) <= 1:
            # opset >= 13: softmax over the trailing dims merged into one, then split
            # them again (Reshape's 0 keeps a leading dim, -1 the one unknown dim)
            flat, sm = self.fresh(f"{y}/flat"), self.fresh(f"{y}/softmax")
            keep = [0] * axis
            self.emit("Reshape", [x, self.const(f"{flat}.shape", np.array(keep + [-1]))],
                      [flat], f"{name}/flatten")
            self.emit("Softmax", [flat], [sm], name, {"axis": -1})
            tail = [-1 if d is None else d for d in dims[axis:]]
            return self.emit("Reshape", [sm, self.const(f"{y}.shape", np.array(keep + tail))],
                             [y], f"{name}/reshape")
        if legacy:  # rank or several trailing dims unknown: restore the shape at run time
            flat, sm, shape = (self.fresh(f"{y}/{s}") for s in ("flat", "softmax", "shape"))
            self.emit("Flatten", [x], [flat], f"{name}/flatten", {"axis": axis})
            self.emit("Softmax", [flat], [sm], name, {"axis": -1})
            self.emit("Shape", [x], [shape], f"{name}/shape")
            return self.emit("Reshape", [sm, shape], [y], f"{name}/reshape")
        if rank is not None:  # opset < 13 would flatten: move `axis` last and back
            perm = [i for i in range(rank) if i != axis] + [axis]
            t, sm = self.fresh(f"{y}/in"), self.fresh(f"{y}/softmax")
            self.emit("Transpose", [x], [t], f"{name}/in", {"perm": perm})
            self.emit("Softmax", [t], [sm], name, {"axis": -1})
            return self.emit("Transpose", [sm], [y], f"{name}/out",
                             {"perm": np.argsort(perm).tolist()})
        # rank unknown: spell out exp(x - max) / sum along `axis`
        m, d, e, s = (self.fresh(f"{y}/{k}") for k in ("max", "sub", "exp", "sum"))
        self.emit("ReduceMax", [x], [m], f"{name}/max", {"axes": [axis], "keepdims": 1})
        self.emit("Sub", [x, m], [d], f"{name}/sub")
        self.emit("Exp", [d], [e], f"{name}/exp")
        self.emit("ReduceSum", [e], [s], f"{name}/sum", {"axes": [axis], "keepdims": 1})
        self.emit("Div", [e, s], [y], name)

    def model(self) -> onnx.ModelProto:
        for n in self.g.nodes:
            self.node(n)
        used = {i for n in self.nodes for i in n.input} | {v.name for v in self.g.outputs}
        inits = [numpy_helper.from_array(np.asarray(v), k)
                 for k, v in self.inits.items() if k in used]
        outputs = [_value_info(v) for v in self.g.outputs]
        for v, proto in zip(self.g.outputs, outputs):
            if v.shape is None and self.shapes is not None:  # ONNX requires a shape
                if v.name not in self.shapes:
                    raise GraphError(f"graph output '{v.name}' has no shape and ONNX shape "
                                     "inference cannot find its rank")
                proto.CopyFrom(_value_info(ValueInfo(v.name, self.shapes[v.name], v.dtype)))
        graph = helper.make_graph(self.nodes, self.g.name or "graph",
                                  [_value_info(v) for v in self.g.inputs], outputs, inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qnrt",
                                  producer_version=__version__,
                                  ir_version=helper.find_min_ir_version_for(opsets))
        helper.set_model_props(model, {k: json.dumps(v, default=_json_default)
                                       for k, v in self.g.metadata.items()})
        return model


def _make_attr(key, value, spec_type):
    """Coerce by the schema's type: an IR epsilon of 1 must still be a FLOAT."""
    kind = onnx.AttributeProto.AttributeType.Value(spec_type.name)
    A = onnx.AttributeProto
    if kind == A.FLOAT:
        value = float(value)
    elif kind == A.INT:
        value = int(value)
    elif kind == A.FLOATS:
        value = [float(v) for v in value]
    elif kind == A.INTS:
        value = [int(v) for v in value]
    elif kind == A.TENSOR and not isinstance(value, onnx.TensorProto):
        value = numpy_helper.from_array(np.asarray(value))
    return helper.make_attribute(key, value, attr_type=kind)
