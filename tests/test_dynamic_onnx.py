"""ONNX files with dynamic dimensions, built the way paddle2onnx, tf2onnx and
torch.onnx write them: `dim_value: -1` for a dynamic dim, stale `value_info`
that keeps the exporter's symbolic names, shape arithmetic
(Shape -> Gather -> Unsqueeze -> Concat -> Reshape, Casts of shapes to float
and back), Transposes after Reshapes computed from Shape, a spelled-out
LayerNorm and an attention neck. Each converts with the input shape given and
must agree with ONNX Runtime on the original file at two input shapes."""
from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import load_tool, ort_session
from test_messy_onnx import Builder
from qnrt import Session
from qnrt.exporters.cleanup import summary
from qnrt.exporters.convert import convert
from qnrt.exporters.onnx_import import from_onnx
from qnrt.graph import GraphError

I64 = np.int64
TOLERANCE = 1e-5  # x the output scale, max(1, max |ONNX Runtime's output|)


def with_value_info(model: onnx.ModelProto, entries: dict) -> onnx.ModelProto:
    """Stale value_info, as exporters leave it: `entries` name -> dims, where a
    dim is an int (-1 for dynamic, as paddle2onnx writes) or a symbol name."""
    for name, ds in entries.items():
        model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ds))
    return model


def declare_dims(vi, ds):
    """Overwrite a graph input's or output's dims: ints (-1 as paddle2onnx writes
    a dynamic dim) or symbol names."""
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in ds:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


class Net(Builder):
    """Builder plus the shape arithmetic exporters write."""

    def shape_of(self, x):
        return self.op("Shape", [x])

    def dim(self, shape, i):  # a scalar: Gather with a 0-d index
        return self.op("Gather", [shape, self.const(np.array(i, I64))], axis=0)

    def vec(self, scalar):  # Unsqueeze a scalar dim to a 1-element vector
        return self.unsqueeze(scalar, [0])

    def concat(self, parts):
        return self.op("Concat", parts, axis=0)

    def matmul_bias(self, x, cin, cout):
        w = self.const(self.f32(cin, cout, scale=1 / np.sqrt(cin)), "weight")
        b = self.const(self.f32(cout, scale=0.1), "bias")
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x, c, eps=1e-5, spelled=True):
        gamma = self.const(self.f32(c, positive=True), "gamma")
        beta = self.const(self.f32(c, scale=0.1), "beta")
        if not spelled:
            return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)
        mean = self.reduce_mean(x, [-1], 1)
        d = self.op("Sub", [x, mean])
        var = self.reduce_mean(self.op("Pow", [d, self.const(np.float32(2))]), [-1], 1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(np.float32(eps))])])
        return self.op("Add", [self.op("Mul", [self.op("Div", [d, std]), gamma]), beta])


