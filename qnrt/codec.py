"""Decoder of the .qnb compressed tensor encoding 1, "deep compression".

A tensor stored with encoding 1 holds only its nonzero entries: a codebook of
2^b float32 values, and two canonical-Huffman bitstreams, one of codebook
indices and one of the gaps between consecutive stored positions. The byte
layout is specified in docs/qnb-format.md ("Encoding 1"); the encoder lives in
exporters/compress.py.

Everything here runs on data from a file that may be malicious: the Numba
kernels check every read against the stream length, every code table against
the Kraft inequality and every position against the tensor size, and report
problems as error codes, which `decode()` turns into a FormatError-ready
`CodecError` message. Imports only numpy, numba and the standard library.

What a payload can decode to. Every stored entry costs at least one bit in
each stream (a code is 1 to MAX_CODE_LEN bits), so `count` is at most either
stream's bit count (checked before decoding). Each gap symbol moves the
position by at most 2^g - 1 <= 65,535 elements (the escape symbol, after
which another gap symbol follows), so the last stored entry lies at most
65,535 elements per gap-stream bit from the start: the explicit part of a
tensor is bounded by its stored bytes. The zeros after the last stored entry
are implicit: the tensor's size comes from the tensor table's shape, and a
payload of 44 bytes (b = g = 1, no entries) is a legal all-zero tensor of
any size. So no multiple of the stored bytes bounds the decoded size without
refusing legal files (a fully pruned layer, a long zero tail); the decoded
total is capped instead, before allocation, by qnrt.Limits.max_decoded_bytes
(qnrt.format).
"""
from __future__ import annotations

import struct

import numpy as np
from .backend import kernel as njit

MAX_CODE_LEN = 24      # longest Huffman code a reader accepts
MAX_INDEX_BITS = 8     # b: codebook of 2^b entries, b in 1..8
MAX_GAP_BITS = 16      # g: gap alphabet of 2^g symbols, g in 1..16
FAST_BITS = 10         # codes up to this long decode with one table lookup
HEADER = struct.Struct("<BBHIQQQ")  # b, g, reserved u16, reserved u32, count, 2 x stream bits
DEEP_COMPRESSION = 1   # the tensor-table encoding code

# error codes returned by the kernels (0 = success)
OK, E_LENGTH, E_KRAFT, E_EXHAUSTED, E_INVALID, E_POSITION, E_TRAILING, E_SYMBOL = range(8)
_MESSAGES = {
    E_LENGTH: "code length table has a length above " + str(MAX_CODE_LEN),
    E_KRAFT: "code length table is oversubscribed (Kraft sum above 1)",
    E_EXHAUSTED: "stream exhausted before all entries were decoded",
    E_INVALID: "bit pattern that is not a code of the table",
    E_POSITION: "position beyond the end of the tensor",
    E_TRAILING: "stream has bits left over after the last entry",
    E_SYMBOL: "symbol outside the alphabet",
}


class CodecError(ValueError):
    """A malformed encoded tensor (qnrt.format re-raises it as FormatError)."""


# ------------------------------------------------------------------ Numba kernels

@njit(cache=True)
def _table(lengths):
    """Canonical-Huffman decoding tables for per-symbol code `lengths` (0 = unused).

    Returns (err, counts[0..MAX], symbols in canonical order, fast table). A fast
    table entry is sym << 5 | length for codes of at most FAST_BITS bits, else -1
    (longer code, or no code: the bit-serial path decides)."""
    counts = np.zeros(MAX_CODE_LEN + 1, np.int64)
    fast = np.full(1 << FAST_BITS, -1, np.int64)
    for s in range(lengths.size):
        if lengths[s] > MAX_CODE_LEN:
            return E_LENGTH, counts, np.zeros(0, np.int64), fast
        counts[lengths[s]] += 1
    counts[0] = 0
    left = 1
    for n in range(1, MAX_CODE_LEN + 1):
        left = (left << 1) - counts[n]
        if left < 0:
            return E_KRAFT, counts, np.zeros(0, np.int64), fast
    start = np.zeros(MAX_CODE_LEN + 2, np.int64)
    for n in range(1, MAX_CODE_LEN + 1):
        start[n + 1] = start[n] + counts[n]
    symbols = np.zeros(start[MAX_CODE_LEN + 1], np.int64)
    nxt = start.copy()
    for s in range(lengths.size):
        n = lengths[s]
        if n:
            symbols[nxt[n]] = s
            nxt[n] += 1
    code = 0  # first canonical code of each length, as in RFC 1951 3.2.2
    k = 0
    for n in range(1, MAX_CODE_LEN + 1):
        for _ in range(counts[n]):
            if n <= FAST_BITS:  # Kraft holds, so code < 2^n and the range fits
                lo = code << (FAST_BITS - n)
                hi = (code + 1) << (FAST_BITS - n)
                for j in range(lo, hi):
                    fast[j] = (symbols[k] << 5) | n
            code += 1
            k += 1
        code <<= 1
    return OK, counts, symbols, fast


