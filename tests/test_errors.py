"""The documented exceptions and the session limits."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import qnrt
from qnrt import Limits, LimitError, QnrtError, Session
from qnrt.graph import Graph, Node, ValueInfo

MODEL = "models/quicknet_digits.qnb"


def test_the_hierarchy_is_exported_and_shared_by_the_modules():
    from qnrt import compiler, format, graph, image, session

    for cls in (qnrt.FormatError, qnrt.GraphError, qnrt.InvalidArgument, qnrt.ImageError,
                qnrt.ArenaLimitError, qnrt.LimitError):
        assert issubclass(cls, QnrtError) and issubclass(cls, ValueError), cls
    assert issubclass(qnrt.ArenaLimitError, qnrt.GraphError)
    assert issubclass(qnrt.LimitError, qnrt.GraphError)
    assert format.FormatError is qnrt.FormatError and graph.GraphError is qnrt.GraphError
    assert session.InvalidArgument is qnrt.InvalidArgument and image.ImageError is qnrt.ImageError
    assert compiler.ArenaLimitError is qnrt.ArenaLimitError


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_dim"):
        Limits(max_dim=0)
    with pytest.raises(ValueError, match="max_arena_bytes"):
        Limits(max_arena_bytes=True)
    with pytest.raises(TypeError, match="qnrt.Limits"):
        Session(MODEL, limits={"max_dim": 5})


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 2_000_000, 64), "Limits.max_dim"),
    ((1, 3, 20_000, 20_000), "Limits.max_tensor_bytes"),
    ((200_000, 3, 32, 32), "Limits.max_tensor_bytes"),
])
def test_huge_inputs_are_refused_before_allocating(shape, match):
    session = Session(MODEL)
    tracemalloc.start()
    try:
        with pytest.raises(LimitError, match=match):
            session.prepare({"input": shape})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, peak  # nothing near the tensor's size was allocated


def test_arena_and_workspace_limits_name_the_figure():
    with pytest.raises(LimitError, match=r"arena .* needs 0\.4 MiB, more than Limits\.max_arena"):
        Session(MODEL, limits=Limits(max_arena_bytes=100_000)).prepare({"input": (1, 3, 32, 32)})
    with pytest.raises(LimitError, match=r"node '.*' .*scratch.*max_workspace_bytes"):
        Session(MODEL, limits=Limits(max_workspace_bytes=1000)).prepare({"input": (1, 3, 64, 64)})
    roomy = Limits(max_arena_bytes=64 << 30, max_tensor_bytes=8 << 30)
    assert Session(MODEL, limits=roomy).prepare({"input": (1, 3, 32, 32)}).memory.arena_bytes


def test_an_overflowing_reshape_is_a_limit_error_not_a_numpy_error():
    shape = np.array([2**62 + 1, 64], dtype=np.int64)
    g = Graph([Node("Reshape", ["x", "shape"], ["y"], {}, "reshape")],
              [ValueInfo("x", (1, 64))], [ValueInfo("y", (2**62 + 1, 64))], {"shape": shape})
    with pytest.raises(QnrtError):
        Session(g).prepare({"x": (1, 64)})


def test_run_errors_are_qnrt_errors():
    session = Session(MODEL)
    with pytest.raises(QnrtError, match="dtype"):
        session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float64)})
    with pytest.raises(QnrtError, match="too big|max_tensor_bytes|max_dim"):
        session.run(None, {"input": np.broadcast_to(np.float32(0), (1, 3, 20_000, 20_000))})


def test_compressed_weights_are_believed_only_within_the_decode_limit():
    dc = "models/quicknet_digits_dc.qnb"
    with pytest.raises(qnrt.FormatError, match=r"declare .* bytes decoded, more than the limit"):
        Session(dc, limits=Limits(max_decoded_bytes=1_000_000))
    with pytest.raises(qnrt.FormatError, match="max_decoded_bytes"):
        qnrt.format.load(dc, max_decoded_bytes=1000)
    assert Session(dc).get_inputs()  # the shipped model decodes within the default
