"""ONNX export/import: validity, numerical agreement (ORT vs a NumPy reference of
the IR), round trips, folding of torch/hand-built graphs, and error reporting."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import onnx
import pytest

import helpers
from helpers import ort_session
from onnx import TensorProto, helper, numpy_helper

from qnrt.exporters import from_onnx, save_onnx, to_onnx
from qnrt.models import quicknet
from qnrt.graph import Graph, GraphError, Node, ValueInfo


# ---- helpers ---------------------------------------------------------------------

def check(model):
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def run(model, *xs):
    sess = ort_session(model)
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})


def assert_close(got, ref):
    helpers.assert_close(got, ref, per_element=True)


def conv_ref(x, w, b, a):
    """Grouped 2-D convolution by im2col + einsum (dilation 1)."""
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    g, (sh, sw), (pt, pl, pb, pr) = a.get("group", 1), a["strides"], a["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    cols = np.stack([xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]
                     for i in range(kh) for j in range(kw)], axis=2)
    cols = cols.reshape(n, g, cig, kh * kw, oh, ow)
    y = np.einsum("ngckhw,gock->ngohw", cols, w.reshape(g, co // g, cig, kh * kw))
    y = y.reshape(n, co, oh, ow)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def act_ref(kind, x, a, slope=None):
    hsig = lambda v, al, be: np.clip(al * v + be, 0, 1)  # noqa: E731
    return {
        "": lambda: x,
        "Relu": lambda: np.maximum(x, 0),
        "PRelu": lambda: np.where(x < 0, x * slope, x),
        "LeakyRelu": lambda: np.where(x < 0, x * a.get("activation_alpha", 0.01), x),
        "Clip": lambda: np.clip(x, a.get("activation_min", -np.inf), a.get("activation_max", np.inf)),
        "Sigmoid": lambda: 1 / (1 + np.exp(-x)),
        "HardSigmoid": lambda: hsig(x, a.get("activation_alpha", 0.2), a.get("activation_beta", 0.5)),
        "HardSwish": lambda: x * hsig(x, 1 / 6, 0.5),
    }[kind]()


def softmax_ref(x, axis, legacy=False):
    if legacy:  # opset < 13: one softmax over the flattening at `axis`
        return softmax_ref(x.reshape(int(np.prod(x.shape[:axis])), -1), 1).reshape(x.shape)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference(graph: Graph, x: np.ndarray) -> np.ndarray:
    """Float64 NumPy forward pass of the IR ops QuickNet (and these tests) use."""
    env = {k: v.astype(np.float64) for k, v in graph.initializers.items()}
    env[graph.inputs[0].name] = x.astype(np.float64)
    for n in graph.nodes:
        i, a = [env[t] if t else None for t in n.inputs], n.attrs
        if n.op == "Conv":
            y = conv_ref(i[0], i[1], i[2] if len(i) > 2 else None, a)
            slope = i[3].reshape(1, -1, 1, 1) if len(i) > 3 else None
            y = act_ref(a.get("activation", ""), y, a, slope)
        elif n.op == "BatchNormalization":
            s, b, m, v = (t.reshape(1, -1, 1, 1) for t in i[1:])
            y = (i[0] - m) / np.sqrt(v + a["epsilon"]) * s + b
        elif n.op == "PRelu":
            y = np.where(i[0] < 0, i[0] * i[1], i[0])
        elif n.op == "MaxPool":  # 2x2 stride 2, no padding
            nn, c, h, w = i[0].shape
            y = i[0][:, :, :h // 2 * 2, :w // 2 * 2].reshape(nn, c, h // 2, 2, w // 2, 2).max((3, 5))
        elif n.op == "Dropout":
            y = i[0]
        elif n.op == "GlobalAveragePool":
            y = i[0].mean(axis=(2, 3), keepdims=True)
        elif n.op == "Flatten":
            y = i[0].reshape(int(np.prod(i[0].shape[:a["axis"]])), -1)
        elif n.op == "Softmax":
            legacy = a.get("legacy_axis_semantics", False)
            y = softmax_ref(i[0], a.get("axis", 1 if legacy else -1), legacy)
        else:
            raise NotImplementedError(n.op)
        env[n.outputs[0]] = y
    return env[graph.outputs[0].name]


# ---- export: QuickNet ----------------------------------------------------------------

@pytest.mark.parametrize("width", [0.25, 1.0])
def test_quicknet_export_matches_numpy_reference(width):
    graph = quicknet.build(width=width, input_size=32)
    model = to_onnx(graph)
    check(model)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (probs,) = run(model, x)
    assert_close(probs, reference(graph, x))
    assert model.producer_name == "qnrt"
    assert model.opset_import[0].version == 17


def test_quicknet_symbolic_dims_and_metadata():
    graph = quicknet.build(width=0.25, input_size=None, labels=list("abcdefghij"))
    model = to_onnx(graph)
    check(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    x = np.random.default_rng(2).standard_normal((1, 3, 48, 48)).astype(np.float32)
    assert_close(run(model, x)[0], reference(graph, x))
    back = from_onnx(model)
    assert back.metadata == graph.metadata  # JSON values: the labels list survives
    assert back.inputs[0].shape == ("N", 3, "H", "W")
    assert from_onnx(model, {"input": (1, 3, 48, 48)}).inputs[0].shape == (1, 3, 48, 48)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_quicknet_round_trip(opset):
    graph = quicknet.build(width=0.25, input_size=32)
    model = to_onnx(graph, opset)
    check(model)
    back = from_onnx(model)
    assert "Dropout" not in {n.op for n in back.nodes}
    assert {n.name for n in back.nodes} <= {n.name for n in graph.nodes} | {
        n.name for n in model.graph.node}
    again = to_onnx(back, opset)
    check(again)
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert_close(run(again, x)[0], run(model, x)[0].astype(np.float64))
    assert_close(run(again, x)[0], reference(graph, x))


def test_save_onnx_is_atomic_and_loadable(tmp_path):
    graph = quicknet.build(width=0.25)
    path = tmp_path / "q.onnx"
    save_onnx(graph, path)
    assert os.listdir(tmp_path) == ["q.onnx"]  # no temp file left behind
    check(onnx.load(path))
    assert from_onnx(str(path)).parameter_count() == graph.parameter_count()


# ---- export: runtime-only IR extensions ------------------------------------------------

def one_conv(activation: str, **attrs) -> Graph:
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(4).astype(np.float32),
             "slope": np.array([0.1, -0.2, 0.3, 0.5], np.float32)}
    ins = ["x", "w", "b"] + (["slope"] if activation == "PRelu" else [])
    conv = Node("Conv", ins, ["y"], {"kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 0, 1, 1],
                                     "dilations": [1, 1], "group": 1, "activation": activation,
                                     **attrs}, "conv")
    return Graph([conv], [ValueInfo("x", ("N", 3, 9, 8))], [ValueInfo("y", ("N", 4, 5, 7))], inits)


@pytest.mark.parametrize("activation,attrs", [
    ("", {}), ("Relu", {}), ("PRelu", {}), ("Sigmoid", {}), ("HardSwish", {}),
    ("Clip", {"activation_min": 0.0, "activation_max": 6.0}), ("Clip", {"activation_max": 0.5}),
    ("LeakyRelu", {"activation_alpha": 0.2}),
    ("HardSigmoid", {"activation_alpha": 0.3, "activation_beta": 0.4}),
])
@pytest.mark.parametrize("opset", [11, 17])
def test_fused_conv_activation_is_unfused(activation, attrs, opset):
    graph = one_conv(activation, **attrs)
    model = to_onnx(graph, opset)
    check(model)
    names = {a.name for n in model.graph.node for a in n.attribute}
    assert not any(k.startswith("activation") for k in names)
    x = np.random.default_rng(5).standard_normal((2, 3, 9, 8)).astype(np.float32) * 4
    assert_close(run(model, x)[0], reference(graph, x))
    if activation == "PRelu":
        prelu = next(n for n in model.graph.node if n.op_type == "PRelu")
        slope = next(t for t in model.graph.initializer if t.name == prelu.input[1])
        assert tuple(slope.dims) == (4, 1, 1)
    # importing gives plain ONNX ops that run the same
    assert_close(run(to_onnx(from_onnx(model), opset), x)[0], reference(graph, x))


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("axis", [1, 2, -1])
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_softmax_axis_semantics_exported_faithfully(legacy, axis, opset):
    attrs = {"axis": axis, **({"legacy_axis_semantics": True} if legacy else {})}
    graph = Graph([Node("Softmax", ["x"], ["y"], attrs, "sm")], [ValueInfo("x", ("N", 3, 4, 5))],
                  [ValueInfo("y", ("N", 3, 4, 5))])
    model = to_onnx(graph, opset)
    check(model)
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert_close(run(model, x)[0], softmax_ref(x.astype(np.float64), axis, legacy))
    back = from_onnx(model)  # and the imported model means the same again
    assert_close(run(to_onnx(back, 17), x)[0], softmax_ref(x.astype(np.float64), axis, legacy))


# ---- import: torch ---------------------------------------------------------------------

def torch_cnn():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.a2, self.pool = nn.LeakyReLU(0.1), nn.MaxPool2d(2)
            self.gap, self.flat = nn.AdaptiveAvgPool2d(1), nn.Flatten()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 5)

        def forward(self, x):
            y = self.a1(self.b1(self.c1(x)))
            y = self.b2(torch.relu(y + self.c2(y)))  # residual Add; BN after it stays a BN
            y = self.gap(self.pool(self.a2(y)))
            y = torch.relu(self.fc1(self.flat(y)))
            y = y.view(y.size(0), -1)  # Shape -> Gather -> Unsqueeze -> Concat -> Reshape
            return torch.softmax(self.fc2(y), 1)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return torch, net


def torch_export(opset, dynamic_batch, constant_folding=True):
    torch, net = torch_cnn()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), buf, dynamo=False,
                          opset_version=opset, input_names=["x"], output_names=["y"],
                          do_constant_folding=constant_folding,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None)
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy().astype(np.float64)
    return onnx.load_from_string(buf.getvalue()), x, expected


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("constant_folding", [True, False])
def test_torch_cnn_imports_and_round_trips(opset, constant_folding):
    model, x, expected = torch_export(opset, dynamic_batch=True, constant_folding=constant_folding)
    assert {"Shape", "Gather", "Constant"} <= {n.op_type for n in model.graph.node}
    # the batch is dynamic, so the Shape chain only folds once it is fixed
    with pytest.raises(GraphError, match="input_shapes"):
        from_onnx(model)
    graph = from_onnx(model, {"x": (2, 3, 16, 16)})
    ops = [n.op for n in graph.nodes]
    assert not {"Shape", "Gather", "Constant", "Identity", "Unsqueeze", "Concat"} & set(ops)
    assert {"Conv", "PRelu", "Add", "BatchNormalization", "LeakyRelu", "MaxPool",
            "GlobalAveragePool", "Flatten", "Gemm", "Reshape", "Softmax"} <= set(ops)
    assert graph.outputs[0].shape == (2, 5)
    reshape = next(n for n in graph.nodes if n.op == "Reshape")
    assert graph.initializers[reshape.inputs[1]].tolist() == [2, -1]
    for n in graph.nodes:
        if n.op in ("Conv", "MaxPool"):
            assert {"strides", "pads", "dilations", "kernel_shape"} <= set(n.attrs)
    softmax = next(n for n in graph.nodes if n.op == "Softmax")
    assert softmax.attrs.get("legacy_axis_semantics", False) == (opset < 13)
    assert_close(run(model, x)[0], expected)
    for out_opset in (opset, 17):
        again = to_onnx(graph, out_opset)
        check(again)
        assert_close(run(again, x)[0], expected)


def test_torch_static_export_needs_no_input_shapes():
    model, x, expected = torch_export(17, dynamic_batch=False)
    graph = from_onnx(model)
    assert graph.inputs[0].shape == (2, 3, 16, 16)
    assert_close(run(to_onnx(graph), x)[0], expected)


# ---- import: hand-built graphs -------------------------------------------------------------

def make_model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=7)


def test_constant_nodes_and_shape_chain_fold():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    const = lambda name, **kw: helper.make_node("Constant", [], [name], **kw)  # noqa: E731
    nodes = [
        const("w", value=numpy_helper.from_array(w)),
        const("scale", value_float=0.5),
        const("zero", value_int=0),
        const("minus1", value_ints=[-1]),
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("Cast", ["x_id"], ["x_f"], to=TensorProto.FLOAT),  # no-op
        helper.make_node("Conv", ["x_f", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Mul", ["c", "scale"], ["m"]),
        helper.make_node("Shape", ["m"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["m", "target"], ["flat"]),
        helper.make_node("Dropout", ["flat"], ["y"]),
    ]
    model = make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    graph = from_onnx(model)
    assert [(n.op, n.name) for n in graph.nodes] == [("Conv", "Conv_6"), ("Mul", "Mul_7"),
                                                     ("Reshape", "Reshape_12")]
    conv = graph.nodes[0].attrs
    assert conv["pads"] == [1, 1, 1, 1] and "auto_pad" not in conv and conv["kernel_shape"] == [3, 3]
    assert conv["group"] == 1 and conv["dilations"] == [1, 1]
    assert graph.nodes[0].inputs[0] == "x"  # Identity and Cast rewired away
    assert graph.nodes[-1].outputs == ["y"]  # Dropout removed, output name kept
    assert graph.initializers["target"].tolist() == [1, -1]
    np.testing.assert_array_equal(graph.initializers["w"], w)
    assert graph.outputs[0].shape == (1, 96)
    x = rng.standard_normal((1, 3, 7, 7)).astype(np.float32)
    assert_close(run(to_onnx(graph), x)[0], run(model, x)[0].astype(np.float64))


@pytest.mark.parametrize("mode,pads", [("SAME_UPPER", [0, 0, 1, 1]), ("SAME_LOWER", [1, 1, 0, 0]),
                                       ("VALID", [0, 0, 0, 0])])
def test_auto_pad_becomes_explicit_pads(mode, pads):
    w = numpy_helper.from_array(np.ones((2, 1, 2, 2), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=mode, strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["y"], auto_pad=mode, kernel_shape=[2, 2])]
    io_ = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    model = make_model(nodes, [io_("x", [1, 1, 7, 7])], [io_("y", None)], [w])
    graph = from_onnx(model)
    assert graph.nodes[0].attrs["pads"] == pads and "auto_pad" not in graph.nodes[0].attrs
    x = np.random.default_rng(9).standard_normal((1, 1, 7, 7)).astype(np.float32)
    assert_close(run(to_onnx(graph), x)[0], run(model, x)[0].astype(np.float64))
    # unknown spatial size: SAME stays auto_pad for the kernels to resolve
    dynamic = make_model(nodes, [io_("x", ["N", 1, "H", "W"])], [io_("y", None)], [w])
    attrs = from_onnx(dynamic).nodes[0].attrs
    assert attrs.get("auto_pad") == (None if mode == "VALID" else mode)


def test_old_opset_forms_are_normalized():
    """Clip min/max attrs (opset 10), Squeeze/Unsqueeze axes attrs, legacy Softmax."""
    io_ = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    nodes = [helper.make_node("Clip", ["x"], ["c"], min=-0.5, max=0.5),
             helper.make_node("Unsqueeze", ["c"], ["u"], axes=[1]),
             helper.make_node("Squeeze", ["u"], ["s"], axes=[1]),
             helper.make_node("Softmax", ["s"], ["y"])]
    model = make_model(nodes, [io_("x", [2, 3, 4])], [io_("y", [2, 3, 4])], opset=10)
    graph = from_onnx(model)
    clip, unsq, sq, sm = graph.nodes
    assert "min" not in clip.attrs and graph.initializers[clip.inputs[1]] == np.float32(-0.5)
    assert graph.initializers[unsq.inputs[1]].tolist() == [1] and "axes" not in sq.attrs
    assert sm.attrs == {"axis": 1, "legacy_axis_semantics": True}
    x = np.random.default_rng(10).standard_normal((2, 3, 4)).astype(np.float32)
    for opset in (11, 17):
        assert_close(run(to_onnx(graph, opset), x)[0], run(model, x)[0].astype(np.float64))


def test_initializer_listed_as_input_is_a_constant():
    b = numpy_helper.from_array(np.float32([1, 2]), "b")
    io_ = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    model = make_model([helper.make_node("Add", ["x", "b"], ["y"])],
                       [io_("x", ["N", 2]), io_("b", [2])], [io_("y", ["N", 2])], [b])
    graph = from_onnx(model)
    assert [v.name for v in graph.inputs] == ["x"] and "b" in graph.initializers
    with pytest.raises(GraphError, match="not graph inputs"):
        from_onnx(model, {"b": (2,)})


def test_unsupported_ops_are_all_named():
    io_ = lambda n, t, s: helper.make_tensor_value_info(n, t, s)  # noqa: E731
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    nodes = [helper.make_node("TopK", ["scores1", "k"], ["top", "idx"], name="my_topk"),
             helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"]),
             helper.make_node("Relu", ["top"], ["y"])]
    model = make_model(nodes, [io_("boxes", TensorProto.FLOAT, [1, 5, 4]),
                               io_("scores", TensorProto.FLOAT, [1, 1, 5]),
                               io_("scores1", TensorProto.FLOAT, [1, 5])],
                       [io_("y", TensorProto.FLOAT, None), io_("sel", TensorProto.INT64, None)], [k])
    with pytest.raises(GraphError) as err:
        from_onnx(model)
    msg = str(err.value)
    assert "'my_topk' (TopK)" in msg and "'NonMaxSuppression_1' (NonMaxSuppression)" in msg
    assert "Relu" not in msg