def p2o_recogniser(opset=13, spelled=True, heads=2) -> onnx.ModelProto:
    """A paddle2onnx-style text recogniser: input [-1, 3, -1, -1] (dim_value -1),
    a CNN, then an attention neck over the H*W positions whose Reshape targets
    all come from Shape (Gather, Unsqueeze, Concat, and the sequence length
    through Casts to float and back), a spelled-out LayerNorm, a fused qkv
    MatMul split by Gather on a rank-5 Transpose, Softmax on the last axis."""
    b = Net(opset, constants=False, seed=1)
    c, d = 16, 16 // heads
    h = b.op("Relu", [b.conv("x", 3, 8, stride=2)])
    h = b.op("Relu", [b.conv(h, 8, c, stride=2)])  # (N, C, H', W')
    s = b.shape_of(h)
    n, ch, hh, ww = (b.dim(s, i) for i in range(4))
    as_float = [b.cast(v, TensorProto.FLOAT) for v in (hh, ww)]
    t = b.cast(b.op("Mul", as_float), TensorProto.INT64)  # T = H' * W', via float
    seq = b.op("Reshape", [h, b.concat([b.vec(n), b.vec(ch), b.vec(t)])])  # (N, C, T)
    seq = b.transpose(seq, [0, 2, 1])  # (N, T, C)
    ln = b.layer_norm(seq, c, spelled=spelled)
    qkv = b.matmul_bias(ln, c, 3 * c)  # (N, T, 3C)
    s2 = b.shape_of(ln)
    target = b.concat([b.vec(b.dim(s2, 0)), b.vec(b.dim(s2, 1)),
                       b.const(np.array([3, heads, d], I64))])
    qkv = b.transpose(b.op("Reshape", [qkv, target]), [2, 0, 3, 1, 4])  # (3, N, heads, T, d)
    q, k, v = (b.op("Gather", [qkv, b.const(np.array(i, I64))], axis=0) for i in range(3))
    scores = b.op("MatMul", [q, b.transpose(k, [0, 1, 3, 2])])  # (N, heads, T, T)
    scores = b.op("Mul", [scores, b.const(np.float32(1 / np.sqrt(d)))])
    att = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])  # (N, heads, T, d)
    att = b.transpose(att, [0, 2, 1, 3])
    back = b.concat([b.vec(b.dim(s2, 0)), b.vec(b.dim(s2, 1)), b.vec(b.dim(s2, 2))])
    out = b.op("Add", [b.op("Reshape", [att, back]), seq])
    logits = b.matmul_bias(out, c, 10)
    y = b.op("Softmax", [logits], axis=-1)
    model = b.model({"x": [1, 3, 8, 8]}, [y])
    declare_dims(model.graph.input[0], [-1, 3, -1, -1])
    declare_dims(model.graph.output[0], [-1, -1, 10])
    return with_value_info(model, {h: ["p2o.DynamicDimension.0", c, "p2o.DynamicDimension.1",
                                       "p2o.DynamicDimension.2"],
                                   seq: [-1, -1, c], ln: [-1, -1, c], att: [-1, -1, heads, d]})


def tf2onnx_classifier(opset=13, stale="symbols") -> onnx.ModelProto:
    """A tf2onnx-style NHWC classifier with dims named 'unk__*': Transposes around
    the Conv, then a Reshape to (N, H*W, C) whose target is TensorFlow's int32
    shape arithmetic (Shape, Cast to int32, Slice, Gather, Mul, Concat, Cast back
    to int64), a Transpose after it, a second Reshape from the Shape of that,
    a mean over positions and a dense head. Stale value_info: the exporter's
    symbols, or -1 for every dynamic dim ("symbols", "minus_one")."""
    b = Net(opset, constants=True, seed=2)
    x = b.transpose("input_1:0", [0, 3, 1, 2])
    h = b.op("Relu", [b.conv(x, 3, 8)])
    h = b.transpose(h, [0, 2, 3, 1])  # NHWC again
    s = b.cast(b.shape_of(h), TensorProto.INT32)
    i32 = lambda v: b.const(np.array(v, np.int32))  # noqa: E731
    n = b.op("Slice", [s, i32([0]), i32([1]), i32([0])])
    hw = b.op("Mul", [b.dim(s, 1), b.dim(s, 2)])
    target = b.cast(b.concat([n, b.vec(hw), i32([8])]), TensorProto.INT64)
    flat = b.op("Reshape", [h, target])
    tr = b.transpose(flat, [0, 2, 1])  # (N, C, H*W)
    s2 = b.shape_of(tr)
    halves = b.concat([b.op("Slice", [s2, b.const(np.array([0], I64)),
                                      b.const(np.array([2], I64))]),
                       b.op("Div", [b.op("Slice", [s2, b.const(np.array([2], I64)),
                                                   b.const(np.array([3], I64))]),
                                    b.const(np.array([2], I64))]),
                       b.const(np.array([2], I64))])
    parts = b.transpose(b.op("Reshape", [tr, halves]), [0, 3, 1, 2])  # (N, 2, C, H*W/2)
    pooled = b.reduce_mean(parts, [1, 3], 0)  # (N, C)
    y = b.op("Softmax", [b.matmul_bias(pooled, 8, 5)], axis=-1)
    model = b.model({"input_1:0": ["unk__12", "unk__13", "unk__14", 3]}, [y])
    declare_dims(model.graph.output[0], ["unk__20", 5])
    info = {h: ["unk__15", "unk__16", "unk__17", 8], flat: ["unk__15", "unk__18", 8],
            tr: ["unk__15", 8, "unk__18"], parts: ["unk__15", 2, 8, "unk__19"]}
    if stale == "minus_one":
        info = {k: [-1 if isinstance(d, str) else d for d in v] for k, v in info.items()}
    return with_value_info(model, info)


