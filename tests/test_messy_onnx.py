"""ONNX models written the way converters write them (tf2onnx/keras2onnx NHWC
Transposes, weights in Constant nodes, no-op Casts, run-time shape arithmetic,
batch norm as elementwise ops, activations spelled out), at opsets 11-21 and
from torch.onnx. Each is imported with clean-up (the pattern must be rewritten),
converted to .qnb and run by qnrt.Session against onnxruntime on the ORIGINAL model.

`messy_models()` is also what `tools/conformance.py --self-test` runs.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest

import helpers
from helpers import load_tool, ort_session
from onnx import TensorProto, helper, numpy_helper

from qnrt.exporters import from_onnx, to_onnx
from qnrt.exporters.cleanup import summary
from qnrt.exporters.convert import convert
from qnrt import Session
from qnrt.graph import GraphError

OPSETS = (11, 13, 17, 21)


# ---- building converter-style graphs ----------------------------------------------------

class Builder:
    """Appends ONNX nodes; weights go into Constant nodes (tf2onnx/torch without
    folding) or initializers."""

    def __init__(self, opset: int, constants: bool = True, seed: int = 0):
        self.opset, self.constants = opset, constants
        self.nodes: list = []
        self.inits: list = []
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, value, base="const") -> str:
        value = np.asarray(value)
        name = self.name(base)
        if self.constants:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.name("Constant"),
                                               value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op, inputs, n_out=1, **attrs) -> str:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0]

    def f32(self, *shape, scale=1.0, positive=False):
        v = self.rng.standard_normal(shape) * scale
        return (np.abs(v) + 0.5 if positive else v).astype(np.float32)

    def conv(self, x, cin, cout, k=3, bias=True, stride=1):
        w = self.const(self.f32(cout, cin, k, k, scale=1 / np.sqrt(cin * k * k)), "weight")
        ins = [x, w] + ([self.const(self.f32(cout, scale=0.1), "bias")] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2)

    def cast(self, x, to=TensorProto.FLOAT):  # a no-op Cast, as converters leave them
        return self.op("Cast", [x], to=to)

    def transpose(self, x, perm):
        return self.op("Transpose", [x], perm=list(perm))

    def clip(self, x, lo, hi):
        return self.op("Clip", [x, self.const(np.float32(lo)), self.const(np.float32(hi))])

    def unsqueeze(self, x, axes):
        if self.opset < 13:
            return self.op("Unsqueeze", [x], axes=list(axes))
        return self.op("Unsqueeze", [x, self.const(np.array(axes, np.int64))])

    def reduce_mean(self, x, axes, keepdims):
        if self.opset < 18:
            return self.op("ReduceMean", [x], axes=list(axes), keepdims=keepdims)
        return self.op("ReduceMean", [x, self.const(np.array(axes, np.int64))], keepdims=keepdims)

    def model(self, inputs: dict, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "messy",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="messy-test",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        onnx.shape_inference.infer_shapes(model, strict_mode=True)  # nodes match their schemas
        return model


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    feeds: dict  # input name -> array
    check: Callable | None = None  # check(graph, counts) after import with clean-up
    expected: list | None = None  # an independent reference (torch), where there is one
    opset: int = 0


def _x(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def ops_of(graph) -> Counter:
    return Counter(n.op for n in graph.nodes)


# ---- the cases -----------------------------------------------------------------------------

def tf_nhwc(opset) -> Case:
    """tf2onnx/keras2onnx style: NHWC input, a Transpose pair around every conv and
    pool, batch norm as Mul/Add on NHWC (per-channel (C,) constants), a residual
    Add, an edge Pad and a channel Concat in NHWC, hard-swish spelled x*relu6(x+3)/6, global
    average pool as ReduceMean over H, W, a MatMul head."""
    b = Builder(opset)
    nchw, nhwc = (0, 3, 1, 2), (0, 2, 3, 1)
    x = b.cast("x")
    c1 = b.conv(b.transpose(x, nchw), 3, 8)
    t1 = b.transpose(c1, nhwc)
    bn = b.op("Add", [b.op("Mul", [t1, b.const(b.f32(8, positive=True))]), b.const(b.f32(8))])
    r = b.op("Relu", [bn])
    r2 = b.op("Relu", [b.transpose(b.conv(b.transpose(r, nchw), 8, 8), nhwc)])
    s = b.op("Add", [r2, r])
    s = b.op("Pad", [s, b.const(np.array([0, 0, 0, 0, 0, 1, 1, 0], np.int64))], mode="edge")
    u = b.transpose(b.op("MaxPool", [b.transpose(s, nchw)], kernel_shape=[2, 2], strides=[2, 2]),
                    nhwc)
    v1 = b.transpose(b.conv(b.transpose(u, nchw), 8, 4), nhwc)
    v2 = b.transpose(b.conv(b.transpose(u, nchw), 8, 4, k=1), nhwc)
    cat = b.op("Concat", [v1, b.cast(v2)], axis=3)
    relu6 = b.clip(b.op("Add", [cat, b.const(np.float32(3))]), 0, 6)
    hs = b.op("Div", [b.op("Mul", [cat, relu6]), b.const(np.float32(6))])
    gap = b.reduce_mean(hs, [1, 2], keepdims=0)
    y = b.op("Add", [b.op("MatMul", [gap, b.const(b.f32(8, 5))]), b.const(b.f32(5))])
    model = b.model({"x": ["N", 8, 8, 3]}, [y])

    def check(g, counts):
        ops = ops_of(g)
        assert ops["Transpose"] == 1  # the input's NHWC -> NCHW: the one layout change
        assert g.inputs[0].shape == ("N", 8, 8, 3)  # the model's own interface is kept
        assert not {"Mul", "Div", "Clip", "Cast", "ReduceMean", "Constant"} & set(ops)
        assert ops["HardSwish"] == 1 and ops["GlobalAveragePool"] == 1 and ops["Conv"] == 4
        pad = next(n for n in g.nodes if n.op == "Pad")  # now NCHW: pads on H, W
        assert g.initializers[pad.inputs[1]].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
        assert ops["Add"] == 2  # the residual and the head's bias; the batch norm is gone
        assert counts["batch norms fused"] == 1 and counts["Transposes removed"] == 9
        assert counts["HardSwish"] == 1
    return Case("tf_nhwc", model, {"x": _x((2, 8, 8, 3), 1)}, check)


def nhwc_flatten(opset) -> Case:
    """NHWC flatten with tf2onnx's shape chain on a dynamic batch: the Transpose
    before the Reshape must stay (element order), the batch stays dynamic."""
    b = Builder(opset, constants=False)
    t = b.transpose(b.op("Relu", [b.conv(b.transpose("x", (0, 3, 1, 2)), 3, 4)]), (0, 2, 3, 1))
    shape = b.op("Shape", [t])
    n = b.op("Slice", [shape, b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64))])
    target = b.op("Concat", [n, b.const(np.array([-1], np.int64))], axis=0)
    flat = b.op("Reshape", [t, b.cast(target, TensorProto.INT64)])
    y = b.op("Gemm", [flat, b.const(b.f32(6, 6 * 6 * 4)), b.const(b.f32(6))], transB=1)
    model = b.model({"x": ["N", 6, 6, 3]}, [y])

    def check(g, counts):
        ops = ops_of(g)
        assert ops["Transpose"] == 2 and not {"Shape", "Slice", "Concat", "Cast"} & set(ops)
        reshape = next(n for n in g.nodes if n.op == "Reshape")
        assert g.initializers[reshape.inputs[1]].tolist() == [0, -1]
        assert g.outputs[0].shape[0] == "N" and counts["dynamic reshapes resolved"] == 1
    return Case("nhwc_flatten", model, {"x": _x((3, 6, 6, 3), 2)}, check)


def torch_flatten_chain(opset) -> Case:
    """torch's x.view(x.size(0), -1) on a dynamic batch: Shape -> Gather(0) ->
    Unsqueeze -> Concat(-1) -> Reshape, plus Constant-node weights and no-op Casts."""
    b = Builder(opset)
    c = b.op("Relu", [b.cast(b.conv(b.cast("x"), 3, 4))])
    n = b.unsqueeze(b.op("Gather", [b.op("Shape", [c]), b.const(np.array(0, np.int64))], axis=0), [0])
    target = b.op("Concat", [n, b.const(np.array([-1], np.int64))], axis=0)
    y = b.op("Reshape", [c, target])
    model = b.model({"x": ["N", 3, 5, 5]}, [y])

    def check(g, counts):
        assert [n.op for n in g.nodes] == ["Conv", "Relu", "Reshape"]
        reshape = g.nodes[-1]
        assert g.initializers[reshape.inputs[1]].tolist() == [0, -1]
        assert counts["no-op nodes removed"] == 2 and counts["constants folded"] >= 5
    return Case("torch_flatten_chain", model, {"x": _x((2, 3, 5, 5), 3)}, check)


def bn_mul_add(opset) -> Case:
    """Batch norm folded by a converter into Mul/Add after the conv ((1,C,1,1) and
    (C,1,1) constants), and a trap: a (W,) constant with W == C broadcasts along
    the width, not the channels, so it must not be folded."""
    b = Builder(opset)
    c = b.conv("x", 3, 4, bias=False)
    bn = b.op("Add", [b.op("Mul", [c, b.const(b.f32(1, 4, 1, 1, positive=True))]),
                      b.const(b.f32(4, 1, 1))])
    c2 = b.conv(b.op("Relu", [bn]), 4, 4)
    y = b.op("Mul", [c2, b.const(b.f32(4, positive=True))])  # per column: stays
    model = b.model({"x": [1, 3, 4, 4]}, [y])

    def check(g, counts):
        assert [n.op for n in g.nodes] == ["Conv", "Relu", "Conv", "Mul"]
        assert counts["batch norms fused"] == 1
    return Case("bn_mul_add", model, {"x": _x((1, 3, 4, 4), 4)}, check)


def bn_sub_div(opset) -> Case:
    """(x - mean) / sqrt(var + eps) * gamma + beta written out (from opset 17 as
    (1 / sqrt(var + eps)) * (x - mean)), with sqrt(var + eps) computed from
    Constant nodes at run time, after a bias-free conv; then an
    unfused BatchNormalization after a conv, and one after an Add (stays)."""
    b = Builder(opset)
    c = b.conv("x", 3, 6, bias=False)
    std = b.op("Sqrt", [b.op("Add", [b.const(b.f32(6, 1, 1, positive=True)),
                                     b.const(np.float32(1e-3))])])
    y = b.op("Sub", [c, b.const(b.f32(1, 6, 1, 1))])
    if opset >= 17:  # * (1 / sqrt(var + eps)) instead of / sqrt(var + eps)
        y = b.op("Mul", [b.op("Reciprocal", [std]), y])
    else:
        y = b.op("Div", [y, std])
    y = b.op("Mul", [y, b.const(b.f32(6, 1, 1, positive=True))])
    y = b.op("Add", [y, b.const(b.f32(6, 1, 1))])
    bn_params = [b.const(b.f32(6, positive=True)), b.const(b.f32(6)), b.const(b.f32(6)),
                 b.const(b.f32(6, positive=True))]
    c2 = b.op("BatchNormalization", [b.conv(y, 6, 6)] + bn_params, epsilon=1e-3)
    s = b.op("Add", [c2, y])
    out = b.op("BatchNormalization", [s] + bn_params)
    model = b.model({"x": [1, 3, 6, 6]}, [out])

    def check(g, counts):
        ops = ops_of(g)
        assert ops == Counter({"Conv": 2, "BatchNormalization": 2, "Add": 1})
        assert counts["batch norms fused"] == 1  # qnrt.rewrite folds the Conv -> BN one
    return Case("bn_sub_div", model, {"x": _x((1, 3, 6, 6), 5)}, check)


def silu(opset) -> Case:
    """x * sigmoid(x) after a conv (both operand orders) and on a graph input."""
    b = Builder(opset)
    c = b.conv("x", 3, 4)
    a = b.op("Mul", [c, b.op("Sigmoid", [c])])
    c2 = b.conv(a, 4, 4)
    a2 = b.op("Mul", [b.op("Sigmoid", [c2]), c2])
    s = b.op("Mul", ["z", b.op("Sigmoid", ["z"])])
    y = b.op("Add", [a2, s])
    model = b.model({"x": [2, 3, 5, 5], "z": [2, 4, 5, 5]}, [y])

    def check(g, counts):
        assert ops_of(g) == Counter({"Conv": 2, "SiLU": 3, "Add": 1})
        assert counts["SiLU"] == 3
    return Case("silu", model, {"x": _x((2, 3, 5, 5), 6), "z": _x((2, 4, 5, 5), 7, 3)}, check)


def hardswish(opset) -> Case:
    """hard-swish three ways: x*HardSigmoid(x; 1/6, 1/2), x*relu6(x+3)/6 with Div,
    x*(relu6(x+3)*(1/6)); plus clip(x/6 + 1/2, 0, 1) -> HardSigmoid."""
    b = Builder(opset)
    c = b.conv("x", 3, 4)
    h1 = b.op("Mul", [c, b.op("HardSigmoid", [c], alpha=1 / 6, beta=0.5)])
    c2 = b.conv(h1, 4, 4)
    h2 = b.op("Div", [b.op("Mul", [c2, b.clip(b.op("Add", [c2, b.const(np.float32(3))]), 0, 6)]),
                      b.const(np.float32(6))])
    c3 = b.conv(h2, 4, 4)
    gate = b.op("Mul", [b.clip(b.op("Add", [b.const(np.float32(3)), c3]), 0, 6),
                        b.const(np.float32(1 / 6))])
    h3 = b.op("Mul", [gate, c3])
    hs = b.clip(b.op("Add", [b.op("Div", [h3, b.const(np.float32(6))]), b.const(np.float32(0.5))]),
                0, 1)
    model = b.model({"x": [1, 3, 6, 6]}, [hs])

    def check(g, counts):
        assert ops_of(g) == Counter({"Conv": 3, "HardSwish": 3, "HardSigmoid": 1})
        hsig = next(n for n in g.nodes if n.op == "HardSigmoid")
        assert abs(hsig.attrs["alpha"] - 1 / 6) < 1e-6 and abs(hsig.attrs["beta"] - 0.5) < 1e-6
        assert counts["HardSwish"] == 3 and counts["HardSigmoid"] == 1
    return Case("hardswish", model, {"x": _x((1, 3, 6, 6), 8, 3)}, check)


def relu_minmax(opset) -> Case:
    """ReLU6 as Clip and as Min(Max(x, 0), 6) and Max(Min(x, 6), 0), ReLU as
    Max(x, 0), LeakyReLU as Max(x, 0.01x), a plain clip as Max(x, -1)."""
    b = Builder(opset)
    zero, six = b.const(np.float32(0)), b.const(np.float32(6))
    c = b.clip(b.conv("x", 3, 4), 0, 6)
    c = b.op("Min", [b.op("Max", [b.conv(c, 4, 4), zero]), six])
    c = b.op("Max", [b.op("Min", [b.conv(c, 4, 4), six]), zero])
    c = b.op("Max", [b.conv(c, 4, 4), zero])
    c = b.conv(c, 4, 4)
    c = b.op("Max", [c, b.op("Mul", [c, b.const(np.float32(0.01))])])
    y = b.op("Max", [b.const(np.float32(-1)), b.conv(c, 4, 4, bias=False)])
    model = b.model({"x": [1, 3, 5, 5]}, [y])

    def check(g, counts):
        ops = ops_of(g)
        assert ops == Counter({"Conv": 6, "Clip": 4, "Relu": 1, "LeakyRelu": 1})
        bounds = [[float(g.initializers[i]) if i else None for i in n.inputs[1:]]
                  for n in g.nodes if n.op == "Clip"]
        assert bounds == [[0, 6]] * 3 + [[-1]]
        assert counts["ReLU6"] == 2 and counts["LeakyRelu"] == 1 and counts["Relu"] == 1
    return Case("relu_minmax", model, {"x": _x((1, 3, 5, 5), 9, 4)}, check)


def torch_net(opset, constant_folding) -> Case:
    """A small torch net (SiLU, Hardswish, ReLU6, LeakyReLU, BN, view-flatten) from
    torch.onnx.export(dynamo=False) with a dynamic batch."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                   nn.BatchNorm2d(8), nn.Hardswish())
            self.c = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU6(), nn.MaxPool2d(2))
            self.d = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.LeakyReLU(0.2))
            self.fc = nn.Linear(4 * 4 * 4, 5)

        def forward(self, x):
            y = self.d(self.c(self.b(self.a(x))))
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(opset)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), buf, dynamo=False,
                          opset_version=opset, input_names=["x"], output_names=["y"],
                          do_constant_folding=constant_folding,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    x = _x((3, 3, 8, 8), 10)
    with torch.no_grad():
        expected = [net(torch.from_numpy(x)).numpy()]

    def check(g, counts):
        ops = ops_of(g)
        assert ops["SiLU"] == 1 and ops["HardSwish"] == 1 and ops["Clip"] == 1
        assert not {"Sigmoid", "Mul", "HardSigmoid", "Shape", "Gather", "Concat"} & set(ops)
        assert g.inputs[0].shape[0] == "N" and counts["dynamic reshapes resolved"] == 1
    return Case(f"torch_net{'' if constant_folding else '_nofold'}", model, {"x": x}, check,
                expected)


