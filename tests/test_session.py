"""qnrt.Session end to end against ONNX Runtime on the same exported model."""
from __future__ import annotations

import copy
import tracemalloc

import numpy as np
import pytest

from helpers import assert_close, ort_run
from qnrt.models import quicknet
from qnrt import Session, format as qnb
from qnrt.graph import Graph, GraphError, Node, ValueInfo
from qnrt.session import InvalidArgument


@pytest.fixture(scope="module")
def quicknet_graph():
    g = quicknet.build(input_size=None)  # H, W symbolic: the net is fully convolutional
    g.outputs.append(ValueInfo("logits", ("N", 10)))  # compare before softmax, too
    return g


@pytest.fixture(scope="module")
def quicknet_qnb(tmp_path_factory, quicknet_graph):
    path = tmp_path_factory.mktemp("m") / "quicknet.qnb"
    qnb.save(copy.deepcopy(quicknet_graph), path)
    return str(path)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (4, 3, 32, 32), (1, 3, 224, 224)])
def test_quicknet_matches_onnxruntime(quicknet_graph, quicknet_qnb, shape):
    x = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
    ref_probs, ref_logits = ort_run(quicknet_graph, {"input": x}, ["probabilities", "logits"])
    sess = Session(quicknet_qnb)
    probs, logits = sess.run(["probabilities", "logits"], {"input": x})
    assert_close(logits, ref_logits)
    assert_close(probs, ref_probs)
    assert (probs.argmax(1) == ref_probs.argmax(1)).all()


def test_quicknet_parameter_count():
    n = quicknet.keras_parameter_count()
    assert abs(n - quicknet.PAPER_PARAMETERS) / quicknet.PAPER_PARAMETERS < 0.01
    assert quicknet.build().parameter_count() == n


def test_width_multiplier_and_input_size(tmp_path):
    g = quicknet.build(width=0.25, input_size=64)
    assert g.nodes[0].op == "Conv"
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    (ref,) = ort_run(copy.deepcopy(g), {"input": x})
    (ours,) = Session(g).run(None, {"input": x})
    assert_close(ours, ref)


def test_batchnorm_folded_and_prelu_fused_at_load(quicknet_qnb):
    ops = [n.op for n in Session(quicknet_qnb).graph.nodes]
    assert "BatchNormalization" not in ops and "PRelu" not in ops and "Dropout" not in ops
    assert ops.count("Conv") == 1 + 2 * 12 + 1  # stem, 12 separable blocks, head


def test_run_allocates_no_activation_memory(quicknet_qnb):
    sess = Session(quicknet_qnb)
    x = np.ones((1, 3, 64, 64), np.float32)
    sess.run(None, {"input": x})  # plan + compile
    arena = sess.prepare({"input": x.shape}).arena
    tracemalloc.start()
    sess.run(["probabilities"], {"input": x})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sess.prepare({"input": x.shape}).arena is arena  # planned once, reused
    # the smallest activation alone (64x64x32 floats, 512 KiB) would not fit
    assert peak < 64 * 1024, f"run() allocated {peak} bytes"


def test_outputs_do_not_alias_the_arena(quicknet_qnb):
    sess = Session(quicknet_qnb)
    a = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    (first,) = sess.run(["probabilities"], {"input": a})
    kept = first.copy()
    sess.run(["probabilities"], {"input": a * 2})
    np.testing.assert_array_equal(first, kept)


def test_api_mirrors_onnxruntime(quicknet_qnb):
    sess = Session(quicknet_qnb, providers=["CPUExecutionProvider"])
    (i,) = sess.get_inputs()
    assert (i.name, i.shape, i.type) == ("input", ["N", 3, "H", "W"], "tensor(float)")
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "logits"]
    assert sess.get_modelmeta().custom_metadata_map["model.name"] == "QuickNet"
    assert len(sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})) == 2


