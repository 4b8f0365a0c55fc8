"""The .qnb container: exact round-trips, zero-copy loading, atomic writes, and a
FormatError (never another exception) for every malformed file."""
from __future__ import annotations

import mmap
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnrt.models import quicknet
from qnrt import format as qnb
from qnrt.format import FormatError
from qnrt.graph import Graph, Node, ValueInfo

METADATA = {
    "model.name": "hand-made", "unicode": "日本語 ✓", "blank": "",
    "count": 3, "negative": -7, "big": 2**63 - 1, "small": -2**63,
    "ratio": 0.1, "whole_float": 1.0, "tiny": 5e-324,
    "yes": True, "no": False,
    "labels": ["cat", "dög", ""], "ints": [1, -2, 3], "floats": [0.5, 2.0, -1e300],
    "bools": [True, False], "empty": [],
}
ATTRS = {"group": 1, "alpha": 0.5, "auto_pad": "NOTSET", "kernel_shape": [3, 3],
         "scales": [1.0, 2.5], "names": ["a", "ü"], "empty": [], "flag": True,
         "neg": -1}


def handmade() -> Graph:
    inits = {
        "w": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "b": np.array([1.5, -2], dtype=np.float16),
        "idx": np.array([[1, -2], [3, 4]], dtype=np.int64),
        "q": np.arange(-3, 2, dtype=np.int8),
        "u": np.arange(7, dtype=np.uint8),
        "i32": np.arange(3, dtype=np.int32),
        "scalar": np.array(2.5, dtype=np.float32),
        "nothing": np.zeros((0, 3), np.float32),
        "be": np.arange(5, dtype=">f4"),  # big-endian in memory, little-endian on disk
    }
    nodes = [
        Node("Conv", ["x", "w", "b"], ["c"], dict(ATTRS), "conv0"),
        Node("Resize", ["c", "", "idx"], ["mid1"], {"mode": "nearest"}, "resize"),
        Node("Custom", ["mid1", "q", "u", "i32", "scalar", "nothing", "be"], ["y", "aux"]),
    ]
    return Graph(nodes, [ValueInfo("x", ("N", 3, "H", "W"))],
                 [ValueInfo("y", ("N", 2, 5, 5)), ValueInfo("aux", ("N",), "int64")],
                 inits, dict(METADATA), name="hand-made ✓")


def typed(v):
    """A value with every element's type spelled out, for exact comparison."""
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [typed(x) for x in v])
    return (type(v).__name__, v)


def assert_same_graph(a: Graph, b: Graph) -> None:
    assert b.name == a.name
    assert {k: typed(v) for k, v in b.metadata.items()} == \
           {k: typed(v) for k, v in a.metadata.items()}
    assert list(b.metadata) == list(a.metadata)
    for x, y in ((a.inputs, b.inputs), (a.outputs, b.outputs)):
        assert [(v.name, typed(tuple(v.shape)), v.dtype) for v in x] == \
               [(v.name, typed(tuple(v.shape)), v.dtype) for v in y]
    assert len(a.nodes) == len(b.nodes)
    for m, n in zip(a.nodes, b.nodes):
        assert (n.op, n.name, n.inputs, n.outputs) == (m.op, m.name, m.inputs, m.outputs)
        assert {k: typed(v) for k, v in n.attrs.items()} == \
               {k: typed(list(v) if isinstance(v, tuple) else v) for k, v in m.attrs.items()}
    assert list(b.initializers) == list(a.initializers)
    for k, arr in a.initializers.items():
        got = b.initializers[k]
        assert got.shape == arr.shape and got.dtype.newbyteorder("=") == arr.dtype.newbyteorder("=")
        assert got.astype(got.dtype.newbyteorder("<")).tobytes() == \
               arr.astype(arr.dtype.newbyteorder("<")).tobytes(), k


def mapped(arr: np.ndarray) -> bool:
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("small") / "small.qnb"
    qnb.save(handmade(), path)
    return path.read_bytes()


# ------------------------------------------------------------------ helpers that follow the doc