HAND_BUILT = (tf_nhwc, nhwc_flatten, torch_flatten_chain, bn_mul_add, bn_sub_div, silu,
              hardswish, relu_minmax)


def messy_models(torch_models: bool = True) -> list[Case]:
    """Every model these tests build (for tools/conformance.py --self-test)."""
    cases = []
    for opset in OPSETS:
        for make in HAND_BUILT:
            case = make(opset)
            case.opset = opset
            cases.append(case)
    if torch_models:
        for opset in (11, 13, 17):
            for folding in (True, False):
                case = torch_net(opset, folding)
                case.opset = opset
                cases.append(case)
    return cases


# ---- running them ----------------------------------------------------------------------------

def ort_outputs(model, feeds):
    return ort_session(model).run(None, feeds)


def assert_close(got, ref):
    helpers.assert_close(got, ref, per_element=True)


def run_case(case: Case, tmp_path):
    refs = ort_outputs(case.model, case.feeds)
    counts = Counter()
    graph = from_onnx(case.model, cleanup=True, report=counts)
    if case.check:
        case.check(graph, counts)
    # the cleaned graph exports to ONNX that means the same (SiLU as Sigmoid * x)
    again = ort_outputs(to_onnx(graph, max(case.opset, 11)), case.feeds)
    for got, ref in zip(again, refs):
        assert_close(got, ref)
    src, dst = tmp_path / f"{case.name}.onnx", tmp_path / f"{case.name}.qnb"
    onnx.save(case.model, str(src))
    log = []
    convert(str(src), str(dst), log=log.append)
    assert any(line.startswith("cleanup") for line in log)
    sess = Session(str(dst))
    assert [i.name for i in sess.get_inputs()] == [i.name for i in case.model.graph.input]
    ours = sess.run(None, case.feeds)
    for got, ref in zip(ours, refs):
        assert_close(got, ref)
    for got, ref in zip(ours, case.expected or []):
        assert_close(got, ref)
    return graph, counts


