"""Deep Compression (Han et al., arXiv 1510.00149) of a qnrt graph's weights.

Stages, as in the paper (pruning itself is done before, e.g. by training with
magnitude pruning; `prune_magnitude` is here for experiments):

1. pruning: zeros are not stored; the positions of the nonzero entries are
   coded as gaps (relative indices);
2. quantization: the nonzero weights of each tensor are clustered with 1-D
   k-means (linear initialisation between min and max, Lloyd iterations) into a
   codebook of 2^b float32 centroids; each weight becomes a b-bit index;
3. Huffman coding of the index stream and of the gap stream (canonical codes).

The result is the .qnb encoding 1 ("deep compression", docs/qnb-format.md),
decoded at load time by qnrt/codec.py. In memory a compressed tensor stays a
plain float32 array holding the dequantized weights (so accuracy can be
measured directly); qnrt.format.attach_encoding() puts its payload on the Graph, and
qnrt.format.save() writes that payload instead of the raw floats.

    python -m qnrt.exporters.compress SRC.qnb DST.qnb [--bits N] [--min-size N] [--prune F]

Imports only numpy (and qnrt.format / qnrt.graph).
"""
from __future__ import annotations

import argparse
import heapq
import os
import struct
import sys
from typing import Callable

import numpy as np

from qnrt import format as qnb
from qnrt.rewrite import optimize
from qnrt.graph import Graph, Node

MAX_CODE_LEN = 24           # as qnrt.codec.MAX_CODE_LEN
MAX_GAP_BITS = 16
HEADER = struct.Struct("<BBHIQQQ")  # as qnrt.codec.HEADER
DEFAULT_BITS = {"pointwise": 4, "fc": 5, "depthwise": 8, "conv": 8}
CSR_INDEX_BITS = 8          # relative index width of the paper's "after pruning" CSR
KMEANS_ITERATIONS = 100     # Lloyd iterations at most (each is O(2^b log n))
_CHUNK = 1 << 18


# ------------------------------------------------------------------ Huffman coding