# A bit reader is the state (buffer, bits in it, next byte). The buffer holds at most
# 56 bits, so it stays a nonnegative int64; bytes past the end of the stream read as
# zero, so refilling never leaves the array, and the bits consumed so far are
# 8 * next byte - bits in the buffer.

@njit(cache=True, inline="always")
def _symbol(stream, nbits, buf, cnt, i, counts, symbols, fast):
    """Decode one symbol: returns (err, symbol, buf, cnt, i), the reader advanced past
    the symbol on success."""
    while cnt <= 48:
        buf <<= 8
        if i < stream.size:
            buf |= stream[i]
        i += 1
        cnt += 8
    left = nbits - (8 * i - cnt)
    e = fast[(buf >> (cnt - FAST_BITS)) & ((1 << FAST_BITS) - 1)]
    if e >= 0:
        n = e & 31
        if n > left:
            return E_EXHAUSTED, 0, buf, cnt, i
        cnt -= n
        return OK, e >> 5, buf & ((1 << cnt) - 1), cnt, i
    bits = (buf >> (cnt - MAX_CODE_LEN)) & ((1 << MAX_CODE_LEN) - 1)
    code = 0
    first = 0
    index = 0
    for n in range(1, MAX_CODE_LEN + 1):
        code |= (bits >> (MAX_CODE_LEN - n)) & 1
        count = counts[n]
        if code - first < count:  # code >= first always holds
            if n > left:
                return E_EXHAUSTED, 0, buf, cnt, i
            cnt -= n
            return OK, symbols[index + code - first], buf & ((1 << cnt) - 1), cnt, i
        index += count
        first = (first + count) << 1
        code <<= 1
    if MAX_CODE_LEN > left:
        return E_EXHAUSTED, 0, buf, cnt, i
    return E_INVALID, 0, buf, cnt, i


@njit(cache=True)
def huffman_decode(lengths, stream, nbits, count):
    """Decode `count` symbols from a canonical-Huffman bitstream of `nbits` bits that
    must be consumed exactly. Returns (err, symbols, number decoded)."""
    out = np.zeros(max(count, 0), np.int64)
    err, counts, symbols, fast = _table(lengths)
    if err:
        return err, out, 0
    if nbits > 8 * stream.size or nbits < 0:
        return E_EXHAUSTED, out, 0
    buf, cnt, i = 0, 0, 0
    for k in range(count):
        err, s, buf, cnt, i = _symbol(stream, nbits, buf, cnt, i, counts, symbols, fast)
        if err:
            return err, out, k
        out[k] = s
    if 8 * i - cnt != nbits:
        return E_TRAILING, out, count
    return OK, out, count


@njit(cache=True)
def _decode_dc(codebook, ilens, istream, inbits, glens, gstream, gnbits, count, out):
    """Scatter `count` stored entries into `out` (all zeros on entry).

    Returns (err, which stream: 0 index / 1 gap, entry number, bit position)."""
    err, icounts, isyms, ifast = _table(ilens)
    if err:
        return err, 0, 0, 0
    err, gcounts, gsyms, gfast = _table(glens)
    if err:
        return err, 1, 0, 0
    if inbits > 8 * istream.size or inbits < 0:
        return E_EXHAUSTED, 0, 0, 0
    if gnbits > 8 * gstream.size or gnbits < 0:
        return E_EXHAUSTED, 1, 0, 0
    n = out.size
    esc = glens.size - 1
    ib, ic, ii = 0, 0, 0  # the two bit readers
    gb, gc, gi = 0, 0, 0
    last = -1
    for k in range(count):
        at = last + 1
        while True:
            err, s, gb, gc, gi = _symbol(gstream, gnbits, gb, gc, gi, gcounts, gsyms, gfast)
            if err:
                return err, 1, k, 8 * gi - gc
            if s > esc:
                return E_SYMBOL, 1, k, 8 * gi - gc
            at += s
            if at >= n:
                return E_POSITION, 1, k, 8 * gi - gc
            if s != esc:
                break
        err, s, ib, ic, ii = _symbol(istream, inbits, ib, ic, ii, icounts, isyms, ifast)
        if err:
            return err, 0, k, 8 * ii - ic
        if s >= codebook.size:
            return E_SYMBOL, 0, k, 8 * ii - ic
        out[at] = codebook[s]
        last = at
    if 8 * gi - gc != gnbits:
        return E_TRAILING, 1, count, 8 * gi - gc
    if 8 * ii - ic != inbits:
        return E_TRAILING, 0, count, 8 * ii - ic
    return OK, 0, count, 0