def torch_attention_neck(opset) -> tuple:
    """torch.onnx.export (TorchScript exporter) of a CNN with an attention neck,
    every reshape written from x.shape, with dynamic axes N, H, W."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Neck(nn.Module):
        def __init__(self, c=16, heads=4):
            super().__init__()
            self.heads = heads
            self.cnn = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(c, c, 3, 2, 1), nn.ReLU())
            self.norm = nn.LayerNorm(c)
            self.qkv = nn.Linear(c, 3 * c)
            self.proj = nn.Linear(c, c)
            self.head = nn.Linear(c, 7)

        def forward(self, x):
            f = self.cnn(x)
            n, c, h, w = f.shape
            s = f.flatten(2).transpose(1, 2)  # (N, T, C)
            qkv = self.qkv(self.norm(s)).reshape(n, h * w, 3, self.heads, c // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
            s = s + self.proj((a @ v).transpose(1, 2).reshape(n, h * w, c))
            return self.head(s.mean(1))

    torch.manual_seed(opset)
    net = Neck().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 32, 48),), buf, dynamo=False,
                          opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "y": {0: "N"}})
    return onnx.load_from_string(buf.getvalue()), net


# ---- running them -----------------------------------------------------------------------

def rel_error(got, ref) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(1.0, float(np.max(np.abs(ref))))
    return float(np.max(np.abs(got.astype(np.float64) - ref))) / scale


def convert_and_compare(model, shapes, tmp_path, name, kernels="auto") -> Counter:
    """Convert with each input shape in turn; qnrt's output must match ONNX
    Runtime's on the original file (relative to the output scale)."""
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, str(src))
    ort = ort_session(model)
    in_name = ort.get_inputs()[0].name
    report = Counter()
    for k, shape in enumerate(shapes):
        dst = tmp_path / f"{name}-{k}.qnb"
        summary_ = convert(str(src), str(dst), input_shape=shape)
        report.update(summary_["cleanup"])
        x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
        ref = ort.run(None, {in_name: x})
        got = Session(str(dst), kernels=kernels).run(None, {in_name: x})
        for g, r in zip(got, ref):
            assert rel_error(g, r) <= TOLERANCE, (name, shape, rel_error(g, r))
    return report


def test_paddle_recogniser_with_minus_one_dims(tmp_path):
    model = p2o_recogniser()
    report = convert_and_compare(model, [(1, 3, 16, 40), (2, 3, 24, 28)], tmp_path, "p2o")
    graph = from_onnx(model, {"x": (1, 3, 16, 40)}, cleanup=True)
    ops = Counter(n.op for n in graph.nodes)
    assert not {"Shape", "Cast", "Concat", "Unsqueeze", "ReduceMean", "Pow", "Sqrt"} & set(ops)
    assert ops["LayerNormalization"] == 1 and ops["Gather"] == 3
    assert report["LayerNorm"] == 2
    assert "fused 2 LayerNorm" in summary(report)
    from qnrt.exporters.cleanup import cleanup
    assert not +cleanup(graph)  # idempotent


def test_paddle_recogniser_reference_kernels(tmp_path):
    convert_and_compare(p2o_recogniser(opset=17, spelled=False), [(1, 3, 12, 20)], tmp_path,
                        "p2o_ref", kernels="reference")


@pytest.mark.parametrize("stale", ["symbols", "minus_one"])
def test_tf2onnx_classifier_with_stale_value_info(stale, tmp_path):
    convert_and_compare(tf2onnx_classifier(stale=stale), [(1, 20, 24, 3), (3, 16, 40, 3)],
                        tmp_path, f"tf_{stale}")


