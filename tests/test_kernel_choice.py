"""Choosing and seeing kernel variants: the names chosen for the shipped
QuickNet are pinned (a threshold change that moves a layer to another path
shows up here), Session(kernels=...) forces variants, and the reference
variants alone run whole models as ONNX Runtime does."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_close, ort_run
from qnrt.models import quicknet
from qnrt import GraphError, Session
from qnrt.ops import REGISTRY, all_variants

MODEL = "models/quicknet_digits.qnb"

SEP_32 = (["conv.dw3x3.plane", "conv.pointwise.gemm", "pool.max2x2"]
          + ["conv.dw3x3.padded", "conv.pointwise.tiled"] * 2 + ["pool.max2x2"]
          + ["conv.depthwise.nhwc", "conv.pointwise.tiled"] * 3 + ["pool.max2x2"]
          + ["conv.depthwise.nhwc", "conv.pointwise.tiled"] * 3 + ["pool.max2x2"]
          + ["conv.depthwise.nhwc", "conv.pointwise.skinny"] * 3)
SEP_224 = (["conv.dw3x3.plane", "conv.pointwise.gemm", "pool.max2x2"]
           + ["conv.dw3x3.plane", "conv.pointwise.gemm"] * 2 + ["pool.max2x2"]
           + ["conv.dw3x3.plane", "conv.pointwise.gemm"] * 3 + ["pool.max2x2"]
           + ["conv.dw3x3.plane", "conv.pointwise.gemm"] * 3 + ["pool.max2x2"]
           + ["conv.dw3x3.padded", "conv.pointwise.gemm"] * 3)
HEAD = ["global_pool.rows", "reshape.alias", "softmax.rows"]
QUICKNET_KERNELS = {  # the head's 1x1 conv on 2x2 and on 14x14
    (1, 3, 32, 32): ["conv.im2col"] + SEP_32 + ["conv.pointwise.tiled"] + HEAD,
    (1, 3, 224, 224): ["conv.im2col"] + SEP_224 + ["conv.pointwise.gemm"] + HEAD,
}


@pytest.mark.parametrize("shape", sorted(QUICKNET_KERNELS))
def test_quicknet_kernel_names_are_pinned(shape):
    names = [k for _, k in Session(MODEL).kernel_names({"input": shape})]
    assert names == QUICKNET_KERNELS[shape]


def test_every_op_ends_with_its_reference():
    for op, names in all_variants().items():
        assert names[-1].endswith(".reference"), (op, names)
        assert len(set(names)) == len(names), (op, names)
        family = names[-1].split(".")[0]
        assert all(n.split(".")[0] == family for n in names), (op, names)


def test_info_names_the_kernel_of_every_step():
    out = subprocess.run([sys.executable, "-m", "qnrt", "info", MODEL, "--input-shape",
                          "1,3,32,32", "--json"], capture_output=True, text=True, check=True)
    steps = json.loads(out.stdout)["steps"]
    assert [s["kernel"] for s in steps] == QUICKNET_KERNELS[(1, 3, 32, 32)]
    text = subprocess.run([sys.executable, "-m", "qnrt", "info", MODEL], capture_output=True,
                          text=True, check=True).stdout
    assert "conv.pointwise.skinny" in text and "pool.max2x2" in text


@pytest.fixture(scope="module")
def quicknet_graph():
    g = quicknet.build(width=0.25, input_size=None)
    return g


def test_reference_kernels_run_quicknet_like_onnxruntime(quicknet_graph):
    x = np.random.default_rng(7).standard_normal((2, 3, 32, 32), dtype=np.float32)
    (ref,) = ort_run(copy.deepcopy(quicknet_graph), {"input": x})
    sess = Session(quicknet_graph, kernels="reference")
    assert {k for _, k in sess.kernel_names({"input": x.shape})} <= {
        v.reference.name for v in REGISTRY.values()}
    (ours,) = sess.run(None, {"input": x})
    assert_close(ours, ref)


def test_forcing_by_op_variant_and_node_name(quicknet_graph):
    shape = {"input": (1, 3, 32, 32)}
    auto = dict(Session(quicknet_graph).kernel_names(shape))
    by_op = dict(Session(quicknet_graph, kernels={"Conv": "conv.im2col"}).kernel_names(shape))
    assert all(by_op[n] == "conv.im2col" for n, k in auto.items() if k.startswith("conv."))
    assert by_op["pool1"] == auto["pool1"] == "pool.max2x2"
    swap = {"conv.dw3x3.padded": "conv.reference"}
    by_variant = dict(Session(quicknet_graph, kernels=swap).kernel_names(shape))
    assert {n for n, k in by_variant.items() if k == "conv.reference"} == {
        n for n, k in auto.items() if k == "conv.dw3x3.padded"} != set()
    one = dict(Session(quicknet_graph, kernels={"sep1.dw": "reference"}).kernel_names(shape))
    assert one["sep1.dw"] == "conv.reference" and one["sep2.dw"] == auto["sep2.dw"]


def test_forced_variants_give_the_same_answers(quicknet_graph):
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32), dtype=np.float32)
    (auto,) = Session(quicknet_graph).run(None, {"input": x})
    for kernels in ({"Conv": "conv.im2col"}, {"MaxPool": "pool.reference"}, "reference"):
        (forced,) = Session(quicknet_graph, kernels=kernels).run(None, {"input": x})
        assert_close(forced, auto)


def test_unknown_or_inapplicable_variant_is_a_clear_error(quicknet_graph):
    with pytest.raises(ValueError, match="conv.winograd.*not a kernel variant"):
        Session(quicknet_graph, kernels={"Conv": "conv.winograd"})
    with pytest.raises(ValueError, match="kernels must be"):
        Session(quicknet_graph, kernels="fastest")
    with pytest.raises(GraphError, match="stem.*'conv.dw3x3.plane' does not apply"):
        Session(quicknet_graph, kernels={"Conv": "conv.dw3x3.plane"}).prepare(
            {"input": (1, 3, 32, 32)})