def u64(buf, at):
    return struct.unpack_from("<Q", buf, at)[0]


def refresh_crc(buf: bytearray) -> bytearray:
    """Recompute header_crc exactly as docs/qnb-format.md specifies."""
    data_off = u64(buf, 64)
    zeroed = bytes(buf[:80]) + b"\0" * 8 + bytes(buf[88:data_off])
    struct.pack_into("<I", buf, 80, zlib.crc32(zeroed))
    return buf


def table_entry(buf, name: str) -> dict:
    """Byte positions of one tensor-table entry's fields."""
    start, size = u64(buf, 48), u64(buf, 56)
    key = struct.pack("<I", len(name.encode())) + name.encode()
    at = bytes(buf[start:start + size]).index(key) + start + len(key)
    rank = struct.unpack_from("<I", buf, at + 2)[0]
    return {"dtype": at, "encoding": at + 1, "rank": at + 2, "shape": at + 6,
            "offset": at + 6 + 8 * rank, "length": at + 14 + 8 * rank}


def patched(small: bytes, old: bytes, new: bytes, last=False) -> bytearray:
    """Replace one occurrence of `old` before the data section, keep the CRC valid."""
    buf = bytearray(small)
    at = bytes(buf[:u64(buf, 64)]).rfind(old) if last else bytes(buf).index(old)
    assert at >= 0 and len(old) == len(new)
    buf[at:at + len(old)] = new
    return refresh_crc(buf)