@pytest.mark.parametrize("opset", [13, 17])
def test_torch_attention_neck_with_dynamic_axes(opset, tmp_path):
    model, _ = torch_attention_neck(opset)
    report = convert_and_compare(model, [(1, 3, 32, 48), (2, 3, 24, 20)], tmp_path,
                                 f"torch{opset}")
    graph = from_onnx(model, {"x": (1, 3, 32, 48)}, cleanup=True)
    assert {n.op for n in graph.nodes}.isdisjoint({"Shape", "Cast", "Concat", "Unsqueeze"})
    assert sum(n.op == "LayerNormalization" for n in graph.nodes) == 1
    if opset < 17:
        assert report["LayerNorm"] == 2


def test_minus_one_is_a_dynamic_dim():
    """-1 (and 0) dims are dynamic: they get symbols, and a given shape fixes them."""
    model = p2o_recogniser()
    graph = from_onnx(model, {"x": (1, 3, 16, 40)}, cleanup=True)
    assert graph.inputs[0].shape == (1, 3, 16, 40)
    assert graph.outputs[0].shape == (1, 40, 10)
    b = Net(13)
    y = b.op("Relu", ["x"])
    model = b.model({"x": [1, 3]}, [y])
    declare_dims(model.graph.input[0], [-1, 0])
    graph = from_onnx(model)
    assert all(isinstance(d, str) for d in graph.inputs[0].shape)


@pytest.mark.parametrize("index", range(6))
def test_without_an_input_shape_one_file_runs_at_every_shape(index, tmp_path):
    """Dims computed from the input's dynamic dims get symbols of their own, so
    each Reshape target keeps at most one unknown (-1) and the batch (0): the
    models convert without --input-shape and run at both shapes."""
    name, model, shapes = dynamic_models()[index]
    src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}.qnb"
    onnx.save(model, str(src))
    convert(str(src), str(dst))
    sess, ort = Session(str(dst)), ort_session(model)
    in_name = model.graph.input[0].name
    assert isinstance(sess.get_inputs()[0].shape[0], str)
    # the cleaned graph exported back to ONNX means the same (LayerNormalization, Gather)
    from qnrt.exporters.onnx_export import to_onnx
    again = ort_session(to_onnx(from_onnx(model, cleanup=True)))
    for k, shape in enumerate(shapes):
        x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
        refs = ort.run(None, {in_name: x})
        for got, ref in zip(sess.run(None, {in_name: x}), refs):
            assert rel_error(got, ref) <= TOLERANCE
        for got, ref in zip(again.run(None, {in_name: x}), refs):
            assert rel_error(got, ref) <= TOLERANCE


def test_a_dim_that_stays_dynamic_names_its_input_dim():
    """A ConstantOfShape sized by the Conv's output width (from the input's dim 3)
    cannot run with a dynamic width: the error says which input dim to fix."""
    b = Net(13)
    f = b.conv("x", 3, 4, stride=2)
    s = b.shape_of(f)
    target = b.concat([b.const(np.array([1, 1, 1], I64)), b.vec(b.dim(s, 3))])
    y = b.op("Add", [f, b.op("ConstantOfShape", [target])])
    model = b.model({"x": ["N", 3, "H", "W"]}, [y])
    with pytest.raises(GraphError, match=r"\(ConstantOfShape, from 'x' dim 3\); fix them"):
        from_onnx(model, cleanup=True)
    graph = from_onnx(model, {"x": (1, 3, 8, 10)}, cleanup=True)  # fixed: folds to a constant
    assert "ConstantOfShape" not in {n.op for n in graph.nodes}


def test_symbolic_arithmetic_names_its_input_dims():
    """A dim computed from the width alone is traced back to it."""
    b = Net(13)
    s = b.shape_of("x")
    w2 = b.op("Mul", [b.dim(s, 2), b.const(np.array(2, I64))])
    target = b.concat([b.vec(b.dim(s, 0)), b.const(np.array([3], I64)), b.vec(w2)])
    ones = b.op("ConstantOfShape", [target])  # a dynamic dim reaching a shape input
    y = b.op("Add", ["x", ones])
    model = b.model({"x": ["N", 3, "W"]}, [y])
    with pytest.raises(GraphError, match=r"from 'x' dims 0, 2\)"):
        from_onnx(model, cleanup=True)


