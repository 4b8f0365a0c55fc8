"""Deep Compression: Huffman coding, gap escapes, k-means, the .qnb encoding 1
round trip (bit-exact dequantized weights, working sessions), and a FormatError
(never a crash or another exception) for every corrupt compressed tensor."""
from __future__ import annotations

import copy
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qnrt
from qnrt.exporters import compress as C
from qnrt.models import quicknet
from qnrt import codec
from qnrt import format as qnb
from qnrt.format import FormatError
from qnrt.graph import Graph, Node, ValueInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def decode_symbols(lengths, stream: bytes, nbits: int, count: int):
    err, out, _ = codec.huffman_decode(np.asarray(lengths, np.uint8),
                                       np.frombuffer(stream, np.uint8), nbits, count)
    return err, out


def bits_equal(a, b) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------ Huffman coding

@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_huffman_round_trip(data):
    k = data.draw(st.integers(1, 300), "alphabet")
    weights = np.array(data.draw(st.lists(st.integers(0, 1000), min_size=k, max_size=k)),
                       float) + data.draw(st.sampled_from([0.0, 1e-3]))
    if weights.sum() == 0:
        weights[0] = 1
    n = data.draw(st.integers(0, 3000), "count")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    symbols = rng.choice(k, size=n, p=weights / weights.sum())
    hist = np.bincount(symbols, minlength=k)
    lengths = C.huffman_lengths(hist)
    assert ((lengths > 0) == (hist > 0)).all()
    assert sum(2.0 ** -int(x) for x in lengths if x) <= 1
    stream, nbits = C.pack_symbols(symbols, lengths)
    assert nbits == C.code_bits(hist, lengths) and len(stream) == -(-nbits // 8)
    if n:  # Huffman is within one bit per symbol of the entropy
        p = hist[hist > 0] / n
        assert nbits <= n * (-(p * np.log2(p)).sum() + 1) + 1e-6
    err, out = decode_symbols(lengths, stream, nbits, n)
    assert err == codec.OK and out.tolist() == symbols.tolist()
    if n:  # one symbol too many: the stream runs out; one too few: bits are left over
        assert decode_symbols(lengths, stream, nbits, n + 1)[0] == codec.E_EXHAUSTED
        if nbits:
            assert decode_symbols(lengths, stream, nbits, n - 1)[0] == codec.E_TRAILING


def test_huffman_single_symbol_and_empty_streams():
    lengths = C.huffman_lengths([0, 0, 7, 0])
    assert lengths.tolist() == [0, 0, 1, 0]
    stream, nbits = C.pack_symbols([2] * 7, lengths)
    assert (stream, nbits) == (b"\0", 7)
    err, out = decode_symbols(lengths, stream, nbits, 7)
    assert err == 0 and out.tolist() == [2] * 7
    assert C.huffman_lengths([5]).tolist() == [1]
    assert C.huffman_lengths([0, 0]).tolist() == [0, 0]
    stream, nbits = C.pack_symbols([], [0, 0])
    assert (stream, nbits) == (b"", 0)
    err, out = decode_symbols([0, 0], b"", 0, 0)
    assert err == 0 and out.size == 0
    assert decode_symbols([0, 0], b"\0", 8, 1)[0] in (codec.E_INVALID, codec.E_EXHAUSTED)


def test_huffman_lengths_are_limited_to_24_bits():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    assert C.huffman_lengths(fib, max_len=64).max() == 39  # unlimited: 39 bits
    lengths = C.huffman_lengths(fib)
    assert lengths.max() <= codec.MAX_CODE_LEN
    assert sum(2.0 ** -int(x) for x in lengths) <= 1
    symbols = np.arange(40).repeat(3)
    stream, nbits = C.pack_symbols(symbols, lengths)
    err, out = decode_symbols(lengths, stream, nbits, symbols.size)
    assert err == 0 and out.tolist() == symbols.tolist()


def test_canonical_codes_follow_rfc1951():
    # the example of RFC 1951 3.2.2: ABCDEFGH with lengths (3, 3, 3, 3, 3, 2, 4, 4)
    codes = C.canonical_codes([3, 3, 3, 3, 3, 2, 4, 4])
    assert codes.tolist() == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


def test_bad_code_tables_are_reported():
    assert decode_symbols([25, 1], b"\0", 1, 1)[0] == codec.E_LENGTH
    assert decode_symbols([1, 1, 1], b"\0", 1, 1)[0] == codec.E_KRAFT
    assert decode_symbols([1, 0], b"\x80\0\0\0", 32, 1)[0] == codec.E_INVALID  # "1" unused
    assert decode_symbols([1, 0], b"\x80", 1, 1)[0] in (codec.E_INVALID, codec.E_EXHAUSTED)
    assert decode_symbols([24, 24], b"\xff\xff\xff", 24, 1)[0] == codec.E_INVALID


# ------------------------------------------------------------------ gaps and k-means

@pytest.mark.parametrize("g", [None, 1, 2, 8, 16])
def test_gap_escape_for_long_gaps(g):
    a = np.zeros(100_001, np.float32)
    a[-1] = 0.5
    deq, payload, stats = C.encode_tensor(a, 3, gap_bits=g)
    assert bits_equal(deq, a) and stats["nonzero"] == 1
    back = codec.decode(payload, a.shape)
    assert bits_equal(back, a)
    if g is None:
        assert len(payload) < 400  # the writer picks a wide gap symbol: few escapes
    a[0] = -1.0  # a stored entry at position 0 (gap 0) and one at the very end
    deq, payload, _ = C.encode_tensor(a, 1, gap_bits=g)
    assert bits_equal(codec.decode(payload, a.shape), a) and bits_equal(deq, a)


def test_all_zero_dense_and_tiny_tensors():
    for a in (np.zeros((3, 5), np.float32), np.ones((4, 4), np.float32),
              np.array([2.5], np.float32), np.zeros(0, np.float32),
              np.array(-0.0, np.float32)):
        deq, payload, stats = C.encode_tensor(a, 4)
        back = codec.decode(payload, a.shape)
        assert bits_equal(back, deq) and np.array_equal(deq, a)
    assert stats["nonzero"] == 0  # -0.0 is a pruned position: it decodes as +0.0


def test_kmeans_error_decreases_with_bits():
    w = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    w[::3] = 0
    errors = []
    for b in range(1, 9):
        deq, payload, stats = C.encode_tensor(w, b)
        assert bits_equal(codec.decode(payload, w.shape), deq)
        assert (deq[w == 0] == 0).all() and (deq[w != 0] != 0).all()
        assert np.unique(deq[w != 0]).size <= 2**b
        errors.append(stats["rel_error"])
    assert all(x > y for x, y in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 and errors[4] < 0.08
    codebook, idx = C.kmeans_1d(w[w != 0], 4)
    assert (np.diff(codebook) >= 0).all()
    # Lloyd's optimality: every value is at its nearest centroid
    nearest = np.abs(w[w != 0][:, None] - codebook[None, :]).argmin(1)
    assert (np.abs(codebook[nearest] - codebook[idx]) <= 1e-6).all()


def test_few_distinct_values_are_kept_exactly_with_a_smaller_codebook():
    a = np.random.default_rng(1).choice(np.float32([0, 0, 0, -1.5, 0.25, 3.0]), 5000)
    deq, payload, stats = C.encode_tensor(a.astype(np.float32), 8)
    assert bits_equal(deq, a) and stats["bits"] == 2 and stats["rel_error"] == 0


def test_kmeans_is_fast_for_a_million_weights():
    w = np.random.default_rng(2).standard_normal(1_000_000).astype(np.float32)
    start = time.perf_counter()
    deq, payload, stats = C.encode_tensor(C.prune_magnitude(w, 0.5), 8)
    assert time.perf_counter() - start < 10  # about 0.3 s on one core
    assert bits_equal(codec.decode(payload, w.shape), deq)


def test_prune_magnitude():
    w = np.arange(1, 101, dtype=np.float32) * np.tile([1, -1], 50)
    p = C.prune_magnitude(w, 0.9)
    assert (p == 0).sum() == 90 and set(np.abs(p[p != 0])) == set(range(91, 101))
    assert (w != 0).all()  # the input is not modified


# ------------------------------------------------------------------ QuickNet round trip

def pruned_quicknet(fraction=0.8, seed=1):
    w = quicknet.initial_weights(width=0.25, seed=seed)
    for k in w:
        if k.endswith(".weight") and w[k].size >= 512:
            w[k] = C.prune_magnitude(w[k], fraction)
    return quicknet.build(w, width=0.25)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dc")
    ref = pruned_quicknet()
    g = pruned_quicknet()
    report = C.compress_graph(g, min_size=1024)
    qnb.save(ref, folder / "fp32.qnb")
    qnb.save(g, folder / "dc.qnb")
    return ref, g, report, folder


def test_quicknet_save_load_is_bit_exact(compressed):
    ref, g, report, folder = compressed
    done = [r["name"] for r in report["tensors"] if r["bits"] is not None]
    assert len(done) >= 10 and all(".weight" in n for n in done)
    assert {r["bits"] for r in report["tensors"] if ".pw." in r["name"] and r["bits"]} == {4}
    assert {r["bits"] for r in report["tensors"] if ".dw." in r["name"] and r["bits"]} == {8}
    back = qnb.load(folder / "dc.qnb")
    assert list(back.initializers) == list(g.initializers)
    for name, arr in g.initializers.items():
        assert bits_equal(back.initializers[name], arr), name
        assert not back.initializers[name].flags.writeable
    encodings = {t["name"]: t["encoding"] for t in qnb.info(folder / "dc.qnb")["tensors"]}
    assert {n for n, e in encodings.items() if e == "deep-compression"} == set(done)
    rows = {r["name"]: r for r in report["tensors"]}
    for name in done:  # zeros stay exactly zero, nonzero weights take codebook values
        w, q = ref.initializers[name], g.initializers[name]
        assert ((w == 0) == (q == 0)).all()
        distinct = np.unique(w[w != 0]).size
        assert np.unique(q[q != 0]).size <= min(distinct, 2 ** rows[name]["bits"])
        assert np.array_equal(w, q) == (distinct <= 2 ** rows[name]["bits"])
    sizes = [os.path.getsize(folder / f) for f in ("fp32.qnb", "dc.qnb")]
    assert sizes[1] < sizes[0] / 5


def test_compressed_session_differs_only_by_quantisation(compressed):
    ref, g, _, folder = compressed
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    graphs = [copy.deepcopy(ref), copy.deepcopy(g), qnb.load(folder / "dc.qnb")]
    for gr in graphs:  # Session optimizes its graph in place: give it copies
        gr.outputs = gr.outputs + [ValueInfo("logits", ("N", 10))]
    (pa, la), (pb, lb), (pc, lc) = (qnrt.Session(gr).run(None, {"input": x}) for gr in graphs)
    assert np.array_equal(pb, pc) and np.array_equal(lb, lc)
    rel = np.linalg.norm(la - lb) / np.linalg.norm(la - la.mean(1, keepdims=True))
    assert 0 < rel < 0.2, rel
    assert np.abs(pa - pb).max() < 0.02
    (pd,) = qnrt.Session(str(folder / "dc.qnb")).run(None, {"input": x})
    assert np.array_equal(pd, pb)
    (pe,) = qnrt.Session((folder / "dc.qnb").read_bytes()).run(None, {"input": x})
    assert np.array_equal(pe, pb)


def test_load_save_round_trip_keeps_the_compression(compressed, tmp_path):
    _, _, _, folder = compressed
    qnb.save(qnb.load(folder / "dc.qnb"), tmp_path / "again.qnb")
    assert (tmp_path / "again.qnb").read_bytes() == (folder / "dc.qnb").read_bytes()


def test_a_changed_array_is_not_written_with_a_stale_payload(compressed, tmp_path):
    _, g, report, _ = compressed
    name = next(r["name"] for r in report["tensors"] if r["bits"])
    g2 = g.copy()  # the encodings travel with the graph
    arr = g2.initializers[name]
    with pytest.raises(ValueError, match="read-only"):
        arr.reshape(-1)[0] = 1.0
    changed = arr.copy()
    changed.reshape(-1)[np.flatnonzero(changed)[0]] *= 2
    g2.initializers[name] = changed  # a rewrite that replaces the array
    assert qnb.encoding_of(g2, name) is not None
    with pytest.raises(ValueError, match=f"'{name}' no longer matches"):
        qnb.save(g2, tmp_path / "m.qnb")
    assert os.listdir(tmp_path) == []
    qnb.detach_encoding(g2, name)
    assert qnb.encoding_of(g2, name) is None
    qnb.save(g2, tmp_path / "m.qnb")
    assert bits_equal(qnb.load(tmp_path / "m.qnb").initializers[name], changed)
    assert {t["name"]: t["encoding"] for t in qnb.info(tmp_path / "m.qnb")["tensors"]}[
        name] == "raw"
    g2.initializers.update(i=np.zeros(3, np.int32), f=np.zeros(3, np.float32))
    with pytest.raises(TypeError):
        qnb.attach_encoding(g2, "i", 1, b"")
    with pytest.raises(ValueError):
        qnb.attach_encoding(g2, "f", 7, b"")


def test_compress_file_and_command_line(compressed, tmp_path, capsys):
    _, _, _, folder = compressed
    src, dst = folder / "fp32.qnb", tmp_path / "out.qnb"
    lines = []
    report = C.compress_file(src, dst, bits=None, log=lines.append)
    sizes = report["file"]
    assert sizes["source"] == os.path.getsize(src) and sizes["compressed"] == os.path.getsize(dst)
    assert sizes["fp32"] <= sizes["source"]  # batch norm is folded before compressing
    text = lines[0]
    for word in ("pruned", "quant", "huffman", "stage ratios", ".qnb file: fp32"):
        assert word in text
    t = report["all"]
    assert t["fp32"] > t["pruned"] > t["quantized"] > t["huffman"]
    assert C.main([str(src), str(tmp_path / "cli.qnb"), "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "huffman" in out and "sep12.pw.weight" in out
    head = qnb.info(tmp_path / "cli.qnb")
    assert all(t["encoding"] in ("raw", "deep-compression") for t in head["tensors"])
    g = qnb.load(tmp_path / "cli.qnb")
    assert np.unique(g.initializers["sep12.pw.weight"]).size <= 2**4 + 1
    assert C.main([str(tmp_path / "missing.qnb"), str(tmp_path / "x.qnb")]) == 1


def test_bits_rules():
    g = pruned_quicknet()
    rule = C.bits_for_error(0.05)
    report = C.compress_graph(g, min_size=1024, bits_for=rule)
    assert all(r["rel_error"] <= 0.05 for r in report["tensors"] if r["bits"])
    g = pruned_quicknet()
    report = C.compress_graph(g, min_size=1024,
                              bits_for=lambda name, a, node: None if ".dw." in name else 3)
    chosen = {r["name"]: r["bits"] for r in report["tensors"] if r["bits"]}
    assert chosen and set(chosen.values()) == {3} and not any(".dw." in n for n in chosen)


# ------------------------------------------------------------------ corrupt files

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A file with one compressed weight tensor followed by a raw one."""
    rng = np.random.default_rng(3)
    w = C.prune_magnitude(rng.standard_normal((32, 64, 1, 1)).astype(np.float32), 0.7)
    g = Graph([Node("Conv", ["x", "w", "b"], ["y"], {"group": 1})],
              [ValueInfo("x", ("N", 64, 4, 4))], [ValueInfo("y", ("N", 32, 4, 4))],
              {"w": w, "b": np.arange(32, dtype=np.float32)})
    C.compress_graph(g, min_size=1)
    assert qnb.encoding_of(g, "w") is not None
    path = tmp_path_factory.mktemp("small") / "small.qnb"
    qnb.save(g, path)
    return path.read_bytes(), g.initializers["w"].copy()


def u64(buf, at):
    return struct.unpack_from("<Q", buf, at)[0]


def refresh(buf: bytearray) -> bytearray:
    """Recompute both checksums, so the reader gets past them to the decoder."""
    data_off = u64(buf, 64)
    struct.pack_into("<I", buf, 84, zlib.crc32(bytes(buf[data_off:])))
    zeroed = bytes(buf[:80]) + b"\0" * 8 + bytes(buf[88:data_off])
    struct.pack_into("<I", buf, 80, zlib.crc32(zeroed))
    return buf


def entry_of(buf, name: str) -> dict:
    start, size = u64(buf, 48), u64(buf, 56)
    key = struct.pack("<I", len(name)) + name.encode()
    at = bytes(buf[start:start + size]).index(key) + start + len(key)
    rank = struct.unpack_from("<I", buf, at + 2)[0]
    return {"shape": at + 6, "offset": at + 6 + 8 * rank, "length": at + 14 + 8 * rank}


def payload_at(buf) -> tuple[int, int]:
    e = entry_of(buf, "w")
    return u64(buf, 64) + u64(buf, e["offset"]), u64(buf, e["length"])


def only_format_errors(buf: bytes, path) -> str | None:
    """Load `buf` every way; anything but success or FormatError fails the test."""
    msgs = []
    for call in (lambda: qnb.loads(buf), lambda: qnb.loads(buf, verify=False)):
        try:
            call()
        except FormatError as exc:
            msgs.append(str(exc))
    path.write_bytes(buf)
    try:
        qnb.load(path)
    except FormatError as exc:
        assert str(path) in str(exc)
        msgs.append(str(exc))
    return msgs[0] if msgs else None


def corrupt(small, tmp_path, at: int, fmt: str, value, *words):
    buf = bytearray(small[0])
    start, _ = payload_at(buf)
    struct.pack_into(fmt, buf, start + at, *(value if isinstance(value, tuple) else (value,)))
    msg = only_format_errors(bytes(refresh(buf)), tmp_path / "bad.qnb")
    assert msg is not None, (at, value)
    for w in ("tensor 'w'",) + words:
        assert w in msg, msg
    return msg


def test_small_file_is_valid(small, tmp_path):
    assert only_format_errors(small[0], tmp_path / "ok.qnb") is None
    assert bits_equal(qnb.loads(small[0]).initializers["w"], small[1])


def test_corrupt_headers_and_tables(small, tmp_path):
    buf = small[0]
    start, n = payload_at(buf)
    b, g, _, _, count, inbits, gnbits = codec.HEADER.unpack_from(buf, start)
    k = 1 << b
    corrupt(small, tmp_path, 0, "<B", 0, "index bits 0")
    corrupt(small, tmp_path, 0, "<B", 9, "index bits 9")
    corrupt(small, tmp_path, 1, "<B", 0, "gap bits 0")
    corrupt(small, tmp_path, 1, "<B", 17, "gap bits 17")
    corrupt(small, tmp_path, 2, "<H", 1, "reserved")
    corrupt(small, tmp_path, 8, "<Q", 32 * 64 + 1, "2049 stored entries", "2048 elements")
    corrupt(small, tmp_path, 8, "<Q", count + 1, "corrupt Huffman stream")
    corrupt(small, tmp_path, 8, "<Q", count - 1, "corrupt Huffman stream", "left over")
    corrupt(small, tmp_path, 16, "<Q", inbits + 8, "header describes")
    corrupt(small, tmp_path, 16, "<Q", 2**64 - 1, "header describes")
    corrupt(small, tmp_path, 24, "<Q", gnbits - 8, "header describes")
    lengths = 32 + 4 * k
    corrupt(small, tmp_path, lengths, "<B", 25, "corrupt Huffman stream",
            "length above 24", "index stream")
    corrupt(small, tmp_path, lengths, f"<{k}B", (1,) * k, "oversubscribed")
    corrupt(small, tmp_path, lengths, f"<{k}B", (0,) * k, "corrupt Huffman stream")
    corrupt(small, tmp_path, lengths + k, "<B", 200, "length above 24", "gap stream")
    assert gnbits % 8, "the test needs padding bits in the gap stream's last byte"
    corrupt(small, tmp_path, n - 1, "<B", buf[start + n - 1] | 1, "nonzero padding bits")


def test_truncated_or_stretched_lengths(small, tmp_path):
    buf = bytearray(small[0])
    _, n = payload_at(buf)
    at = entry_of(buf, "w")["length"]
    for length in (0, 1, 31, 32, n - 8, n - 1, n + 1):
        bad = bytearray(buf)
        struct.pack_into("<Q", bad, at, length)
        msg = only_format_errors(bytes(refresh(bad)), tmp_path / "bad.qnb")
        assert msg and "'w'" in msg and ("bytes" in msg or "overlap" in msg), msg


def test_positions_beyond_the_tensor(small, tmp_path):
    buf = bytearray(small[0])
    start, _ = payload_at(buf)
    count = u64(buf, start + 8)
    struct.pack_into("<Q", buf, entry_of(buf, "w")["shape"], -(-count // 64))
    msg = only_format_errors(bytes(refresh(buf)), tmp_path / "bad.qnb")
    assert "position beyond the end of the tensor" in msg and "gap stream" in msg


def test_encoded_tensor_needs_float32(small, tmp_path):
    buf = bytearray(small[0])
    struct.pack_into("<B", buf, entry_of(buf, "w")["shape"] - 6, 5)  # dtype -> int32
    msg = only_format_errors(bytes(refresh(buf)), tmp_path / "bad.qnb")
    assert "encoding 1" in msg and "float32 only" in msg


def test_huge_shape_is_a_format_error(small, tmp_path):
    buf = bytearray(small[0])
    struct.pack_into("<QQQQ", buf, entry_of(buf, "w")["shape"], 2**40, 2**19, 1, 1)
    assert only_format_errors(bytes(refresh(buf)), tmp_path / "bad.qnb")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_compressed_payload(small, tmp_path_factory, data):
    buf = bytearray(small[0])
    start, n = payload_at(buf)
    for _ in range(data.draw(st.integers(1, 6))):
        at = start + data.draw(st.one_of(st.integers(0, 47), st.integers(0, n - 1)))
        buf[at] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        struct.pack_into("<Q", buf, entry_of(buf, "w")["length"], data.draw(st.integers(0, n)))
    only_format_errors(bytes(refresh(buf)), tmp_path_factory.getbasetemp() / "fuzz.qnb")


BOUNDSCHECK = r"""
import numpy as np, sys
from qnrt import codec
from qnrt.exporters import compress as C
rng = np.random.default_rng(0)
w = C.prune_magnitude(rng.standard_normal(3000).astype(np.float32), 0.6)
payloads = [C.encode_tensor(w, b)[1] for b in (1, 5, 8)]
payloads.append(C.encode_tensor(np.r_[np.zeros(5000), 1.0].astype(np.float32), 2, 1)[1])
ok = bad = 0
for trial in range(3000):
    p = bytearray(payloads[trial % len(payloads)])
    for _ in range(rng.integers(1, 8)):
        p[rng.integers(0, len(p))] ^= rng.integers(1, 256)
    try:
        codec.decode(bytes(p), (len(w),) if trial % 4 < 3 else (5001,))
        ok += 1
    except codec.CodecError:
        bad += 1
print(ok, bad)
"""


def test_decoder_never_leaves_its_buffers(tmp_path):
    """Flipped payloads decoded with Numba's bounds checking on: an out-of-bounds
    access would raise IndexError instead of CodecError."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", BOUNDSCHECK], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ok, bad = map(int, out.stdout.split())
    assert bad > 1000 and ok + bad == 3000