# ------------------------------------------------------------------ payload layout

def layout(payload, size: int) -> dict:
    """Parse and check the fixed part of an encoding-1 payload for a tensor of `size`
    elements; the arrays returned view `payload`. Raises CodecError."""
    total = len(payload)
    if total < HEADER.size:
        raise CodecError(f"payload of {total} bytes is shorter than the {HEADER.size}-byte "
                         "encoding header")
    b, g, r16, r32, count, inbits, gnbits = HEADER.unpack_from(payload, 0)
    if not 1 <= b <= MAX_INDEX_BITS:
        raise CodecError(f"index bits {b} outside 1..{MAX_INDEX_BITS}")
    if not 1 <= g <= MAX_GAP_BITS:
        raise CodecError(f"gap bits {g} outside 1..{MAX_GAP_BITS}")
    if r16 or r32:
        raise CodecError("reserved header bytes are not zero")
    if count > size:
        raise CodecError(f"{count} stored entries for a tensor of {size} elements")
    if count > inbits or count > gnbits:  # each entry costs a code of >= 1 bit in each stream
        raise CodecError(f"{count} stored entries cannot fit streams of {inbits} and {gnbits} "
                         "bits (each entry takes at least one bit of each)")
    k, gsyms = 1 << b, 1 << g
    ibytes, gbytes = -(-inbits // 8), -(-gnbits // 8)
    at = HEADER.size
    parts = {}
    for name, n in (("codebook", 4 * k), ("index_lengths", k), ("gap_lengths", gsyms),
                    ("index_stream", ibytes), ("gap_stream", gbytes)):
        parts[name] = (at, n)
        at += n
    if at != total:
        raise CodecError(f"payload is {total} bytes, but its header describes {at} "
                         f"(codebook {k}, gap alphabet {gsyms}, streams of {inbits} and "
                         f"{gnbits} bits)")
    arr = {name: np.frombuffer(payload, np.uint8, n, off) for name, (off, n) in parts.items()}
    for name, nbits in (("index_stream", inbits), ("gap_stream", gnbits)):
        pad = -nbits % 8
        if pad and arr[name][-1] & ((1 << pad) - 1):
            raise CodecError(f"{name.replace('_', ' ')} has nonzero padding bits")
    return {"index_bits": b, "gap_bits": g, "count": count, "index_nbits": inbits,
            "gap_nbits": gnbits, "codebook": arr["codebook"].view("<f4").astype(np.float32),
            "index_lengths": arr["index_lengths"], "gap_lengths": arr["gap_lengths"],
            "index_stream": arr["index_stream"], "gap_stream": arr["gap_stream"]}


def decode(payload, shape, out=None) -> np.ndarray:
    """The float32 array of `shape` that an encoding-1 payload stores, decoded into
    `out` (a zeroed, C-contiguous float32 vector of that size) or a new array.
    Raises CodecError (with a message saying what is wrong) for any malformed payload."""
    size = int(np.prod(shape, dtype=object))
    p = layout(payload, size)
    if out is None:
        try:
            out = np.zeros(size, np.float32)
        except (MemoryError, ValueError):
            raise CodecError(f"cannot allocate {size} float32 elements") from None
    elif out.dtype != np.float32 or out.shape != (size,) or not out.flags.c_contiguous:
        raise ValueError(f"decode: out must be a C-contiguous float32 vector of {size}")
    err, which, entry, bit = _decode_dc(p["codebook"], p["index_lengths"], p["index_stream"],
                                        p["index_nbits"], p["gap_lengths"], p["gap_stream"],
                                        p["gap_nbits"], p["count"], out)
    if err:
        stream = ("index", "gap")[which]
        where = (f"the {stream} stream's table" if err in (E_LENGTH, E_KRAFT) else
                 f"the {stream} stream, entry {entry} of {p['count']}, bit {bit}")
        raise CodecError(f"corrupt Huffman stream: {_MESSAGES[err]} ({where})")
    return out.reshape(shape)