def _case_params():
    return [pytest.param(make, opset, id=f"{make.__name__}-opset{opset}")
            for make in HAND_BUILT for opset in OPSETS]


@pytest.mark.parametrize("make,opset", _case_params())
def test_messy_model(make, opset, tmp_path):
    case = make(opset)
    case.opset = opset
    run_case(case, tmp_path)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("constant_folding", [True, False])
def test_torch_export_converts_with_dynamic_batch(opset, constant_folding, tmp_path):
    case = torch_net(opset, constant_folding)
    case.opset = opset
    graph, counts = run_case(case, tmp_path)
    # the .qnb keeps the batch dynamic: another batch size runs as well
    x = _x((1, 3, 8, 8), 11)
    ref = ort_outputs(case.model, {"x": x})[0]
    dst = tmp_path / f"{case.name}.qnb"
    assert_close(Session(str(dst)).run(None, {"x": x})[0], ref)
    assert "SiLU" in summary(counts)
    assert ("HardSwish" in summary(counts)) == (opset < 14)  # an op of its own from 14 on


def test_cleanup_is_idempotent():
    from qnrt.exporters.cleanup import cleanup

    for make in HAND_BUILT:
        graph = from_onnx(make(17).model, cleanup=True)
        before = [(n.op, list(n.inputs), list(n.outputs)) for n in graph.nodes]
        assert not +cleanup(graph), make.__name__
        assert [(n.op, list(n.inputs), list(n.outputs)) for n in graph.nodes] == before