def fails(buf, tmp_path, *words: str, verify=True) -> str:
    path = tmp_path / "bad.qnb"
    path.write_bytes(bytes(buf))
    with pytest.raises(FormatError) as exc:
        qnb.load(path, verify=verify)
    msg = str(exc.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------ round trips

def test_handmade_round_trip(tmp_path):
    g = handmade()
    path = tmp_path / "g.qnb"
    n = qnb.save(g, path)
    assert n == path.stat().st_size
    back = qnb.load(path)
    assert_same_graph(g, back)
    assert typed(back.nodes[0].attrs["group"]) == ("int", 1)
    assert typed(back.nodes[0].attrs["kernel_shape"]) == ("list", [("int", 3), ("int", 3)])
    assert typed(back.nodes[0].attrs["scales"]) == ("list", [("float", 1.0), ("float", 2.5)])
    assert typed(back.nodes[0].attrs["flag"]) == ("bool", True)
    assert back.nodes[0].attrs["empty"] == [] and back.metadata["empty"] == []
    assert back.nodes[1].inputs == ["c", "", "idx"]
    assert back.nodes[2].name == ""
    assert back.inputs[0].shape == ("N", 3, "H", "W")
    assert back.outputs[1].dtype == "int64"
    assert back.initializers["scalar"].shape == () and back.initializers["scalar"] == 2.5
    assert back.initializers["nothing"].shape == (0, 3)
    assert np.array_equal(back.initializers["be"], np.arange(5))


@pytest.mark.parametrize("input_size", [32, None])
def test_quicknet_round_trip(tmp_path, input_size):
    g = quicknet.build(width=0.25, input_size=input_size)
    path = tmp_path / "q.qnb"
    qnb.save(g, path)
    back = qnb.load(path)
    assert_same_graph(g, back)
    back.validate()
    assert back.metadata == g.metadata
    assert back.metadata["model.width"] == 0.25 and back.metadata["labels"][3] == "3"
    if input_size is None:
        assert back.inputs[0].shape == ("N", 3, "H", "W")


def test_full_quicknet_round_trip(tmp_path):
    g = quicknet.build()
    path = tmp_path / "q.qnb"
    assert qnb.save(g, path) == path.stat().st_size
    assert_same_graph(g, qnb.load(path))


def test_initializers_are_aligned_read_only_views_of_the_mapping(tmp_path):
    path = tmp_path / "q.qnb"
    qnb.save(quicknet.build(width=0.25), path)
    g = qnb.load(path)
    head = qnb.read_header(path)
    data_off = head["sections"]["data"]["offset"]
    assert data_off % 64 == 0
    for t in head["tensors"]:
        assert (data_off + t["offset"]) % 64 == 0
    for name, arr in g.initializers.items():
        assert not arr.flags.owndata and not arr.flags.writeable, name
        assert mapped(arr), name
        assert arr.ctypes.data % 64 == 0, name
        with pytest.raises(ValueError):
            arr.flat[0] = 1


def test_loads_from_bytes(small):
    g = qnb.loads(small)
    assert_same_graph(handmade(), g)
    assert all(not a.flags.writeable for a in g.initializers.values())


def test_saving_is_deterministic(tmp_path, small):
    path = tmp_path / "again.qnb"
    qnb.save(qnb.loads(small), path)
    assert path.read_bytes() == small


def test_layout_matches_the_document(small):
    magic, version, flags, hsize = struct.unpack_from("<4sIII", small)
    assert (magic, version, flags, hsize) == (b"QNB\0", 1, 0, 128)
    meta, meta_n, graph, graph_n, table, table_n, data, data_n = struct.unpack_from("<8Q", small, 16)
    assert meta == 128 and graph == meta + meta_n and table == graph + graph_n
    assert data == -(-(table + table_n) // 64) * 64 and data + data_n == len(small)
    assert small[table + table_n:data] == b"\0" * (data - table - table_n)
    assert small[88:128] == b"\0" * 40
    header_crc, data_crc = struct.unpack_from("<II", small, 80)
    assert refresh_crc(bytearray(small)) == small
    assert data_crc == zlib.crc32(small[data:])
    # the metadata block begins with the first entry: "model.name" -> string "hand-made"
    count, klen = struct.unpack_from("<II", small, meta)
    assert count == len(METADATA) and small[meta + 8:meta + 8 + klen] == b"model.name"
    assert small[meta + 8 + klen] == 3  # string tag
    e = table_entry(small, "w")
    assert small[e["dtype"]] == 1 and small[e["encoding"]] == 0
    assert struct.unpack_from("<I4QQQ", small, e["rank"]) == (4, 2, 3, 2, 2, 0, 96)


def test_info_reads_only_the_header(tmp_path, small):
    path = tmp_path / "s.qnb"
    buf = bytearray(small)
    buf[-1] ^= 0xFF  # corrupt data: info does not look at it, load does
    path.write_bytes(bytes(buf))
    head = qnb.info(path)
    assert head["version"] == 1 and head["file_size"] == len(small)
    assert head["name"] == "hand-made ✓" and head["metadata"] == METADATA
    assert head["tensor_count"] == 9 and head["nodes"] == 3
    assert head["ops"] == {"Conv": 1, "Resize": 1, "Custom": 1}
    assert head["inputs"] == [{"name": "x", "shape": ("N", 3, "H", "W"), "dtype": "float32"}]
    w = next(t for t in head["tensors"] if t["name"] == "w")
    assert w == {"name": "w", "dtype": "float32", "encoding": "raw", "shape": (2, 3, 2, 2),
                 "offset": 0, "nbytes": 96}
    assert head["parameters"] == sum(a.size for a in handmade().initializers.values())
    assert set(head["sections"]) == {"metadata", "graph", "tensor_table", "data"}
    fails(buf, tmp_path, "checksum mismatch in data section")
    assert qnb.load(path, verify=False).name == "hand-made ✓"


def test_graph_without_initializers(tmp_path):
    g = Graph([Node("Relu", ["x"], ["y"])], [ValueInfo("x", (1, 2))], [ValueInfo("y", (1, 2))])
    path = tmp_path / "relu.qnb"
    n = qnb.save(g, path)
    assert qnb.read_header(path)["sections"]["data"] == {"offset": n, "size": 0}
    assert_same_graph(g, qnb.load(path))


# ------------------------------------------------------------------ atomic writes

def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(f, tensors):
        f.write(b"\1" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(qnb, "_write_data", broken)
    with pytest.raises(OSError, match="disk full"):
        qnb.save(handmade(), tmp_path / "m.qnb")
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.qnb"
    path.write_bytes(b"old contents")

    def no_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", no_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        qnb.save(handmade(), path)
    assert os.listdir(tmp_path) == ["m.qnb"] and path.read_bytes() == b"old contents"


def test_save_replaces_an_existing_file(tmp_path, small):
    path = tmp_path / "m.qnb"
    path.write_bytes(b"x" * 100_000)
    os.chmod(path, 0o640)
    qnb.save(handmade(), path)
    assert path.read_bytes() == small
    assert os.listdir(tmp_path) == ["m.qnb"]
    assert path.stat().st_mode & 0o777 == 0o640


def test_saving_over_a_mapped_file_keeps_the_old_arrays_valid(tmp_path):
    path = tmp_path / "m.qnb"
    qnb.save(handmade(), path)
    old = qnb.load(path)
    g = handmade()
    g.initializers["w"] = g.initializers["w"] * 2
    qnb.save(g, path)
    assert np.array_equal(old.initializers["w"], handmade().initializers["w"])
    assert np.array_equal(qnb.load(path).initializers["w"], g.initializers["w"])


@pytest.mark.parametrize("bad, exc, words", [
    (lambda g: g.metadata.update(x={"a": 1}), TypeError, "metadata 'x'"),
    (lambda g: g.metadata.update(x=[1, 2.5]), TypeError, "one of bool/int/float/str"),
    (lambda g: g.metadata.update(x=2**64), ValueError, "int64"),
    (lambda g: g.nodes[0].attrs.update(t=np.zeros(3)), TypeError, "attribute 't'"),
    (lambda g: g.nodes[0].attrs.update(t=None), TypeError, "NoneType"),
    (lambda g: g.inputs.__setitem__(0, ValueInfo("x", (None, 3))), TypeError, "dimension"),
    (lambda g: g.initializers.update(c=np.zeros(2, complex)), TypeError, "complex"),
    (lambda g: g.nodes[1].inputs.__setitem__(0, "ghost"), FormatError, "undefined tensor"),
])
def test_unencodable_graph_writes_nothing(tmp_path, bad, exc, words):
    g = handmade()
    bad(g)
    with pytest.raises(exc, match=words):
        qnb.save(g, tmp_path / "m.qnb")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ malformed files

def test_wrong_magic(tmp_path, small):
    fails(b"GGUF" + small[4:], tmp_path, "not a .qnb file", "bad magic")
    fails(b"PK\3\4", tmp_path, "not a .qnb file")


def test_empty_file_directory_and_missing_path(tmp_path):
    fails(b"", tmp_path, "empty file")
    with pytest.raises(FormatError, match="directory"):
        qnb.load(tmp_path)
    with pytest.raises(FormatError, match="directory"):
        qnb.read_header(tmp_path)
    with pytest.raises(FileNotFoundError):  # documented: missing path is an OSError
        qnb.load(tmp_path / "missing.qnb")
    with pytest.raises(FormatError, match="empty"):
        qnb.loads(b"")


def test_every_truncation_is_reported(tmp_path, small):
    for n in range(1, len(small)):
        with pytest.raises(FormatError, match="truncated") as exc:
            qnb.loads(small[:n])
        assert "truncated" in str(exc.value), n
    fails(small[:200], tmp_path, "truncated file", "beyond the end of the file")


def test_trailing_bytes(tmp_path, small):
    fails(small + b"\0", tmp_path, "1 unexpected trailing bytes")


def test_flipped_data_byte_fails_the_checksum(tmp_path, small):
    data = u64(small, 64)
    for at in range(data, len(small)):
        buf = bytearray(small)
        buf[at] ^= 0x01
        with pytest.raises(FormatError, match="checksum mismatch in data section"):
            qnb.loads(bytes(buf))
    buf = bytearray(small)
    buf[-1] ^= 0x01
    fails(buf, tmp_path, "checksum mismatch in data section", "corrupt")
    assert qnb.load(tmp_path / "bad.qnb", verify=False).initializers["be"][-1] != 4


def test_flipped_byte_before_the_data_is_always_caught(tmp_path, small):
    for at in range(u64(small, 64)):
        buf = bytearray(small)
        buf[at] ^= 0xFF
        with pytest.raises(FormatError):
            qnb.loads(bytes(buf))
    graph_at = u64(small, 32) + 10
    buf = bytearray(small)
    buf[graph_at] ^= 0x20
    fails(buf, tmp_path, "checksum mismatch in header/metadata/graph/tensor table")


def test_unsupported_version_and_flags(tmp_path, small):
    buf = bytearray(small)
    struct.pack_into("<I", buf, 4, 99)
    fails(buf, tmp_path, "unsupported .qnb version 99", "supports version 1")
    buf = bytearray(small)
    struct.pack_into("<I", buf, 8, 4)
    fails(buf, tmp_path, "unknown flags")


def test_sections_out_of_place(tmp_path, small):
    buf = bytearray(small)
    struct.pack_into("<QQ", buf, 64, u64(buf, 64) + 1, u64(buf, 72) - 1)
    fails(buf, tmp_path, "data section offset", "multiple of 64")
    buf = bytearray(small)
    struct.pack_into("<Q", buf, 24, u64(buf, 24) + 8)  # metadata runs into the graph block
    fails(buf, tmp_path, "overlaps")
    buf = bytearray(small)
    struct.pack_into("<Q", buf, 40, 2**64 - 1)
    fails(buf, tmp_path, "truncated file", "graph section")


def table_case(small, name, field, value, fmt="<Q"):
    buf = bytearray(small)
    struct.pack_into(fmt, buf, table_entry(buf, name)[field], value)
    return refresh_crc(buf)


def test_tensor_entries_are_checked(tmp_path, small):
    data_n = u64(small, 72)
    fails(table_case(small, "u", "offset", -(-data_n // 64) * 64), tmp_path, "tensor 'u'", "out of range")
    fails(table_case(small, "u", "offset", 2**64 - 64), tmp_path, "out of range")
    fails(table_case(small, "u", "offset", 32), tmp_path, "tensor 'u'", "not 64-byte aligned")
    fails(table_case(small, "u", "offset", 0), tmp_path, "overlap")
    fails(table_case(small, "u", "length", 8), tmp_path, "tensor 'u'", "length 8", "needs 7")
    fails(table_case(small, "u", "shape", 6), tmp_path, "needs 6")
    fails(table_case(small, "u", "encoding", 1, "<B"), tmp_path, "tensor 'u'", "encoding 1")
    fails(table_case(small, "u", "encoding", 1, "<B"), tmp_path, "encoding 1", verify=False)
    fails(table_case(small, "u", "dtype", 0, "<B"), tmp_path, "unknown dtype code 0")
    fails(table_case(small, "u", "dtype", 200, "<B"), tmp_path, "unknown dtype code 200")
    fails(table_case(small, "u", "rank", 1000, "<I"), tmp_path, "rank 1000")
    buf = table_case(small, "nothing", "shape", 2**63)  # (0, 3) -> (2**63, 3): 0 bytes
    struct.pack_into("<Q", buf, table_entry(buf, "nothing")["shape"] + 8, 0)
    fails(refresh_crc(buf), tmp_path, "tensor 'nothing'", "impossibly large shape")
    # info() reports, but does not refuse, an encoding it does not know
    path = tmp_path / "enc.qnb"
    path.write_bytes(bytes(table_case(small, "u", "encoding", 3, "<B")))
    assert {t["name"]: t["encoding"] for t in qnb.info(path)["tensors"]}["u"] == "unknown(3)"


def test_bad_values_in_blocks(tmp_path, small):
    # metadata "count" -> int64 3: change its type tag
    fails(patched(small, b"count\x01", b"count\x63"), tmp_path, "metadata block",
          "unknown type tag 99")
    fails(patched(small, b"yes\x00\x01", b"yes\x00\x02"), tmp_path, "bool byte")
    fails(patched(small, b"hand-made", b"hand-\xffade"), tmp_path, "not valid UTF-8")
    fails(patched(small, b"mid1", b"mid2", last=True), tmp_path,
          "references undefined tensor 'mid2'")
    fails(patched(small, b"ratio", b"count"), tmp_path, "duplicate metadata key 'count'")
    fails(patched(small, b"\x03\x00\x00\x00idx", b"\x03\x00\x00\x00i32", last=True),
          tmp_path, "duplicate tensor 'i32'")


def test_dimension_must_be_int_or_string(tmp_path, small):
    # the symbolic dimension "H" of input x is tag 3 + str; make the tag float64
    fails(patched(small, b"\x03\x01\x00\x00\x00H", b"\x02\x01\x00\x00\x00H"), tmp_path,
          "dimension 2 of input 'x'", "unknown type tag 2")


def test_format_error_is_a_value_error():
    assert issubclass(FormatError, ValueError)


# ------------------------------------------------------------------ fuzzing

def try_all(buf: bytes, path) -> None:
    """Every reader either succeeds or raises FormatError, nothing else."""
    try:
        qnb.loads(buf)
    except FormatError:
        pass
    path.write_bytes(buf)
    for call in (lambda: qnb.load(path, verify=False), lambda: qnb.load(path),
                 lambda: qnb.read_header(path)):
        try:
            call()
        except FormatError as exc:
            assert str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_flips_and_truncations(small, tmp_path_factory, data):
    buf = bytearray(small)
    limit = u64(small, 64)  # mostly hit the structured part; sometimes anywhere
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, data.draw(st.sampled_from([limit, len(buf)])) - 1))
        buf[at] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        refresh_crc(buf)  # get past the checksum into the parsers
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    try_all(bytes(buf), tmp_path_factory.getbasetemp() / "fuzz.qnb")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_garbage(tmp_path_factory, junk):
    try_all(junk, tmp_path_factory.getbasetemp() / "junk.qnb")
    try_all(qnb.MAGIC + junk, tmp_path_factory.getbasetemp() / "junk.qnb")


scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False), st.text())
values = st.one_of(scalars, *(st.lists(s, max_size=5) for s in
                              (st.booleans(), st.integers(-2**63, 2**63 - 1),
                               st.floats(allow_nan=False), st.text())))


@settings(max_examples=100, deadline=None)
@given(meta=st.dictionaries(st.text(), values, max_size=6),
       attrs=st.dictionaries(st.text(), values, max_size=6),
       dims=st.lists(st.one_of(st.integers(0, 2**40), st.text(max_size=3)), max_size=5))
def test_fuzz_values_round_trip_exactly(tmp_path_factory, meta, attrs, dims):
    g = Graph([Node("Op", ["x", ""], ["y"], attrs)], [ValueInfo("x", tuple(dims), "float16")],
              [ValueInfo("y", ())], {}, meta, name="g")
    path = tmp_path_factory.getbasetemp() / "values.qnb"
    qnb.save(g, path)
    back = qnb.load(path)
    assert_same_graph(g, back)


def test_a_writer_killed_mid_write_leaves_the_old_file_and_its_temp_is_cleaned(tmp_path):
    """SIGKILL between writing the temporary file and renaming it: the old file
    is intact, and the next write to that path removes the dead writer's temp."""
    import signal
    import subprocess
    import sys
    import time

    from qnrt.models import quicknet

    path = tmp_path / "model.qnb"
    graph = quicknet.build(width=0.25)
    qnb.save(graph, path)
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", """
import sys, time
from qnrt import format as qnb
from qnrt.models import quicknet
real = qnb._write_data
def stall(f, tensors):
    real(f, tensors[: len(tensors) // 2])
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
qnb._write_data = stall
qnb.save(quicknet.build(width=0.5), sys.argv[1])
""", str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    temps = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".model.qnb.")
    assert path.read_bytes() == before  # the old file, untouched
    qnb.load(str(path))
    time.sleep(0.01)
    qnb.save(graph, path)  # the next write to the path cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qnb"]
