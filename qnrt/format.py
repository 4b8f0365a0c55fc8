"""The .qnb file: a flat, versioned, memory-mappable graph + weights container.

A fixed header, three small typed blocks (metadata, graph, tensor table) and a
64-byte aligned data section that load() maps read-only, so initializers are
zero-copy views. The byte layout is specified in docs/qnb-format.md.
Imports only numpy and the standard library; qnrt.codec (Numba) is imported
only for files that hold compressed tensors.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
import zlib
from collections import Counter
from typing import Any

import numpy as np

from .graph import Graph, Node, TensorEncoding, ValueInfo

MAGIC = b"QNB\0"
VERSION = 1
HEADER_SIZE = 128   # the 88 bytes of fixed fields, zero padded
ALIGN = 64          # every tensor starts at a file offset that is a multiple of this
MAX_RANK = 32
# magic, version, flags, header_size, (offset, size) of the 4 sections, header crc, data crc
_FIXED = struct.Struct("<4sIII8QII")
_CRC_AT = 80        # the two u32 checksums occupy bytes [80, 88)
SECTIONS = ("metadata", "graph", "tensor_table", "data")

DTYPES = {1: "float32", 2: "float16", 3: "int8", 4: "uint8", 5: "int32", 6: "int64",
          7: "float64", 8: "int16", 9: "uint16", 10: "uint32", 11: "uint64", 12: "bool"}
_DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
ENCODINGS = {0: "raw", 1: "deep-compression"}  # other nonzero codes are reserved
RAW, DEEP_COMPRESSION = 0, 1

# Value type tags, shared by metadata, attributes and dimensions. tag & 3 is the
# element type; tags 4-7 are arrays of it.
BOOL, INT, FLOAT, STRING, BOOLS, INTS, FLOATS, STRINGS = range(8)
TAG_NAMES = ("bool", "int64", "float64", "string", "bool[]", "int64[]", "float64[]", "string[]")
_FMT = {BOOL: "B", INT: "q", FLOAT: "d"}


from .atomic import temp_beside  # noqa: E402
from .errors import FormatError  # noqa: E402  (defined with the others, re-exported here)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ------------------------------------------------------------------ encoded arrays

def attach_encoding(graph: Graph, name: str, encoding: int, payload: bytes) -> None:
    """Make save() store initializer `name` (float32) as `payload` in `encoding`
    instead of raw. The payload must decode to exactly the array; save() checks
    that before writing. The encoding travels with the graph (Graph.encodings)."""
    if encoding not in ENCODINGS or encoding == RAW:
        raise ValueError(f"encoding {encoding} is not a known compressed encoding")
    array = graph.initializers.get(name)
    if not isinstance(array, np.ndarray) or array.dtype.newbyteorder("=") != np.float32:
        raise TypeError(f"encoding {encoding} holds float32 initializers only; '{name}' is "
                        f"{type(array).__name__ if array is None else array.dtype}")
    graph.encodings[name] = TensorEncoding(encoding, bytes(payload))


def encoding_of(graph: Graph, name: str) -> tuple[int, bytes] | None:
    """(encoding, payload) that save() will use for initializer `name`, or None for raw."""
    entry = graph.encodings.get(name)
    return None if entry is None else (entry.code, entry.payload)


def detach_encoding(graph: Graph, name: str) -> None:
    """Store initializer `name` raw again."""
    graph.encodings.pop(name, None)


def _decode_tensor(t: dict, payload: bytes, out=None) -> np.ndarray:
    """The array an encoded tensor-table entry stores (decoded into `out`, a
    zeroed float32 vector of its size, if given); FormatError if malformed."""
    from . import codec  # numba: imported only when a file holds encoded tensors

    try:
        return codec.decode(payload, t["shape"], out)
    except codec.CodecError as exc:
        raise FormatError(f"tensor '{t['name']}': {exc}") from None


# ------------------------------------------------------------------ writing

def _scalar_tag(x: Any) -> int | None:
    if isinstance(x, (bool, np.bool_)):
        return BOOL
    if isinstance(x, (int, np.integer)):
        return INT
    if isinstance(x, (float, np.floating)):
        return FLOAT
    return STRING if isinstance(x, str) else None


def _tag_of(v: Any, where: str) -> int:
    tag = _scalar_tag(v)
    if tag is not None:
        return tag
    if isinstance(v, (list, tuple)):
        if not v:
            return INTS  # the rule: every empty list is stored as an empty int64[]
        tags = {_scalar_tag(x) for x in v}
        if len(tags) == 1 and None not in tags:
            return tags.pop() + 4
        kinds = sorted({type(x).__name__ for x in v})
        raise TypeError(f"{where}: a list must hold only one of bool/int/float/str, got {kinds}")
    raise TypeError(f"{where}: cannot store a {type(v).__name__}; allowed are bool, int, "
                    "float, str and lists of one of those")


class _Writer:
    def __init__(self):
        self.parts: list[bytes] = []

    def pack(self, fmt: str, *values) -> None:
        self.parts.append(struct.pack("<" + fmt, *values))

    def str(self, s: str) -> None:
        b = s.encode("utf-8")
        self.pack("I", len(b))
        self.parts.append(b)

    def strs(self, items) -> None:
        self.pack("I", len(items))
        for s in items:
            self.str(s)

    def value(self, v: Any, where: str) -> None:
        tag = _tag_of(v, where)
        self.pack("B", tag)
        items = v if tag >= BOOLS else [v]
        if tag >= BOOLS:
            self.pack("I", len(items))
        for x in items:
            if tag & 3 == STRING:
                self.str(x)
            elif tag & 3 == INT and not -2**63 <= int(x) < 2**63:
                raise ValueError(f"{where}: integer {x} does not fit in int64")
            else:
                self.pack(_FMT[tag & 3], (bool, int, float)[tag & 3](x))

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _dtype_code(dtype: Any, where: str) -> int:
    try:
        return _DTYPE_CODES[np.dtype(dtype).newbyteorder("=")]
    except (KeyError, TypeError):
        raise TypeError(f"{where}: dtype {dtype} cannot be stored; supported: "
                        f"{', '.join(DTYPES.values())}") from None


def _encode_graph(g: Graph) -> bytes:
    w = _Writer()
    w.str(g.name)
    for kind, infos in (("input", g.inputs), ("output", g.outputs)):
        w.pack("I", len(infos))
        for vi in infos:
            where = f"graph {kind} '{vi.name}'"
            w.str(vi.name)
            w.pack("BI", _dtype_code(vi.dtype, where), len(vi.shape))
            for d in vi.shape:
                if _scalar_tag(d) not in (INT, STRING):
                    raise TypeError(f"{where}: dimension {d!r} is neither an int nor a str")
                w.value(d, where)
    w.pack("I", len(g.nodes))
    for node in g.nodes:
        w.str(node.op)
        w.str(node.name)
        w.strs(node.inputs)
        w.strs(node.outputs)
        w.pack("I", len(node.attrs))
        for key, v in node.attrs.items():
            w.str(key)
            w.value(v, f"{node.where()} attribute '{key}'")
    return w.bytes()


# ------------------------------------------------------------------ reading

class _Reader:
    """Bounds-checked cursor over one section; every overrun is a FormatError."""

    def __init__(self, buf, h: dict, section: str):
        s = h["sections"][section]
        self.buf, self.pos, self.end = buf, s["offset"], s["offset"] + s["size"]
        self.section = section.replace("_", " ")

    def fail(self, msg: str, at: int | None = None):
        raise FormatError(f"{self.section} block, byte {self.pos if at is None else at}: {msg}")

    def take(self, fmt: str, what: str) -> tuple:
        st = struct.Struct("<" + fmt)
        if st.size > self.end - self.pos:
            self.fail(f"truncated {what}: needs {st.size} bytes, the block ends at byte "
                      f"{self.end}")
        self.pos += st.size
        return st.unpack_from(self.buf, self.pos - st.size)

    def one(self, fmt: str, what: str):
        return self.take(fmt, what)[0]

    def str(self, what: str) -> str:
        raw = self.one(f"{self.one('I', f'length of {what}')}s", what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8", self.pos - len(raw))

    def strs(self, what: str) -> list[str]:
        return [self.str(f"{what} #{i}") for i in range(self.one("I", f"count of {what}"))]

    def value(self, what: str, allowed=range(8)) -> Any:
        tag = self.one("B", f"type tag of {what}")
        if tag not in allowed:
            known = ", ".join(f"{t}={TAG_NAMES[t]}" for t in allowed)
            self.fail(f"{what} has unknown type tag {tag} (expected {known})", self.pos - 1)
        n = self.one("I", f"length of {what}") if tag >= BOOLS else 1
        if tag & 3 == STRING:
            items = [self.str(what) for _ in range(n)]
        else:
            items = list(self.take(f"{n}{_FMT[tag & 3]}", what))
            if tag & 3 == BOOL:
                if any(x > 1 for x in items):
                    self.fail(f"{what}: a bool byte must be 0 or 1")
                items = [bool(x) for x in items]
        return items if tag >= BOOLS else items[0]

    def dtype(self, what: str) -> str:
        code = self.one("B", f"dtype of {what}")
        if code not in DTYPES:
            self.fail(f"{what} has unknown dtype code {code}", self.pos - 1)
        return DTYPES[code]

    def done(self) -> None:
        if self.pos != self.end:
            self.fail(f"{self.end - self.pos} unexpected bytes before the block end")


_IMAGE = "; the model comes first: qnrt run MODEL.qnb IMAGE..."
_OTHER_FILES = ((b"\x89PNG", "an image (PNG)" + _IMAGE), (b"\xff\xd8\xff", "an image (JPEG)" + _IMAGE),
                (b"GIF8", "an image (GIF)" + _IMAGE), (b"BM", "an image (BMP)" + _IMAGE),
                (b"\x89HDF", "a Keras/HDF5 model: convert it with `qnrt convert IN.h5 OUT.qnb`"),
                (b"PK\x03\x04", "a zip archive (a PyTorch .pt?): convert it with "
                                 "`qnrt convert IN.pt OUT.qnb`"))


def _what_it_is(head: bytes) -> str:
    """', which looks like ...' for files people give by mistake, else ''."""
    for magic, what in _OTHER_FILES:
        if head.startswith(magic):
            return f", it looks like {what}"
    if head[:1] == b"\x08" and len(head) > 1 and head[1] < 0x20:  # ONNX: field 1, ir_version
        return ", it looks like an ONNX model: convert it with `qnrt convert IN.onnx OUT.qnb`"
    return ""


def _fixed(head, size: int) -> dict:
    """Check the fixed header of a `size`-byte file; `head` holds its first bytes."""
    head = bytes(head[:_FIXED.size])
    if size == 0:
        raise FormatError("empty file (0 bytes): not a .qnb file")
    if head[:4] != MAGIC[:len(head[:4])]:
        raise FormatError(f"not a .qnb file{_what_it_is(head)}: bad magic {head[:4]!r}, "
                          f"expected {MAGIC!r}")
    if size < _FIXED.size:
        raise FormatError(f"truncated file: {size} bytes is shorter than the "
                          f"{_FIXED.size}-byte fixed header")
    _, version, flags, hsize, *rest = _FIXED.unpack(head)
    if version != VERSION:
        raise FormatError(f"unsupported .qnb version {version} (this reader supports "
                          f"version {VERSION})")
    if flags:
        raise FormatError(f"unknown flags 0x{flags:08x} (version {VERSION} defines none)")
    if hsize < _FIXED.size:
        raise FormatError(f"header_size {hsize} is smaller than the {_FIXED.size} fixed bytes")
    if hsize > size:
        raise FormatError(f"truncated file: the {hsize}-byte header extends beyond the end "
                          f"of the file ({size} bytes)")
    secs = {name: (rest[2 * i], rest[2 * i + 1]) for i, name in enumerate(SECTIONS)}
    for name, (off, n) in secs.items():
        if off + n > size:
            raise FormatError(f"truncated file: {name} section [{off}, {off + n}) extends "
                              f"beyond the end of the file ({size} bytes)")
    data_off, data_n = secs["data"]
    if data_off % ALIGN or data_off < hsize:
        raise FormatError(f"data section offset {data_off} is not a multiple of {ALIGN} "
                          f"at or after the header end {hsize}")
    if data_off + data_n != size:
        raise FormatError(f"{size - data_off - data_n} unexpected trailing bytes after the "
                          f"data section (which ends at byte {data_off + data_n})")
    prev_end, prev = hsize, "header"
    for name, (off, n) in sorted(list(secs.items())[:3], key=lambda kv: kv[1]):
        if off < prev_end or off + n > data_off:
            raise FormatError(f"{name} section [{off}, {off + n}) overlaps the {prev} or "
                              f"the data section (which starts at byte {data_off})")
        prev_end, prev = off + n, f"{name} section"
    return {"version": version, "flags": flags, "header_size": hsize, "file_size": size,
            "header_crc": rest[8], "data_crc": rest[9],
            "sections": {k: {"offset": o, "size": n} for k, (o, n) in secs.items()}}


def _header_crc(buf, data_off: int) -> int:
    crc = zlib.crc32(b"\0" * 8, zlib.crc32(bytes(buf[:_CRC_AT])))
    return zlib.crc32(bytes(buf[_CRC_AT + 8:data_off]), crc)


def _check_header_crc(buf, h: dict) -> None:
    end = h["sections"]["data"]["offset"]
    got = _header_crc(buf, end)
    if got != h["header_crc"]:
        raise FormatError(f"checksum mismatch in header/metadata/graph/tensor table (bytes "
                          f"0-{end}): stored 0x{h['header_crc']:08x}, computed 0x{got:08x}; "
                          "the file is corrupt")


def _parse_blocks(buf, h: dict) -> tuple:
    r = _Reader(buf, h, "metadata")
    meta: dict[str, Any] = {}
    for i in range(r.one("I", "metadata count")):
        key = r.str(f"metadata key #{i}")
        if key in meta:
            r.fail(f"duplicate metadata key '{key}'")
        meta[key] = r.value(f"metadata '{key}'")
    r.done()

    r = _Reader(buf, h, "graph")
    name, infos, nodes = r.str("graph name"), {}, []
    for kind in ("input", "output"):
        infos[kind] = []
        for i in range(r.one("I", f"{kind} count")):
            vname = r.str(f"{kind} #{i} name")
            dtype = r.dtype(f"{kind} '{vname}'")
            shape = tuple(r.value(f"dimension {k} of {kind} '{vname}'", (INT, STRING))
                          for k in range(r.one("I", f"rank of {kind} '{vname}'")))
            infos[kind].append(ValueInfo(vname, shape, dtype))
    for i in range(r.one("I", "node count")):
        op, nname = r.str(f"op of node #{i}"), r.str(f"name of node #{i}")
        where = f"node #{i} '{nname}' ({op})"
        node = Node(op, r.strs(f"input of {where}"), r.strs(f"output of {where}"), {}, nname)
        for k in range(r.one("I", f"attribute count of {where}")):
            key = r.str(f"attribute #{k} name of {where}")
            if key in node.attrs:
                r.fail(f"{where} has duplicate attribute '{key}'")
            node.attrs[key] = r.value(f"attribute '{key}' of {where}")
        nodes.append(node)
    r.done()

    r = _Reader(buf, h, "tensor_table")
    table, data_n = {}, h["sections"]["data"]["size"]
    for i in range(r.one("I", "tensor count")):
        at = r.pos
        tname = r.str(f"tensor #{i} name")
        where = f"tensor '{tname}' (entry at byte {at})"
        if tname in table:
            r.fail(f"duplicate {where}")
        dtype, enc, rank = r.dtype(where), *r.take("BI", f"encoding/rank of {where}")
        if rank > MAX_RANK:
            r.fail(f"{where} has rank {rank}, more than {MAX_RANK}")
        shape = r.take(f"{rank}Q", f"shape of {where}")
        off, nbytes = r.take("QQ", f"offset/length of {where}")
        if off % ALIGN:
            r.fail(f"{where} offset {off} is not {ALIGN}-byte aligned")
        if off + nbytes > data_n:
            r.fail(f"{where} [{off}, {off + nbytes}) is out of range of the "
                   f"{data_n}-byte data section")
        itemsize = np.dtype(dtype).itemsize
        if itemsize * int(np.prod([max(d, 1) for d in shape], dtype=object)) > 2**62:
            r.fail(f"{where} has an impossibly large shape {tuple(shape)}")
        expect = itemsize * int(np.prod(shape, dtype=object))
        if enc == RAW and nbytes != expect:
            r.fail(f"{where} has length {nbytes}, but {dtype} {tuple(shape)} needs {expect}")
        table[tname] = {"name": tname, "dtype": dtype, "encoding": enc,
                        "shape": tuple(shape), "offset": off, "nbytes": nbytes}
    r.done()
    spans = sorted((t["offset"], t["offset"] + t["nbytes"], t["name"])
                   for t in table.values() if t["nbytes"])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise FormatError(f"tensor table: tensors '{a}' and '{b}' overlap in the data "
                              "section")
    return name, meta, infos["input"], infos["output"], nodes, table


def _check_wiring(inputs, outputs, nodes, tensors) -> None:
    defined = set(tensors) | {v.name for v in inputs} | {o for n in nodes for o in n.outputs}
    for i, n in enumerate(nodes):
        for k, name in enumerate(n.inputs):
            if name and name not in defined:
                raise FormatError(f"node #{i} '{n.name}' ({n.op}) input {k} references "
                                  f"undefined tensor '{name}'")
    for v in outputs:
        if v.name not in defined:
            raise FormatError(f"graph output '{v.name}' references an undefined tensor")


DECODED_MAX_BYTES = 1 << 30  # compressed tensors may decode to this much, by default


def _decode(buf, verify: bool, max_decoded_bytes: int = DECODED_MAX_BYTES) -> Graph:
    h = _fixed(buf, len(buf))
    if verify:
        _check_header_crc(buf, h)
    name, meta, inputs, outputs, nodes, table = _parse_blocks(buf, h)
    data_off, data_n = h["sections"]["data"]["offset"], h["sections"]["data"]["size"]
    if verify:
        with memoryview(buf) as mv, mv[data_off:data_off + data_n] as data:
            got = zlib.crc32(data)
        if got != h["data_crc"]:
            raise FormatError(f"checksum mismatch in data section (bytes {data_off}-"
                              f"{data_off + data_n}): stored 0x{h['data_crc']:08x}, computed "
                              f"0x{got:08x}; the file is corrupt")
    for t in table.values():
        if t["encoding"] not in ENCODINGS:
            raise FormatError(f"tensor '{t['name']}' has encoding {t['encoding']}, which this "
                              f"reader does not support (known: {ENCODINGS})")
        if t["encoding"] == DEEP_COMPRESSION and t["dtype"] != "float32":
            raise FormatError(f"tensor '{t['name']}' has encoding {t['encoding']} "
                              f"({ENCODINGS[t['encoding']]}), which holds float32 only, "
                              f"not {t['dtype']}")
    _check_wiring(inputs, outputs, nodes, table)
    decoded = {}
    encoded = [t for t in table.values() if t["encoding"] != RAW]
    sizes = [int(np.prod(t["shape"], dtype=object)) for t in encoded]
    if 4 * sum(sizes) > max_decoded_bytes:  # believed only within the limit: checked first
        raise FormatError(f"the {len(encoded)} compressed tensors declare {4 * sum(sizes):,} "
                          f"bytes decoded, more than the limit of {max_decoded_bytes:,} "
                          "(qnrt.Limits.max_decoded_bytes)")
    try:  # all decoded tensors in one buffer: one allocation, no fragmentation
        block = np.zeros(sum(sizes), np.float32) if encoded else None
    except (MemoryError, ValueError):
        raise FormatError(f"the {len(encoded)} compressed tensors decode to {sum(sizes):,} "
                          "floats, more than this machine can allocate") from None
    at = 0
    for t, n in zip(encoded, sizes):  # copies of the payloads: no view of buf survives an error
        start = data_off + t["offset"]
        payload = bytes(buf[start:start + t["nbytes"]])
        decoded[t["name"]] = (_decode_tensor(t, payload, block[at:at + n]), t["encoding"],
                              payload)
        at += n
    inits, encodings = {}, {}
    for t in table.values():  # views made only after every check passed (see load)
        if t["name"] in decoded:
            arr, enc, payload = decoded[t["name"]]
            arr.flags.writeable = False  # like the mapped raw tensors
            encodings[t["name"]] = TensorEncoding(enc, payload)
            inits[t["name"]] = arr
            continue
        dt = np.dtype(t["dtype"]).newbyteorder("<")
        inits[t["name"]] = np.frombuffer(buf, dt, t["nbytes"] // dt.itemsize,
                                         data_off + t["offset"]).reshape(t["shape"])
    return Graph(nodes, inputs, outputs, inits, meta, name, encodings)


# ------------------------------------------------------------------ public API

def loads(buffer, verify: bool = True, max_decoded_bytes: int = DECODED_MAX_BYTES) -> Graph:
    """Decode a whole .qnb file held in memory; initializers are views into `buffer`."""
    return _decode(buffer, verify, max_decoded_bytes)


def load(path, verify: bool = True, max_decoded_bytes: int = DECODED_MAX_BYTES) -> Graph:
    """Memory-map `path` read-only; initializers are zero-copy read-only views into it.
    A missing file raises FileNotFoundError; anything malformed raises FormatError,
    and so do compressed tensors declaring more than `max_decoded_bytes` decoded."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory, not a .qnb file")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise FormatError(f"{path}: empty file (0 bytes): not a .qnb file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _decode(mm, verify, max_decoded_bytes)
    except FormatError as exc:
        mm.close()  # safe: no array views the mapping before every check has passed
        raise FormatError(f"{path}: {exc}") from None


def read_header(path) -> dict:
    """Header fields, sections, metadata, graph summary and tensor table, without reading
    the data section (the header checksum is checked, the data checksum is not)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory, not a .qnb file")
    with open(path, "rb") as f:
        try:
            h = _fixed(f.read(_FIXED.size), os.fstat(f.fileno()).st_size)
            f.seek(0)
            prefix = f.read(h["sections"]["data"]["offset"])
            _check_header_crc(prefix, h)
            name, meta, inputs, outputs, nodes, table = _parse_blocks(prefix, h)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
    tensors = [{**t, "encoding": ENCODINGS.get(t["encoding"], f"unknown({t['encoding']})")}
               for t in table.values()]
    return {**h, "path": path, "name": name, "metadata": meta,
            "inputs": [vars(v).copy() for v in inputs],
            "outputs": [vars(v).copy() for v in outputs],
            "nodes": len(nodes), "ops": dict(Counter(n.op for n in nodes)),
            "tensor_count": len(tensors), "tensor_bytes": sum(t["nbytes"] for t in tensors),
            "parameters": sum(int(np.prod(t["shape"], dtype=object)) for t in tensors),
            "tensors": tensors}


info = read_header


def _write_data(f, tensors) -> None:
    pos = 0
    for off, flat in tensors:
        f.write(b"\0" * (off - pos))
        f.write(memoryview(flat))
        pos = off + flat.nbytes


def _stored(graph: Graph, name: str, a) -> tuple[int, np.ndarray | None]:
    """(encoding, payload bytes) for an initializer with an encoding on the graph,
    after checking that its payload still decodes to exactly `a`; else (RAW, None)."""
    entry = encoding_of(graph, name)
    if entry is None:
        return RAW, None
    enc, payload = entry
    shape = tuple(a.shape)
    try:
        back = _decode_tensor({"name": name, "shape": shape}, payload)
    except FormatError as exc:
        raise ValueError(f"initializer '{name}': its {ENCODINGS[enc]} payload is invalid: "
                         f"{exc}") from None
    mine = np.ascontiguousarray(a, np.float32)
    if not np.array_equal(back.view(np.uint32), mine.view(np.uint32)):
        raise ValueError(f"initializer '{name}' no longer matches its {ENCODINGS[enc]} "
                         "encoding (modified after compression?): compress it again, or "
                         "call qnrt.format.detach_encoding(graph, name) to store it raw")
    return enc, np.frombuffer(payload, np.uint8)


def save(graph: Graph, path) -> int:
    """Write `graph` to `path` atomically; returns the number of bytes written."""
    path = os.fspath(path)
    w = _Writer()
    w.pack("I", len(graph.metadata))
    for key, v in graph.metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r} is not a str")
        w.str(key)
        w.value(v, f"metadata '{key}'")
    meta, gblock = w.bytes(), _encode_graph(graph)
    _check_wiring(graph.inputs, graph.outputs, graph.nodes, graph.initializers)

    w, tensors, data_n, data_crc = _Writer(), [], 0, 0
    w.pack("I", len(graph.initializers))
    for name, a in graph.initializers.items():
        enc, flat = _stored(graph, name, a)
        a = np.asarray(a)
        code = _dtype_code(a.dtype, f"initializer '{name}'")
        if flat is None:
            flat = np.ascontiguousarray(a.reshape(-1), a.dtype.newbyteorder("<")).view(np.uint8)
        off = _align(data_n)
        w.str(name)
        w.pack(f"BBI{a.ndim}QQQ", code, enc, a.ndim, *a.shape, off, flat.nbytes)
        data_crc = zlib.crc32(flat, zlib.crc32(b"\0" * (off - data_n), data_crc))
        tensors.append((off, flat))
        data_n = off + flat.nbytes
    table = w.bytes()

    offs = [HEADER_SIZE, HEADER_SIZE + len(meta), HEADER_SIZE + len(meta) + len(gblock)]
    data_off = _align(offs[2] + len(table))
    prefix = bytearray(data_off)
    for off, block in zip(offs, (meta, gblock, table)):
        prefix[off:off + len(block)] = block
    _FIXED.pack_into(prefix, 0, MAGIC, VERSION, 0, HEADER_SIZE, offs[0], len(meta), offs[1],
                     len(gblock), offs[2], len(table), data_off, data_n, 0, data_crc)
    struct.pack_into("<I", prefix, _CRC_AT, _header_crc(prefix, data_off))

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = temp_beside(path)  # also removes what a killed writer left
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            _write_data(f, tensors)
            f.flush()
            os.fsync(f.fileno())
        try:  # mkstemp makes the file 0600; keep the old file's mode, else 0644
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return data_off + data_n
