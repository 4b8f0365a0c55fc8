"""A seeded mutational fuzzer of well-formed .qnb files (checksums right, so
the loader's own checks pass): semantic edits to QuickNet's graph, each
loaded into a Session and run. Only documented exceptions (qnrt.QnrtError)
may come out; most must come from the validation pass, not the last-resort
wrapper. (tests/test_format.py fuzzes the bytes; this fuzzes the meaning.)"""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

import qnrt
from qnrt import format as qnb
from qnrt.models import quicknet

CASES = 300
WRONG_ATTRS = ["Relu", [1.5, 2], 3.5, -7, 2**40, [0] * 9, "", [-1, -1], float("nan")]
WRONG_SIZES = [3.5, "big", [0, 0], [2**62, 2], [1], ["a", "b"]]
OPS = ["Relu", "Conv", "MaxPool", "Gemm", "Softmax", "Reshape", "Add", "Concat", "PRelu",
       "BatchNormalization", "Nope"]


def mutate(graph, rng):
    """One semantic edit: the kinds of damage a file sent to a device can carry."""
    g = graph.copy()
    node = g.nodes[int(rng.integers(0, len(g.nodes)))]
    constants = list(g.initializers)
    kind = int(rng.integers(0, 12))
    if kind == 0 and node.inputs:  # an input dropped
        del node.inputs[int(rng.integers(0, len(node.inputs)))]
    elif kind == 1:  # no output, or an unnamed one
        node.outputs = [] if rng.random() < 0.5 else [""]
    elif kind == 2:  # an attribute of the wrong type or range
        key = ["alpha", "axis", "pads", "strides", "group", "kernel_shape", "epsilon",
               "dilations", "activation"][int(rng.integers(0, 9))]
        node.attrs[key] = WRONG_ATTRS[int(rng.integers(0, len(WRONG_ATTRS)))]
    elif kind == 3:  # a node writing a constant's name
        node.outputs[0] = constants[int(rng.integers(0, len(constants)))]
    elif kind == 4:  # the graph output is a constant or the input
        names = constants + [g.inputs[0].name]
        g.outputs[0].name = names[int(rng.integers(0, len(names)))]
    elif kind == 5:  # more outputs than the op makes
        node.outputs = node.outputs + ["extra1", "extra2"]
    elif kind == 6:  # metadata the runtime reads, of the wrong type
        g.metadata["preprocess.size"] = WRONG_SIZES[int(rng.integers(0, len(WRONG_SIZES)))]
    elif kind == 7 and len(node.inputs) >= 2:  # inputs swapped
        node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]
    elif kind == 8:  # a constant of the wrong size
        name = constants[int(rng.integers(0, len(constants)))]
        g.initializers[name] = np.ones(int(rng.integers(1, 5)), np.float32)
    elif kind == 9:  # a cycle
        node.inputs.append(node.outputs[0] if node.outputs else "nowhere")
    elif kind == 10:  # another op under the same wiring
        node.op = OPS[int(rng.integers(0, len(OPS)))]
    else:  # a node duplicated
        g.nodes.insert(int(rng.integers(0, len(g.nodes))), copy.deepcopy(node))
    return g


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_graphs_raise_only_documented_errors(tmp_path, seed):
    base = quicknet.build(width=0.125, labels=[str(i) for i in range(10)])
    rng = np.random.default_rng(seed)
    path = tmp_path / "mutant.qnb"
    outcome = Counter()
    for case in range(CASES // 2):
        g = mutate(base, rng)
        try:
            qnb.save(g, path)
        except (qnrt.QnrtError, TypeError, ValueError):
            outcome["the writer refused it"] += 1
            continue
        try:
            session = qnrt.Session(str(path))
            session.run(None, {"input": np.random.default_rng(case).standard_normal(
                (1, 3, 32, 32), dtype=np.float32)})
            outcome["ran"] += 1
        except qnrt.QnrtError as exc:
            assert str(exc), case
            outcome["last resort" if "is malformed" in str(exc) else "refused"] += 1
        # anything else propagates and fails the test, naming the case
    assert outcome["refused"] >= 3 * outcome["last resort"], outcome
    assert outcome["ran"] > 0 and outcome["refused"] > CASES // 4, outcome


@pytest.mark.parametrize("graph_edit,match", [
    (lambda g: setattr(g.nodes[3], "outputs", []), "has no output"),
    (lambda g: g.nodes[3].outputs.__setitem__(0, ""), "has no output"),
    (lambda g: g.nodes[3].outputs.append("x2"), "outputs; .* makes 1"),
    (lambda g: g.nodes[0].inputs.pop(), "inputs"),
    (lambda g: g.nodes[3].attrs.__setitem__("alpha", "Relu"), "attribute 'alpha' must be a number"),
    (lambda g: g.nodes[0].attrs.__setitem__("pads", 3.5), "attribute 'pads' must be a list of ints"),
    (lambda g: g.metadata.__setitem__("preprocess.size", 3.5), "preprocess.size"),
    (lambda g: g.metadata.__setitem__("labels", [1, 2]), "labels"),
    (lambda g: setattr(g.outputs[0], "name", next(iter(g.initializers))), "is a constant"),
])
def test_the_validation_pass_names_what_is_wrong(tmp_path, graph_edit, match):
    g = quicknet.build(width=0.125)
    graph_edit(g)
    with pytest.raises(qnrt.GraphError, match=match):
        qnrt.Session(g)