# ---- LayerNorm fusion ---------------------------------------------------------------------

def ort_unoptimized(model):
    """ONNX Runtime without its graph rewrites: its own LayerNorm fusion (1.32)
    does not check Pow's exponent, so mean((x - mean)^4) would be fused too."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def spelled_layer_norm(form: str):
    """One spelled-out LayerNorm over (2, 5, 8) in the given form; returns
    (model, whether clean-up should fuse it)."""
    b = Net(13, constants=False, seed=3)
    x = b.op("Relu", ["x"])
    axes = {"two_axes": [-2, -1], "positive_axes": [2], "not_trailing": [1]}.get(form, [-1])
    norm = (5, 8) if form == "two_axes" else (5,) if form == "not_trailing" else (8,)
    mean = b.reduce_mean(x, axes, 1)
    d = b.op("Sub", [x, mean])
    if form == "mul_recip":
        sq = b.op("Mul", [d, d])
    else:
        sq = b.op("Pow", [d, b.const(np.float32(4 if form == "pow4" else 2))])
    var = b.reduce_mean(sq, axes, 1)
    eps = b.const(np.float32(1e-3))
    std = b.op("Sqrt", [b.op("Add", [eps, var] if form == "positive_axes" else [var, eps])])
    if form == "mul_recip":
        y = b.op("Mul", [b.op("Reciprocal", [std]), d])
    else:
        y = b.op("Div", [d, std])
    outputs = []
    if form not in ("no_affine", "bias_only"):
        gamma = b.f32(*norm, positive=True) if form != "not_trailing" else b.f32(5, 1)
        y = b.op("Mul", [y, b.const(gamma)])
    if form not in ("no_affine", "mul_recip"):
        beta = b.f32(5, 1, scale=0.1) if form == "not_trailing" else b.f32(8, scale=0.1)
        y = b.op("Add", [b.const(beta), y])
    if form == "d_read_twice":
        outputs.append(b.op("Neg", [d]))
    model = b.model({"x": [2, 5, 8]}, [y] + outputs)
    return model, form not in ("not_trailing", "d_read_twice", "pow4")


@pytest.mark.parametrize("form", ["pow_div", "mul_recip", "positive_axes", "two_axes",
                                  "no_affine", "bias_only", "not_trailing", "d_read_twice", "pow4"])
def test_layer_norm_fusion(form):
    model, fuses = spelled_layer_norm(form)
    counts = Counter()
    graph = from_onnx(model, cleanup=True, report=counts)
    ops = Counter(n.op for n in graph.nodes)
    assert (ops["LayerNormalization"] == 1) == fuses and counts["LayerNorm"] == int(fuses)
    if fuses:
        assert not {"ReduceMean", "Sqrt", "Pow", "Div", "Reciprocal"} & set(ops), ops
        assert [n.op for n in graph.nodes] == ["Relu", "LayerNormalization"]
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32) * 3 + 1
    refs = ort_unoptimized(model).run(None, {"x": x})
    got = Session(graph).run(None, {"x": x})
    for g, r in zip(got, refs):
        assert rel_error(g, r) <= TOLERANCE
    from qnrt.exporters.cleanup import cleanup
    assert not +cleanup(graph)  # idempotent


def test_layer_norm_needs_the_normalized_dims():
    """With the last dim dynamic the scale cannot be laid out: left spelled out."""
    b = Net(13, constants=False)
    mean = b.reduce_mean("x", [-1], 1)
    d = b.op("Sub", ["x", mean])
    var = b.reduce_mean(b.op("Pow", [d, b.const(np.float32(2))]), [-1], 1)
    y = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-5))])])])
    graph = from_onnx(b.model({"x": ["N", "C"]}, [y]), cleanup=True)
    assert "LayerNormalization" not in {n.op for n in graph.nodes}


# ---- for tools/conformance.py --self-test ---------------------------------------------------

def dynamic_models(torch_models: bool = True) -> list:
    """(name, model, two input shapes) for every dynamic-dims model built here."""
    cases = [("p2o_recogniser", p2o_recogniser(), [(1, 3, 16, 40), (2, 3, 24, 28)]),
             ("p2o_recogniser_ln17", p2o_recogniser(17, spelled=False),
              [(1, 3, 12, 20), (2, 3, 20, 16)])]
    for stale in ("symbols", "minus_one"):
        cases.append((f"tf2onnx_classifier_{stale}", tf2onnx_classifier(stale=stale),
                      [(1, 20, 24, 3), (3, 16, 40, 3)]))
    if torch_models:
        for opset in (13, 17):
            cases.append((f"torch_attention_neck_{opset}", torch_attention_neck(opset)[0],
                          [(1, 3, 32, 48), (2, 3, 24, 20)]))
    return cases


def test_conformance_tool_checks_each_shape_and_names_the_rules(tmp_path, capsys):
    tool = load_tool("conformance")
    src = tmp_path / "rec.onnx"
    onnx.save(p2o_recogniser(), str(src))
    assert tool.main([str(src), "--input-shape", "1,3,16,40", "--input-shape", "2,3,24,28",
                      "--tolerance", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "1x3x16x40" in out and "2x3x24x28" in out
    assert "worst relative error per output" in out
    worst = [line.split() for line in out.split("worst relative error per output")[1]
             .splitlines() if line.startswith("rec.onnx")]
    assert len(worst) == 1 and worst[0][2] == "2" and float(worst[0][3]) <= 1e-5
    assert "clean-up rules fired:" in out and "fused 1 LayerNorm" in out


def test_shape_arithmetic_on_a_dynamic_batch_keeps_it_dynamic(tmp_path):
    """Shape -> Cast(float) -> Floor -> Cast(int64), a Transpose of the shape
    vector and a Concat give Reshape the target [N, -1]: resolved to [0, -1], so
    one .qnb runs every batch size."""
    b = Net(13)
    s = b.cast(b.shape_of("x"), TensorProto.FLOAT)
    s = b.cast(b.op("Floor", [s]), TensorProto.INT64)
    col = b.transpose(b.unsqueeze(s, [1]), [1, 0])  # (1, 4)
    n = b.op("Slice", [b.op("Squeeze", [col, b.const(np.array([0], I64))]),
                       b.const(np.array([0], I64)), b.const(np.array([1], I64))])
    y = b.op("Reshape", [b.op("Relu", ["x"]), b.concat([n, b.const(np.array([-1], I64))])])
    model = b.model({"x": ["N", 3, 4, 5]}, [y])
    counts = Counter()
    graph = from_onnx(model, cleanup=True, report=counts)
    assert counts["dynamic reshapes resolved"] == 1
    assert [n.op for n in graph.nodes] == ["Relu", "Reshape"]
    src, dst = tmp_path / "batch.onnx", tmp_path / "batch.qnb"
    onnx.save(model, str(src))
    convert(str(src), str(dst))
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 4, 5)).astype(np.float32)
        ref = ort_session(model).run(None, {"x": x})[0]
        assert rel_error(Session(str(dst)).run(None, {"x": x})[0], ref) <= TOLERANCE


def test_a_slice_of_a_dynamic_axis_is_not_taken_for_static():
    """x[:, :, :4] of a dynamic width is 4 only when the width is >= 4: the Shape
    after it must not fold to 4, and the .qnb must run at a width of 3 too."""
    b = Net(13)
    part = b.op("Slice", ["x", b.const(np.array([0], I64)), b.const(np.array([4], I64)),
                          b.const(np.array([2], I64))])
    s = b.shape_of(part)
    y = b.op("Reshape", [part, b.concat([b.vec(b.dim(s, 0)), b.const(np.array([3], I64)),
                                         b.vec(b.dim(s, 2))])])
    model = b.model({"x": ["N", 3, "W"]}, [y])
    graph = from_onnx(model, cleanup=True)
    target = graph.initializers[next(n for n in graph.nodes if n.op == "Reshape").inputs[1]]
    assert target.tolist() == [0, 3, 0]  # the sliced width is the tensor's own dim, not 4
    for shape in ((2, 3, 7), (1, 3, 3)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        ref = ort_session(model).run(None, {"x": x})[0]
        assert rel_error(Session(graph).run(None, {"x": x})[0], ref) <= TOLERANCE