def test_without_cleanup_import_stays_faithful():
    """from_onnx without clean-up keeps the converter's nodes (only Min/Max forms
    the runtime lacks are rewritten), and dynamic shape arithmetic still asks for
    input_shapes."""
    graph = from_onnx(bn_mul_add(13).model)
    assert [n.op for n in graph.nodes] == ["Conv", "Mul", "Add", "Relu", "Conv", "Mul"]
    graph = from_onnx(relu_minmax(13).model)
    assert {"Max", "Min"}.isdisjoint(n.op for n in graph.nodes)
    with pytest.raises(GraphError, match="input_shapes"):
        from_onnx(torch_flatten_chain(13).model)


def test_dynamic_dims_that_do_not_resolve_ask_for_input_shape(tmp_path):
    """Reshape (N, C, H, W) to (N, H, W*C) with H, W dynamic: two entries that are
    not the input's own dims at their place (while (N, H*W, C) -> [0, -1, C] works)."""
    b = Builder(17, constants=False)
    shape = b.op("Shape", ["x"])
    dims = [b.op("Gather", [shape, b.const(np.array([i], np.int64))], axis=0) for i in range(4)]
    wc = b.op("Mul", [dims[3], dims[1]])
    y = b.op("Reshape", ["x", b.op("Concat", [dims[0], dims[2], wc], axis=0)])
    model = b.model({"x": ["N", 3, "H", "W"]}, [y])
    with pytest.raises(GraphError, match="--input-shape") as err:
        from_onnx(model, cleanup=True)
    assert "Reshape" in str(err.value)
    graph = from_onnx(model, {"x": (1, 3, 4, 5)}, cleanup=True)
    x = _x((1, 3, 4, 5), 12)
    assert_close(Session(graph).run(None, {"x": x})[0], ort_outputs(model, {"x": x})[0])


