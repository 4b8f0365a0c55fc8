"""Malformed ONNX given to `qnrt convert`: each of the defect classes the ONNX
fuzzer found is a GraphError naming what is wrong (exporters/onnx_checks.py),
and the CLI prints it as one line with exit status 1, never a traceback."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnrt
from qnrt.cli import main
from qnrt.exporters.convert import convert
from qnrt.exporters.onnx_checks import check_model


def model(nodes=None, inits=None, inputs=None, outputs=None):
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    nodes = nodes if nodes is not None else [
        helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Conv", ["xc", "w"], ["y"], name="conv")]
    g = helper.make_graph(
        nodes, "g",
        inputs if inputs is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 3, 4, 4])],
        outputs if outputs is not None else [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits if inits is not None else [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def with_edit(edit):
    m = model()
    edit(m)
    return m


def lying_initializer(m):
    m.graph.initializer[0].dims[0] = 3  # 2 x 3 x 1 x 1 values stored, 3 x 3 x 1 x 1 declared


def graph_attribute(m):
    m.graph.node[1].attribute.append(helper.make_attribute("kernel_shape",
                                                           helper.make_graph([], "s", [], [])))


def wrong_attribute_type(m):
    m.graph.node[1].attribute.append(helper.make_attribute("group", 1.5))


def no_real_inputs(m):
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 3, 4, 4), np.float32), "x"))


CASES = {
    "unknown initializer data_type": (lambda m: setattr(m.graph.initializer[0], "data_type", 99),
                                      r"initializer 'w' has data type 99, which is not supported"),
    "Cast without to": (lambda m: m.graph.node[0].ClearField("attribute"),
                        r"node 0 'cast' \(Cast\) has no attribute 'to', which Cast requires"),
    "Cast to an unknown type": (lambda m: setattr(m.graph.node[0].attribute[0], "i", 77),
                                r"attribute 'to' is 77, not a known data type"),
    "graph-typed attribute": (graph_attribute,
                              r"'conv' \(Conv\): attribute 'kernel_shape' is a graph, which "
                              r"Conv does not take"),
    "attribute of the wrong type": (wrong_attribute_type,
                                    r"attribute 'group' is FLOAT, Conv takes INT"),
    "lying initializer": (lying_initializer,
                          r"initializer 'w' has dims \[3, 3, 1, 1\] \(9 values of 4 bytes\) but "
                          r"24 bytes of data"),
    "no real inputs": (no_real_inputs, r"has no input that is not a constant"),
    "no outputs": (lambda m: m.graph.ClearField("output"), r"the graph has no output"),
    "no opset": (lambda m: m.ClearField("opset_import"), r"no opset for the default ONNX domain"),
    "external data": (lambda m: setattr(m.graph.initializer[0], "data_location",
                                        TensorProto.EXTERNAL), r"external"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_onnx_is_a_graph_error_naming_it(tmp_path, case):
    edit, match = CASES[case]
    src = tmp_path / "m.onnx"
    src.write_bytes(with_edit(edit).SerializeToString())
    with pytest.raises(qnrt.GraphError, match=match):
        convert(str(src), str(tmp_path / "m.qnb"))
    assert not (tmp_path / "m.qnb").exists()


def test_non_utf8_names_are_refused(tmp_path):
    raw = model().SerializeToString().replace(b"conv", b"\xff\xfe\xfd\xfc")
    src = tmp_path / "m.onnx"
    src.write_bytes(raw)
    with pytest.raises(qnrt.GraphError, match=r"name b'\\xff\\xfe\\xfd\\xfc' is not valid UTF-8"):
        convert(str(src), str(tmp_path / "m.qnb"))


def _convert_in_child(m, tmp_path):
    """`qnrt convert` on the model in a child process (some models abort one)."""
    import subprocess

    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    return subprocess.run([sys.executable, "-m", "qnrt", "convert", str(src),
                           str(tmp_path / "m.qnb")], capture_output=True, text=True, timeout=120)


def test_an_output_without_a_shape_converts_when_inference_finds_it(tmp_path):
    m = model(outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    convert(str(src), str(tmp_path / "m.qnb"))
    out = qnrt.Session(str(tmp_path / "m.qnb")).run(None, {"x": np.ones((1, 3, 4, 4),
                                                                          np.float32)})[0]
    np.testing.assert_allclose(out, np.full((1, 2, 4, 4), 3, np.float32))


def test_a_well_formed_model_passes_the_checks():
    check_model(model())


@pytest.mark.parametrize("case", ["lying initializer", "graph-typed attribute",
                                  "no real inputs"])
def test_the_cli_prints_one_line(tmp_path, capsys, case):
    src = tmp_path / "m.onnx"
    src.write_bytes(with_edit(CASES[case][0]).SerializeToString())
    assert main(["convert", str(src), str(tmp_path / "m.qnb"), "--input-shape",
                 "1,3,4,4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qnrt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_the_cli_error_line_stays_one_line_when_a_message_quotes_file_bytes(capsys, monkeypatch):
    def refuse(args):
        raise qnrt.FormatError("attribute 'a\nb\rc\x00' is odd")
    monkeypatch.setattr(sys, "argv", ["qnrt"])
    import qnrt.cli as cli

    parser = cli.build_parser()
    args = parser.parse_args(["info", "x.qnb"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, refuse))
    assert cli.main(["info", "x.qnb"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attribute 'a b c " in err, err


class _Fixed:
    """A parser stand-in whose command raises what the test wants."""

    def __init__(self, args, func):
        args.func = func
        self.args = args

    def parse_args(self, argv):
        return self.args


def test_dims_that_would_abort_onnx_shape_inference_are_refused_first(tmp_path):
    """ONNX's C++ shape inference aborts the process (a std::clamp assertion)
    on a Slice after a Pad of 2^62: the pads are refused before it runs. The
    conversion runs in a child process so that an abort fails the test, not
    the suite."""
    pads = numpy_helper.from_array(np.array([2**31 - 1, 3, 2**62, -2**63, -2, 3, 2**32 - 1, 2],
                                            np.int64), "p")
    m = model(nodes=[helper.make_node("Pad", ["x", "p"], ["xp"], name="pad"),
                     helper.make_node("Slice", ["xp", "st", "en", "ax"], ["y"], name="slice")],
              inits=[pads, numpy_helper.from_array(np.array([0], np.int64), "st"),
                     numpy_helper.from_array(np.array([-1], np.int64), "en"),
                     numpy_helper.from_array(np.array([3], np.int64), "ax")],
              outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    run = _convert_in_child(m, tmp_path)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("qnrt: error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "'pad' (Pad): input 1 'p' holds 4611686018427387904" in run.stderr


def test_a_model_whose_shape_inference_aborts_is_refused(tmp_path):
    """A ConvTranspose whose pads exceed its output gives ONNX's inference a
    negative width, and the Slice after it aborts the process in C++: convert
    tries the inference in a child first and refuses the model in one line."""
    w = numpy_helper.from_array(np.ones((2, 1, 3, 2), np.float32), "w")
    consts = [w] + [numpy_helper.from_array(np.array([v], np.int64), name)
                    for name, v in (("st", 1), ("en", -1), ("ax", 3))]
    m = model(nodes=[helper.make_node("ConvTranspose", ["x", "w"], ["t"], kernel_shape=[3, 2],
                                      strides=[1, 2], pads=[0, 2, 2, 2], dilations=[1, 2],
                                      name="up"),
                     helper.make_node("Slice", ["t", "st", "en", "ax"], ["y"], name="slice")],
              inits=consts, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                  [1, 2, 8, 1])],
              outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    run = _convert_in_child(m, tmp_path)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1 and "ONNX shape inference crashes" in run.stderr


def test_a_conv_bias_of_the_wrong_shape_is_refused_before_folding(tmp_path):
    """A bias of 2x2 values for 4 channels used to reach batch-norm folding."""
    inits = [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.ones((2, 2), np.float32), "b")]
    inits += [numpy_helper.from_array(np.ones(4, np.float32), n) for n in "smv"]
    inits += [numpy_helper.from_array(np.zeros(4, np.float32), "bb")]
    m = model(nodes=[helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
                     helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"],
                                      name="bn")],
              inits=inits, outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                  [1, 4, 4, 4])])
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    with pytest.raises(qnrt.GraphError, match=r"'conv' \(Conv\): bias 'b' has shape \(2, 2\)"):
        convert(str(src), str(tmp_path / "m.qnb"))
