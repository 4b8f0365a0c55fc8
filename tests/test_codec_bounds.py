"""What a Deep-Compressed payload can decode to (qnrt/codec.py's module doc):
every stored entry costs at least a bit of each stream, each gap-stream bit
moves the position by at most 2^16 - 1 elements, and the zeros after the last
stored entry are implicit, so only the total is capped (Limits.max_decoded_bytes)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import qnrt
from qnrt import codec
from qnrt import format as qnb
from qnrt.exporters.compress import encode_tensor

DC_MODEL = "models/quicknet_digits_dc.qnb"


def test_the_shipped_model_keeps_the_documented_bounds():
    g = qnb.load(DC_MODEL)
    assert g.encodings
    for name, enc in g.encodings.items():
        array = g.initializers[name]
        p = codec.layout(enc.payload, array.size)
        assert p["count"] <= min(p["index_nbits"], p["gap_nbits"]), name
        nonzero = np.flatnonzero(array.reshape(-1))
        last = int(nonzero[-1]) if nonzero.size else -1
        assert last < 65_535 * p["gap_nbits"] + p["count"], name


@pytest.mark.parametrize("values", [np.full(64, 0.5), np.r_[np.zeros(1000), 1.0],
                                    np.r_[1.0, np.zeros(200_000), -2.0]])
def test_edge_tensors_round_trip_within_the_bounds(values):
    deq, payload, _ = encode_tensor(values.astype(np.float32), 4)
    np.testing.assert_array_equal(codec.decode(payload, deq.shape), deq)


def test_more_entries_than_stream_bits_are_refused_before_decoding():
    deq, payload, _ = encode_tensor(np.arange(1, 33, dtype=np.float32), 4)
    b, g, r16, r32, count, inbits, gnbits = codec.HEADER.unpack_from(payload, 0)
    forged = codec.HEADER.pack(b, g, r16, r32, inbits + 1, inbits, gnbits) + payload[
        codec.HEADER.size:]
    with pytest.raises(codec.CodecError, match="cannot fit streams"):
        codec.layout(forged, 10**6)


def test_trailing_zeros_are_free_so_the_total_is_capped():
    """One stored entry in a few dozen bytes is a legal tensor of any size (the
    rest implicit zeros): the decoder believes it only within
    Limits.max_decoded_bytes."""
    deq, payload, _ = encode_tensor(np.r_[1.0, np.zeros(15)].astype(np.float32), 1)
    b, g, r16, r32, count, inbits, gnbits = codec.HEADER.unpack_from(payload, 0)
    assert len(payload) < 64
    big = np.zeros((1 << 20,), np.float32)  # 4 MiB from a few dozen bytes
    big[0] = deq[0]
    np.testing.assert_array_equal(codec.decode(payload, big.shape), big)
    graph = qnrt.graph.Graph([qnrt.graph.Node("Add", ["x", "w"], ["y"], {}, "add")],
                             [qnrt.graph.ValueInfo("x", (1 << 20,))],
                             [qnrt.graph.ValueInfo("y", (1 << 20,))], {"w": big}, {}, "g")
    qnb.attach_encoding(graph, "w", codec.DEEP_COMPRESSION, payload)
    data = qnrt.Session(graph).run(None, {"x": np.ones(1 << 20, np.float32)})[0]
    assert data[0] == 1 + deq[0] and (data[1:] == 1).all()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "zeros.qnb")
        qnb.save(graph, path)
        assert os.path.getsize(path) < 4096
        with pytest.raises(qnrt.FormatError, match="max_decoded_bytes"):
            qnrt.Session(path, limits=qnrt.Limits(max_decoded_bytes=1 << 20))
        assert qnrt.Session(path).get_inputs()