def test_conv_output_read_twice_is_not_folded():
    """Mul after a conv whose output is also read elsewhere: folding would change
    the other reader."""
    b = Builder(13)
    c = b.conv("x", 3, 4)
    y = b.op("Add", [b.op("Mul", [c, b.const(b.f32(4, 1, 1))]), c])
    graph = from_onnx(b.model({"x": [1, 3, 4, 4]}, [y]), cleanup=True)
    assert [n.op for n in graph.nodes] == ["Conv", "Mul", "Add"]


def test_unsupported_ops_are_all_listed_at_opset_21():
    b = Builder(21, constants=False)
    top = b.op("TopK", ["x", b.const(np.array([2], np.int64))], n_out=2, axis=1)
    norm = b.op("LpNormalization", [b.op("Relu", ["x"])], axis=1)
    ein = b.op("Einsum", [norm, "x"], equation="ij,ij->i")
    model = b.model({"x": [2, 4]}, [top, ein])
    with pytest.raises(GraphError) as err:
        from_onnx(model, cleanup=True)
    msg = str(err.value)
    assert msg.startswith("3 unsupported node(s)")
    for op in ("TopK", "LpNormalization", "Einsum"):
        assert f"({op})" in msg
    assert "(Relu)" not in msg


def test_summary_text():
    counts = Counter({"constants folded": 12, "Transposes removed": 4, "batch norms fused": 13,
                      "SiLU": 3, "HardSwish": 2, "ReLU6": 1})
    assert summary(counts) == ("folded 12 constants, removed 4 Transposes, fused 13 batch norms, "
                               "recognised 3 SiLU, 2 HardSwish, 1 ReLU6")
    assert summary(Counter()) == "nothing to clean up"


