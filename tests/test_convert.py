"""A model built by another tool (PyTorch's ONNX exporter) through `qnrt convert`,
checked against ONNX Runtime on the original ONNX file."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close
from qnrt import Session
from qnrt.cli import main as qnrt_main

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


class SmallNet(torch.nn.Module):
    """Separable blocks with PReLU, a residual Add, a LeakyReLU, pooling, a Linear head."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.PReLU(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.PReLU(16))
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),
                                nn.LeakyReLU(0.1))
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 24, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x):
        y = self.stem(x)
        y = y + self.pw(self.dw(y))
        return self.head(self.down(y))


@pytest.fixture(scope="module")
def torch_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():  # non-trivial batch norm statistics so folding matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("torch") / "small.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return str(path)


def test_convert_torch_export_agrees_with_onnxruntime(torch_onnx, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "small.qnb"
    assert qnrt_main(["convert", torch_onnx, str(out)]) == 0
    assert "nodes" in capsys.readouterr().err  # the folding summary
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    (ref,) = ort.InferenceSession(torch_onnx, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    sess = Session(str(out))
    (ours,) = sess.run(None, {"x": x})
    assert_close(ours, ref)
    ops = {n.op for n in sess.graph.nodes}
    assert "BatchNormalization" not in ops and "PRelu" not in ops


def test_convert_refuses_unsupported_ops_and_writes_nothing(tmp_path, capsys):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
             helper.make_node("TopK", ["r", "k"], ["v", "i"], name="my_topk", axis=1),
             helper.make_node("Erf", ["v"], ["y"], name="my_erf")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor("k", TensorProto.INT64, [1], [2])])
    src = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = tmp_path / "bad.qnb"
    assert qnrt_main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "my_topk" in err and "TopK" in err and "my_erf" in err and "Erf" in err
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]


def test_convert_errors_are_clear_and_write_nothing(torch_onnx, tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01 definitely not protobuf \xff\xff")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    cases = [([str(junk), str(tmp_path / "a.qnb")], "not a readable ONNX file"),
             ([torch_onnx, str(tmp_path / "missing" / "a.qnb")], "does not exist"),
             ([torch_onnx, str(tmp_path)], "is a folder"),
             ([torch_onnx, str(tmp_path / "b.qnb"), "--labels", str(labels)], "2 labels")]
    for argv, message in cases:
        assert qnrt_main(["convert", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "labels.txt"]


def test_convert_refuses_non_float_inputs(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])])
    src = tmp_path / "int.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    assert qnrt_main(["convert", str(src), str(tmp_path / "int.qnb")]) == 1
    assert "float32" in capsys.readouterr().err
    assert not (tmp_path / "int.qnb").exists()