@pytest.mark.parametrize("feed, message", [
    ({"input": np.zeros((1, 3, 32, 32), np.float64)}, "dtype float64"),
    ({"input": np.zeros((1, 4, 32, 32), np.float32)}, "shape"),
    ({"input": np.zeros((3, 32, 32), np.float32)}, "shape"),
    ({"image": np.zeros((1, 3, 32, 32), np.float32)}, "missing"),
    ({"input": [[1.0]]}, "shape"),  # a nested list becomes an array (issue 13), of this shape
    ({"input": "an image"}, "numpy array"),
])
def test_bad_feed_is_a_clear_error(quicknet_qnb, feed, message):
    with pytest.raises(InvalidArgument, match=message):
        Session(quicknet_qnb).run(None, feed)


def test_unknown_output_name(quicknet_qnb):
    with pytest.raises(InvalidArgument, match="not an output"):
        Session(quicknet_qnb).run(["nope"], {"input": np.zeros((1, 3, 32, 32), np.float32)})


def test_too_small_input_is_refused_before_running():
    g = quicknet.build(width=0.125, input_size=None)
    with pytest.raises(GraphError):  # five 2x2 pools need at least 16x16
        Session(g).run(None, {"input": np.zeros((1, 3, 8, 8), np.float32)})


def test_unknown_op_named_at_load(tmp_path):
    g = quicknet.build(width=0.125)
    g.nodes.insert(1, Node("NonMaxSuppression", [g.nodes[0].outputs[0]], ["nms"], {}, "my_nms"))
    path = tmp_path / "bad.qnb"
    qnb.save(g, path)
    with pytest.raises(GraphError, match="NonMaxSuppression"):
        Session(str(path))


def test_session_rejects_non_qnb(tmp_path):
    p = tmp_path / "x.qnb"
    p.write_bytes(b"not a model at all" * 10)
    with pytest.raises(qnb.FormatError):
        Session(str(p))


def test_input_shapes_fixed_at_creation(quicknet_qnb):
    sess = Session(quicknet_qnb, input_shapes={"input": (2, 3, 64, 64)})
    assert sess.get_inputs()[0].shape == [2, 3, 64, 64]
    with pytest.raises(InvalidArgument, match="shape"):
        sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
    assert sess.run(None, {"input": np.zeros((2, 3, 64, 64), np.float32)})[0].shape == (2, 10)
    with pytest.raises(InvalidArgument, match="takes"):
        Session(quicknet_qnb, input_shapes={"input": (1, 4, 32, 32)})


def test_load_time_is_linear_in_the_graph(tmp_path):
    """20,000 Identity nodes (a 1 MB file) load in seconds, not minutes (issue 10)."""
    import time
    n = 20_000
    nodes = [Node("Identity", [f"t{i}"], [f"t{i + 1}"], {}, f"id{i}") for i in range(n)]
    nodes.append(Node("Relu", [f"t{n}"], ["y"], {}, "relu"))
    g = Graph(nodes[::-1], [ValueInfo("t0", (1, 4))], [ValueInfo("y", (1, 4))])  # any order
    path = tmp_path / "ids.qnb"
    qnb.save(g, path)
    t = time.perf_counter()
    sess = Session(str(path))
    assert time.perf_counter() - t < 60  # a guard against quadratic rewrites (172 s), not a speed goal: ~1 s
    assert [nd.op for nd in sess.graph.nodes] == ["Relu"] and sess.graph.nodes[0].inputs == ["t0"]
    x = np.array([[-1, 0, 2, -3]], np.float32)
    np.testing.assert_array_equal(sess.run(None, {"t0": x})[0], np.maximum(x, 0))


def test_one_session_from_eight_threads_matches_sequential_runs():
    import threading

    session = Session("models/quicknet_digits.qnb")
    rng = np.random.default_rng(7)
    feeds = [rng.standard_normal((1, 3, 32 + 8 * (k % 3), 32), dtype=np.float32) for k in range(16)]
    want = [session.run(None, {"input": x})[0] for x in feeds]
    got: dict = {}

    def work(k):
        for j in range(k, len(feeds), 8):
            got[j] = session.run(None, {"input": feeds[j]})[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[j], want[j]) for j in range(len(feeds)))