def test_silu_exports_as_sigmoid_mul():
    from qnrt.graph import Graph, Node, ValueInfo

    graph = Graph([Node("SiLU", ["x"], ["y"], {}, "act")], [ValueInfo("x", ("N", 4))],
                  [ValueInfo("y", ("N", 4))])
    model = to_onnx(graph, 13)
    assert [n.op_type for n in model.graph.node] == ["Sigmoid", "Mul"]
    x = _x((2, 4), 13, 3)
    assert_close(ort_outputs(model, {"x": x})[0], x / (1 + np.exp(-x.astype(np.float64))))
    # and fused into a Conv (should qnrt.rewrite fuse it): Conv + Sigmoid + Mul
    w = _x((4, 3, 1, 1), 16)
    conv = Graph([Node("Conv", ["x", "w"], ["y"], {"kernel_shape": [1, 1], "activation": "SiLU"},
                       "conv")], [ValueInfo("x", (1, 3, 2, 2))], [ValueInfo("y", (1, 4, 2, 2))],
                 {"w": w})
    model = to_onnx(conv, 17)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Sigmoid", "Mul"]
    x = _x((1, 3, 2, 2), 17)
    c = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x)
    assert_close(ort_outputs(model, {"x": x})[0], c / (1 + np.exp(-c)))