def huffman_lengths(hist, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Code length (uint8, 0 = unused) per symbol for the symbol counts `hist`.

    Optimal Huffman lengths; if the longest exceeds `max_len`, the counts are
    halved (each kept >= 1) until it does not. A lone symbol gets length 1."""
    hist = np.asarray(hist, np.int64)
    lengths = np.zeros(hist.size, np.uint8)
    used = np.flatnonzero(hist > 0)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    counts = hist[used]
    while True:
        depth = _tree_depths(counts)
        if depth.max() <= max_len:
            lengths[used] = depth
            return lengths
        counts = (counts + 1) // 2


def _tree_depths(counts: np.ndarray) -> np.ndarray:
    n = counts.size
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, np.int64)
    node = n
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
        node += 1
    depth = np.zeros(2 * n - 1, np.int64)
    for i in range(2 * n - 3, -1, -1):  # parents are numbered after their children
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def canonical_codes(lengths) -> np.ndarray:
    """Canonical code (as an integer, MSB first) of every symbol with a nonzero length:
    codes are assigned in order of (length, symbol), as in RFC 1951 3.2.2."""
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(lengths.size), lengths)):
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = code
        code, prev = code + 1, n
    return codes


def pack_symbols(symbols, lengths, codes=None) -> tuple[bytes, int]:
    """Concatenate the codes of `symbols` MSB first; returns (bytes, number of bits).
    The last byte is padded with zero bits."""
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64)
    codes = canonical_codes(lengths) if codes is None else np.asarray(codes, np.int64)
    if symbols.size and lengths[symbols].min() == 0:
        raise ValueError("a symbol to encode has no code (length 0)")
    parts = []
    for lo in range(0, symbols.size, _CHUNK):
        s = symbols[lo:lo + _CHUNK]
        n, c = lengths[s], codes[s]
        owner = np.repeat(np.arange(s.size), n)
        k = np.arange(owner.size) - (np.cumsum(n) - n)[owner]  # bit number within its code
        parts.append(((c[owner] >> (n[owner] - 1 - k)) & 1).astype(np.uint8))
    bits = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return np.packbits(bits).tobytes(), int(bits.size)


def code_bits(hist, lengths) -> int:
    return int(np.dot(np.asarray(hist, np.int64), np.asarray(lengths, np.int64)))


# ------------------------------------------------------------------ relative positions

def gaps_of(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the nonzero entries, zeros skipped before each of them)."""
    pos = np.flatnonzero(flat)
    return pos, np.diff(pos, prepend=-1) - 1


def gap_hist(gaps: np.ndarray, g: int) -> np.ndarray:
    """Symbol counts of the gap stream with g-bit symbols: a gap d is written as
    d // E escapes (symbol E = 2^g - 1, "E more zeros, continue") and then d % E."""
    esc = (1 << g) - 1
    hist = np.bincount(gaps % esc, minlength=1 << g).astype(np.int64)
    hist[esc] += int((gaps // esc).sum())
    return hist


def gap_symbols(gaps: np.ndarray, g: int) -> np.ndarray:
    esc = (1 << g) - 1
    runs = gaps // esc + 1
    out = np.full(int(runs.sum()), esc, np.int64)
    out[np.cumsum(runs) - 1] = gaps % esc
    return out


def choose_gap_bits(gaps: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """g (1..16) that minimises the coded gap stream plus its 2^g-byte length table;
    returns (g, histogram, code lengths)."""
    best = None
    for g in range(1, MAX_GAP_BITS + 1):
        if best is not None and 8 * (1 << g) >= best[0]:
            break  # the table alone already costs more
        hist = gap_hist(gaps, g)
        lengths = huffman_lengths(hist)
        cost = code_bits(hist, lengths) + 8 * (1 << g)
        if best is None or cost < best[0]:
            best = (cost, g, hist, lengths)
    return best[1], best[2], best[3]


# ------------------------------------------------------------------ k-means

def kmeans_1d(values: np.ndarray, bits: int, iterations: int = KMEANS_ITERATIONS):
    """Cluster 1-D `values` into 2^bits centroids; returns (codebook float32 sorted,
    index of every value). Linear initialisation between min and max (the paper's
    best), then Lloyd iterations done on the sorted values with prefix sums, so
    one iteration costs O(2^bits log n). If there are at most 2^bits distinct
    values, they are the codebook (exact)."""
    values = np.asarray(values, np.float32).reshape(-1)
    k = 1 << bits
    if values.size == 0:
        return np.zeros(k, np.float32), np.zeros(0, np.int64)
    order = np.argsort(values, kind="stable")
    v = values[order]
    distinct = v[np.r_[True, v[1:] != v[:-1]]]
    if distinct.size <= k:
        codebook = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
        idx_sorted = np.searchsorted(distinct, v)
    else:
        v64 = v.astype(np.float64)
        prefix = np.concatenate([[0.0], np.cumsum(v64)])
        c = np.linspace(v64[0], v64[-1], k)
        for _ in range(iterations):
            edges = np.r_[0, np.searchsorted(v64, (c[1:] + c[:-1]) / 2), v64.size]
            counts = np.diff(edges)
            sums = prefix[edges[1:]] - prefix[edges[:-1]]
            new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
            if np.array_equal(new, c):
                break
            c = new
        codebook = c.astype(np.float32)
        edges = np.r_[0, np.searchsorted(v64, (c[1:] + c[:-1]) / 2), v64.size]
        idx_sorted = np.repeat(np.arange(k), np.diff(edges))
    idx = np.empty(values.size, np.int64)
    idx[order] = idx_sorted
    return codebook.astype(np.float32), idx


# ------------------------------------------------------------------ one tensor

def encode_tensor(array: np.ndarray, bits: int,
                  gap_bits: int | None = None) -> tuple[np.ndarray, bytes, dict]:
    """Quantize and encode one float32 tensor: (dequantized array, encoding-1 payload,
    statistics). Zeros are pruned positions: kept exactly zero, not stored. The gap
    symbol width is chosen to minimise the size unless `gap_bits` is given."""
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    bits = int(bits)
    a = np.asarray(array, np.float32)
    flat = a.reshape(-1)
    pos, gaps = gaps_of(flat)
    distinct = np.unique(flat[pos]).size
    if distinct < 1 << bits:  # every value fits a smaller codebook exactly
        bits = max(1, (distinct - 1).bit_length())
    codebook, idx = kmeans_1d(flat[pos], bits)
    deq = np.zeros(flat.size, np.float32)
    deq[pos] = codebook[idx]
    ihist = np.bincount(idx, minlength=1 << bits)
    ilens = huffman_lengths(ihist)
    if gap_bits is None:
        g, _, glens = choose_gap_bits(gaps)
    elif 1 <= gap_bits <= MAX_GAP_BITS:
        g, glens = gap_bits, huffman_lengths(gap_hist(gaps, gap_bits))
    else:
        raise ValueError(f"gap_bits must be in 1..{MAX_GAP_BITS}, got {gap_bits}")
    istream, inbits = pack_symbols(idx, ilens)
    gstream, gnbits = pack_symbols(gap_symbols(gaps, g), glens)
    payload = b"".join([HEADER.pack(bits, g, 0, 0, pos.size, inbits, gnbits),
                        codebook.astype("<f4").tobytes(), ilens.tobytes(), glens.tobytes(),
                        istream, gstream])
    n, m = flat.size, pos.size
    slots = m + int((gaps // (1 << CSR_INDEX_BITS)).sum())  # + filler zeros for long gaps
    err = float(np.linalg.norm((flat - deq).astype(np.float64)))
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    stats = {"size": n, "nonzero": m, "bits": bits, "gap_bits": g,
             "fp32": 4 * n,
             "pruned": slots * (32 + CSR_INDEX_BITS) // 8,
             "quantized": -(-slots * (bits + CSR_INDEX_BITS) // 8) + 4 * (1 << bits),
             "huffman": len(payload),
             "index_bits_per_entry": inbits / max(m, 1),
             "gap_bits_per_entry": gnbits / max(m, 1),
             "rel_error": err / norm if norm else 0.0}
    return deq.reshape(a.shape), payload, stats


def prune_magnitude(array: np.ndarray, fraction: float) -> np.ndarray:
    """A copy of `array` with the `fraction` of its entries smallest in magnitude set
    to zero (ties at the threshold may prune slightly more)."""
    a = np.array(array, np.float32)
    k = int(round(fraction * a.size))
    if k > 0:
        flat = a.reshape(-1)
        threshold = np.partition(np.abs(flat), k - 1)[k - 1]
        flat[np.abs(flat) <= threshold] = 0
    return a


def relative_error(array: np.ndarray, bits: int) -> float:
    flat = np.asarray(array, np.float32).reshape(-1)
    pos = np.flatnonzero(flat)
    codebook, idx = kmeans_1d(flat[pos], bits)
    norm = np.linalg.norm(flat.astype(np.float64))
    return float(np.linalg.norm(flat[pos].astype(np.float64) - codebook[idx]) / norm) \
        if norm else 0.0


def bits_for_error(max_error: float = 0.02) -> Callable:
    """A `bits_for` rule: the smallest b whose relative reconstruction error
    ||w - q(w)|| / ||w|| is at most `max_error` (8 if none is)."""
    def rule(name, array, node):
        for b in range(1, 9):
            if relative_error(array, b) <= max_error:
                return b
        return 8
    return rule


# ------------------------------------------------------------------ whole graph

def weight_kind(node: Node, array: np.ndarray) -> str:
    """pointwise (1x1 conv), depthwise (one input channel per group), conv (any other
    convolution, e.g. the 3x3 stem) or fc (Gemm / MatMul)."""
    if node.op in ("Gemm", "MatMul"):
        return "fc"
    if array.ndim >= 3 and array.shape[1] == 1 and int(node.attrs.get("group", 1)) > 1:
        return "depthwise"
    if array.ndim >= 3 and all(d == 1 for d in array.shape[2:]):
        return "pointwise"
    return "conv"


def _weights(graph: Graph) -> dict[str, Node]:
    """Initializers that are convolution or fully connected weights -> first user."""
    found: dict[str, Node] = {}
    for node in graph.nodes:
        names = []
        if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 1:
            names = [node.inputs[1]]
        elif node.op == "MatMul":
            names = node.inputs[:2]
        for name in names:
            if name in graph.initializers:
                found.setdefault(name, node)
    return found


def compress_graph(graph: Graph, bits: int | None = None, min_size: int = 4096,
                   bits_for: Callable | None = None, log=None, *,
                   prune: float | None = None) -> dict:
    """Replace the large float32 conv / fc weights of `graph` (in place) by their
    dequantized values, registered for encoding 1, so qnrt.format.save() writes
    them compressed. Returns a report (see format_report).

    Which tensors: Conv / ConvTranspose / Gemm weights and MatMul constants, float32,
    finite, with at least `min_size` elements. Bits per tensor: `bits_for(name,
    array, node)` if given (None leaves the tensor raw), else `bits` if given, else
    DEFAULT_BITS by kind: 8 for depthwise and other convolutions and 5 for fc, as
    the Deep Compression paper chose for conv vs fc layers, and 4 for pointwise
    (1x1) convolutions, which hold ~98 % of QuickNet's weights and lost no
    held-out accuracy at 4 bits on the shipped model (README, "Compression").
    `prune` (a fraction) first zeroes that share of each chosen tensor by magnitude
    (for experiments; the paper retrains after pruning)."""
    weights = _weights(graph)
    rows = []
    for name, a in graph.initializers.items():
        a = np.asarray(a)
        row = {"name": name, "shape": tuple(a.shape), "size": int(a.size),
               "fp32": int(a.nbytes), "kind": "", "bits": None}
        rows.append(row)
        node = weights.get(name)
        if node is None or a.dtype.newbyteorder("=") != np.float32 or a.size < min_size:
            continue
        row["kind"] = kind = weight_kind(node, a)
        if not np.isfinite(a).all():
            if log:
                log(f"{name}: not compressed (holds inf or NaN)")
            continue
        b = bits_for(name, a, node) if bits_for else bits if bits else DEFAULT_BITS[kind]
        if b is None:
            continue
        if prune:
            a = prune_magnitude(a, prune)
        deq, payload, stats = encode_tensor(a, b)
        if len(payload) >= a.nbytes:
            if log:
                log(f"{name}: not compressed ({len(payload)} bytes encoded, {a.nbytes} raw)")
            continue
        deq.flags.writeable = False
        graph.initializers[name] = deq
        qnb.attach_encoding(graph, name, qnb.DEEP_COMPRESSION, payload)
        row.update(stats)
        if log:
            log(f"{name} {tuple(a.shape)} {kind}: {stats['nonzero']}/{a.size} nonzero, "
                f"{b}-bit codebook, gap symbols {stats['gap_bits']} bits: "
                f"{stats['fp32']} -> {stats['huffman']} bytes, rel. error "
                f"{stats['rel_error']:.4f}")
    for row in rows:  # tensors left raw cost their raw size at every stage
        for stage in ("pruned", "quantized", "huffman"):
            row.setdefault(stage, row["fp32"])
    report = {"tensors": rows}
    for scope, keep in (("compressed", lambda r: r["bits"] is not None), ("all", None)):
        sel = [r for r in rows if keep is None or keep(r)]
        report[scope] = {stage: sum(r[stage] for r in sel)
                         for stage in ("fp32", "pruned", "quantized", "huffman")}
        report[scope]["tensors"] = len(sel)
        report[scope]["parameters"] = sum(r["size"] for r in sel)
        report[scope]["nonzero"] = sum(r.get("nonzero", r["size"]) for r in sel)
    return report


def fp32_file_size(path) -> int:
    """Size the .qnb at `path` would have with every tensor stored raw."""
    head = qnb.read_header(path)
    n = 0
    for t in head["tensors"]:
        raw = np.dtype(t["dtype"]).itemsize * int(np.prod(t["shape"], dtype=object))
        n = -(-n // qnb.ALIGN) * qnb.ALIGN + raw
    return head["sections"]["data"]["offset"] + n


def compress_file(src, dst, bits: int | None = None, log=print, *, min_size: int = 4096,
                  bits_for: Callable | None = None, prune: float | None = None) -> dict:
    """Load `src` (.qnb), compress its weights, write `dst` (.qnb with encoding-1
    tensors); logs the per-stage size table and returns the report, which also has
    "file": {"source", "fp32", "compressed"} sizes in bytes."""
    graph = optimize(qnb.load(src))  # fold batch norm first: quantize the weights that run
    report = compress_graph(graph, bits=bits, min_size=min_size, bits_for=bits_for,
                            prune=prune)
    size = qnb.save(graph, dst)
    report["file"] = {"source": os.path.getsize(src), "fp32": fp32_file_size(dst),
                      "compressed": size}
    if log:
        log(format_report(report))
    return report


def _mb(n: int) -> str:
    return f"{n / 1e6:9.3f}"


def format_report(report: dict) -> str:
    """The Deep Compression paper's table: bytes after each stage, per tensor and in
    total, with the compression ratio of each stage relative to fp32."""
    lines = [f"{'tensor':<28} {'shape':<20} {'b':>2} {'nonzero':>8} {'fp32 MB':>9} "
             f"{'pruned':>9} {'quant':>9} {'huffman':>9} {'ratio':>7} {'rel.err':>7}"]
    for r in report["tensors"]:
        if r["bits"] is None:
            continue
        lines.append(f"{r['name'][:28]:<28} {str(r['shape'])[:20]:<20} {r['bits']:>2} "
                     f"{r['nonzero'] / max(r['size'], 1):>7.1%} {_mb(r['fp32'])} "
                     f"{_mb(r['pruned'])} {_mb(r['quantized'])} {_mb(r['huffman'])} "
                     f"{r['fp32'] / max(r['huffman'], 1):>6.1f}x {r['rel_error']:>7.4f}")
    for scope, label in (("compressed", "compressed tensors"), ("all", "all tensors")):
        t = report[scope]
        lines.append(f"{label + ' (' + str(t['tensors']) + ')':<28} {'':<20} {'':>2} "
                     f"{t['nonzero'] / max(t['parameters'], 1):>7.1%} {_mb(t['fp32'])} "
                     f"{_mb(t['pruned'])} {_mb(t['quantized'])} {_mb(t['huffman'])} "
                     f"{t['fp32'] / max(t['huffman'], 1):>6.1f}x")
    t = report["all"]
    lines.append("stage ratios (all tensors, vs fp32): "
                 + ", ".join(f"{s} {t['fp32'] / max(t[s], 1):.1f}x"
                             for s in ("pruned", "quantized", "huffman"))
                 + f"  [pruned = 32-bit value + {CSR_INDEX_BITS}-bit relative index per "
                 f"nonzero; quant = b-bit index + {CSR_INDEX_BITS}-bit relative index + "
                 "codebook]")
    if "file" in report:
        f = report["file"]
        lines.append(f".qnb file: fp32 {f['fp32']:,} bytes -> compressed {f['compressed']:,} "
                     f"bytes ({f['fp32'] / max(f['compressed'], 1):.1f}x); source was "
                     f"{f['source']:,} bytes")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnrt.exporters.compress",
                                     description="Deep Compression of a .qnb file's weights "
                                     "(k-means weight sharing + Huffman coding; zeros are "
                                     "pruned positions)")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--bits", type=int, choices=range(1, 9), metavar="N",
                        help="codebook bits for every tensor (default: 4 for pointwise, 5 for fc, "
                        "8 for depthwise and other convolutions)")
    parser.add_argument("--min-size", type=int, default=4096,
                        help="compress only tensors with at least this many elements")
    parser.add_argument("--prune", type=float, metavar="F",
                        help="first zero the fraction F of each compressed tensor by "
                        "magnitude (experiments only: accuracy needs retraining)")
    args = parser.parse_args(argv)
    if args.prune is not None and not 0 <= args.prune < 1:
        parser.error("--prune takes a fraction in [0, 1)")
    try:
        compress_file(args.src, args.dst, args.bits, log=print, min_size=args.min_size,
                      prune=args.prune)
    except (OSError, ValueError) as exc:  # FormatError is a ValueError
        print(f"compress: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
