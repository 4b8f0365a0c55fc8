"""Helpers for the ops whose output is a per-axis gather of the input (Pad,
nearest Resize): each output coordinate along each axis reads one input
coordinate (or the constant, -1). Not an op file: it registers nothing.

The tables are (MAX_RANK, L) int64; the input is C-contiguous, so after
merging identity axes the innermost stride is 1.
"""
from __future__ import annotations

import numpy as np

from ._common import MAX_RANK, c_strides, fail, njit


def gather_plan(node, in_shape, tables):
    """Merge adjacent identity axes (table == arange(n), same size in and out),
    left-pad to MAX_RANK. Returns (tab (MAX_RANK, L) int64, in strides int64,
    out shape int64, lo, hi): [lo, hi) is the longest run of the innermost
    table that reads consecutive input elements (copied without the table)."""
    dims = []  # (in size, table)
    for n, t in zip(in_shape, tables):
        t = np.asarray(t, np.int64)
        ident = t.size == n and bool(np.array_equal(t, np.arange(n)))
        if dims and ident and dims[-1][2]:
            pn = dims[-1][0]
            dims[-1] = (pn * n, np.arange(pn * n, dtype=np.int64), True)
        else:
            dims.append((int(n), t, ident))
    if len(dims) > MAX_RANK:
        fail(node, f"rank {len(in_shape)} needs more than {MAX_RANK} dims after merging")
    dims = [(1, np.zeros(1, np.int64), True)] * (MAX_RANK - len(dims)) + dims
    length = max(1, max(t.size for _, t, _ in dims))
    tab = np.full((MAX_RANK, length), -1, np.int64)
    for i, (_, t, _) in enumerate(dims):
        tab[i, :t.size] = t
    strides = np.array(c_strides([n for n, _, _ in dims]), np.int64)
    shape = np.array([t.size for _, t, _ in dims], np.int64)
    lo, hi = _longest_run(dims[-1][1])
    for i, (n, t, _) in enumerate(dims):  # what the kernel will index
        if t.size and (t.max() >= n or t.min() < -1):
            fail(node, f"internal: gather table {i} reads outside [0, {n})")
    return tab, strides, shape, lo, hi


def _longest_run(t):
    best, start = (0, 0), 0
    for j in range(1, len(t) + 1):
        if j == len(t) or t[j] < 0 or t[j - 1] < 0 or t[j] != t[j - 1] + 1:
            if t[start] >= 0 and j - start > best[1] - best[0]:
                best = (start, j)
            start = j
    return best if best[1] - best[0] > 1 else (0, 0)


@njit(cache=True)
def gather6(x, xs, tab, y, shape, cval, lo, hi):
    """y[i] = x[sum_d tab[d, i_d] * xs[d]] over a MAX_RANK-dim index space
    (cval where any tab entry is -1); y is flat C-contiguous. Along the last
    axis, [lo, hi) reads consecutive input elements; an output row whose
    source row equals the previous one is copied from it."""
    n0, n1, n2, n3, n4, n5 = shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]
    t5 = tab[5]
    off = t5[lo] - lo if hi > lo else 0
    c = np.float32(cval)
    o, prev, prev_o = 0, -1, 0
    for i0 in range(n0):
        a0 = tab[0, i0]
        for i1 in range(n1):
            a1 = tab[1, i1]
            for i2 in range(n2):
                a2 = tab[2, i2]
                for i3 in range(n3):
                    a3 = tab[3, i3]
                    for i4 in range(n4):
                        a4 = tab[4, i4]
                        row = y[o:o + n5]
                        if a0 < 0 or a1 < 0 or a2 < 0 or a3 < 0 or a4 < 0:
                            row[:] = c
                        else:
                            base = a0 * xs[0] + a1 * xs[1] + a2 * xs[2] + a3 * xs[3] + a4 * xs[4]
                            if base == prev:
                                src = y[prev_o:prev_o + n5]
                                for j in range(n5):
                                    row[j] = src[j]
                            else:
                                src = x[base:]
                                for j in range(lo):
                                    t = t5[j]
                                    row[j] = src[t] if t >= 0 else c
                                mid, s = row[lo:hi], src[lo + off:]
                                for j in range(hi - lo):
                                    mid[j] = s[j]
                                for j in range(hi, n5):
                                    t = t5[j]
                                    row[j] = src[t] if t >= 0 else c
                                prev, prev_o = base, o
                        o += n5