def test_dynamic_reshape_keeping_one_unknown_resolves():
    """(N, C, H, W) -> (N, H*W, C) with H, W dynamic: [0, -1, C]."""
    b = Builder(13, constants=False)
    shape = b.op("Shape", ["x"])
    dims = [b.op("Gather", [shape, b.const(np.array([i], np.int64))], axis=0) for i in range(4)]
    hw = b.op("Mul", [dims[2], dims[3]])
    y = b.op("Reshape", ["x", b.op("Concat", [dims[0], hw, dims[1]], axis=0)])
    model = b.model({"x": ["N", 3, "H", "W"]}, [y])
    graph = from_onnx(model, cleanup=True)
    assert graph.initializers[graph.nodes[0].inputs[1]].tolist() == [0, -1, 3]
    for shape in ((1, 3, 4, 5), (2, 3, 2, 7)):
        x = _x(shape, 14)
        assert_close(Session(graph).run(None, {"x": x})[0], ort_outputs(model, {"x": x})[0])


def test_transposes_at_the_output_stay():
    """NHWC -> NCHW -> conv -> NHWC -> Relu as the graph output: the outer two
    Transposes are the model's interface and stay."""
    b = Builder(17)
    y = b.op("Relu", [b.transpose(b.conv(b.transpose("x", (0, 3, 1, 2)), 3, 4), (0, 2, 3, 1))])
    model = b.model({"x": [1, 5, 5, 3]}, [y])
    graph = from_onnx(model, cleanup=True)
    assert [n.op for n in graph.nodes] == ["Transpose", "Conv", "Transpose", "Relu"]
    x = _x((1, 5, 5, 3), 15)
    assert_close(Session(graph).run(None, {"x": x})[0], ort_outputs(model, {"x": x})[0])


def test_nchw_input_option_drops_the_input_transpose(tmp_path):
    case = tf_nhwc(13)
    src, dst = tmp_path / "tf.onnx", tmp_path / "tf.qnb"
    onnx.save(case.model, str(src))
    summary_ = convert(str(src), str(dst), nchw_input=True)
    sess = Session(str(dst))
    assert sess.get_inputs()[0].shape == ["N", 3, 8, 8]
    assert "Transpose" not in {n.op for n in sess.graph.nodes}
    assert summary_["cleanup"]["Transposes removed"] == 10
    x = case.feeds["x"]
    got = sess.run(None, {"x": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    assert_close(got, ort_outputs(case.model, case.feeds)[0])


def test_conformance_tool(tmp_path, capsys):
    tool = load_tool("conformance")
    good = tmp_path / "good.onnx"
    onnx.save(bn_mul_add(13).model, str(good))
    assert tool.main([str(good)]) == 0
    out = capsys.readouterr().out
    assert "good.onnx" in out and "12->3" in out and "PASS" in out
    b = Builder(13, constants=False)
    bad = tmp_path / "bad.onnx"
    onnx.save(b.model({"x": [1, 4]}, [b.op("Erf", ["x"])]), str(bad))
    assert tool.main([str(good), str(bad)]) == 1
    assert "FAIL: 1 unsupported node(s)" in capsys.readouterr().out


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
@pytest.mark.parametrize("as_input", [True, False])
def test_reduce_axes_and_split_sizes_export_at_any_opset(opset, as_input):
    """The IR takes Reduce* axes / Split sizes either way; export writes the form
    the target opset wants."""
    from qnrt.graph import Graph, Node, ValueInfo

    inits = {"axes": np.array([1, 3], np.int64), "sizes": np.array([1, 2], np.int64)}
    mean = Node("ReduceMean", ["x", "axes"] if as_input else ["x"], ["m"],
                {"keepdims": 1} if as_input else {"keepdims": 1, "axes": [1, 3]}, "mean")
    split = Node("Split", ["x", "sizes"] if as_input else ["x"], ["a", "b"],
                 {"axis": 1} if as_input else {"axis": 1, "split": [1, 2]}, "split")
    graph = Graph([mean, split], [ValueInfo("x", (2, 3, 4, 5))],
                  [ValueInfo("m", (2, 1, 4, 1)), ValueInfo("a", (2, 1, 4, 5)),
                   ValueInfo("b", (2, 2, 4, 5))], inits)
    model = to_onnx(graph, opset)
    onnx.checker.check_model(model, full_check=True)
    x = _x((2, 3, 4, 5), 18)
    m, a, b_ = ort_outputs(model, {"x": x})
    assert_close(m, x.mean(axis=(1, 3), keepdims=True))
    assert_close(a, x[:, :1])
    assert_close(b_, x[:, 1:])
