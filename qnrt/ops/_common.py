"""Helpers shared by the op files: attribute parsing, error messages, const
capture, and the Numba kernels several ops reuse (activation, broadcasting
binary loop, strided copy).

Numba kernels take C-contiguous float32 arrays (plus int64 index tables),
int64 ints and float64 scalars only, so each compiles to one specialization
(cheap cold start with cache).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import jit_only, kernel
from . import _blas
from ..graph import GraphError
from . import ACTIVATIONS

def njit(**options):
    """A kernel: compiled by Numba with qnrt's settings (backend.JIT_OPTIONS:
    cache=True, nogil, IEEE float semantics), or served by the ahead-of-time
    build when one matches (qnrt compile)."""
    return kernel(**options)


MAX_RANK = 6

# numpy's cblas_sgemm called from Numba code (qnrt.ops._blas): its address
# (0: not found, kernels keep np.matmul) and integer width, passed to kernels
SGEMM, SGEMM_ILP64 = _blas.ADDRESS, _blas.ILP64
sgemm = jit_only("qnrt.ops._numba_ext", "sgemm")


def sgemm_like_matmul(m: int, n: int) -> bool:
    """Whether np.matmul of an (m, k) by a (k, n) float32 matrix calls sgemm
    (it calls gemv or dot where m or n is 1), so a kernel calling sgemm itself
    computes the same bits."""
    return m >= 2 and n >= 2
floats_at = jit_only("qnrt.ops._numba_ext", "floats_at")
# register-tiled FMA products with the bias and ReLU/PRelu in registers (qnrt.ops._fma_tiles)
gemm_tiles = jit_only("qnrt.ops._fma_tiles", "gemm_tiles")




def fail(node, msg):
    raise GraphError(f"{node.where()}: {msg}")


def attr_ints(node, name, default=None):
    v = node.attrs.get(name, default)
    return None if v is None else [int(i) for i in (v if hasattr(v, "__len__") else [v])]


def attr_str(node, name, default=""):
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def has_input(node, i):
    return len(node.inputs) > i and bool(node.inputs[i])


def const_of(node, i, consts):
    """The initializer feeding input i, or None (omitted or produced at run time)."""
    return consts.get(node.inputs[i]) if has_input(node, i) else None


def numba_const(a):
    """A const as a C-contiguous float32 array Numba may read. Read-only
    (memory-mapped) consts are copied: Numba would compile a separate
    read-only specialization of every kernel otherwise; consts that reach
    Numba kernels are small (bias, slopes, depthwise weights)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a if a.flags.writeable else a.copy()


def readonly(a):
    """A read-only view: large weights reach Numba read-only whether the file is
    memory-mapped or decoded, so each kernel compiles one specialization."""
    v = a.view()
    v.flags.writeable = False
    return v


def int_list(a):
    return [int(i) for i in np.asarray(a).reshape(-1)]


def norm_axis(node, axis, rank):
    if not -rank <= axis < max(rank, 1):
        fail(node, f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(node, *shapes):
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        fail(node, f"shapes {list(shapes)} do not broadcast")


# --- windows (Conv and pools) ------------------------------------------------

def window_geometry(node, spatial, kernel, strides, dilations, ceil_mode=False):
    """Resolve pads (explicit or auto_pad) and output sizes for a sliding window.
    Returns (pads_begin, pads_end, out_sizes), validated."""
    r = len(spatial)
    if len(kernel) != r or len(strides) != r or len(dilations) != r:
        fail(node, f"kernel_shape/strides/dilations must have {r} entries, got "
                   f"{kernel}, {strides}, {dilations}")
    if min(kernel) < 1 or min(strides) < 1 or min(dilations) < 1:
        fail(node, f"kernel_shape {kernel}, strides {strides} and dilations {dilations} "
                   "must be positive")
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    auto = attr_str(node, "auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = attr_ints(node, "pads", [0] * 2 * r)
        if len(pads) != 2 * r or min(pads) < 0:
            fail(node, f"pads {pads} must be {2 * r} non-negative ints")
        begin, end = pads[:r], pads[r:]
        out = []
        for i in range(r):
            span = spatial[i] + begin[i] + end[i] - ext[i]
            if span < 0:
                fail(node, f"window {ext[i]} is larger than the padded input "
                           f"{spatial[i] + begin[i] + end[i]}")
            o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
            if ceil_mode and (o - 1) * strides[i] >= spatial[i] + begin[i]:
                o -= 1  # the last window would start in the end padding
            out.append(o)
    elif auto == "VALID":
        begin, end = [0] * r, [0] * r
        out = [(spatial[i] - ext[i]) // strides[i] + 1 for i in range(r)]
        if min(out) < 1:
            fail(node, f"window {ext} is larger than the input {spatial}")
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-spatial[i] // strides[i]) for i in range(r)]
        total = [max(0, (out[i] - 1) * strides[i] + ext[i] - spatial[i]) for i in range(r)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto == "SAME_UPPER" else (big, small)
    else:
        fail(node, f"unknown auto_pad '{auto}'")
    return begin, end, out


@njit(cache=True)
def valid_range(start, step, n, size):
    """[lo, hi): the j in [0, n) with 0 <= start + j * step < size."""
    lo = 0 if start >= 0 else (step - 1 - start) // step
    last = size - 1 - start
    hi = min(n, last // step + 1) if last >= 0 else 0
    return min(lo, hi), hi


# --- activations -------------------------------------------------------------

# codes shared by the unary ops and Conv's fused epilogue (0: none; _act's branches)
ACT_CODES = {"": 0, **{name: code for code, name in enumerate(ACTIVATIONS, 1)}}


def activation_params(kind, alpha=None, beta=None, lo=None, hi=None):
    """(a, b) float64 parameters of activation `kind` with ONNX defaults."""
    if kind == "Clip":
        return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))
    if kind == "HardSigmoid":
        return (0.2 if alpha is None else float(alpha)), (0.5 if beta is None else float(beta))
    if kind == "HardSwish":
        return 1.0 / 6.0, 0.5
    if kind == "LeakyRelu":
        return (0.01 if alpha is None else float(alpha)), 0.0
    return 0.0, 0.0


@njit(cache=True, inline="always")
def maximum(a, b):
    """IEEE maximum, as np.maximum: NaN when either is NaN (Python's max keeps
    whichever argument comes first when a comparison with NaN is false)."""
    return a if a > b or a != a else b


@njit(cache=True, inline="always")
def minimum(a, b):
    """IEEE minimum, as np.minimum: NaN when either is NaN."""
    return a if a < b or a != a else b


@njit(cache=True)
def _act(v, s, kind, a, b):
    """Activation `kind` of float32 v (s: PRelu slope; a, b: float32 params)."""
    if kind == 1:  # (written so that NaN passes, as in ONNX Runtime)
        return np.float32(0) if v <= 0 else v
    if kind == 2 or kind == 7:
        return v if v >= 0 else v * (s if kind == 2 else a)
    if kind == 3:
        return min(max(v, a), b)
    if kind == 4:
        return np.float32(1) / (np.float32(1) + np.exp(-v))
    if kind == 5:  # NaN first, so that it passes through Python-style min/max
        return max(min(a * v + b, np.float32(1)), np.float32(0))
    if kind == 6:
        return v * max(min(a * v + b, np.float32(1)), np.float32(0))
    if kind == 8:
        return np.tanh(v)
    if kind == 9:
        return v / (np.float32(1) + np.exp(-v))
    return v


# Hot loops index slices with range(0, n): a signed index that may be negative
# makes Numba emit a wraparound check per access, which blocks vectorization.

@njit(cache=True)
def act_row(y, bias, slope, kind, a, b):
    """y[:] = act(y + bias) for a 1-D slice y. One loop per kind so each vectorizes."""
    af, bf = np.float32(a), np.float32(b)
    if kind == 0:
        for i in range(y.size):
            y[i] += bias
    elif kind == 1:
        for i in range(y.size):
            v = y[i] + bias
            y[i] = np.float32(0) if v <= 0 else v
    elif kind == 2 or kind == 7:
        s = slope if kind == 2 else af
        for i in range(y.size):
            v = y[i] + bias
            y[i] = v if v >= 0 else v * s
    elif kind == 3:
        for i in range(y.size):
            y[i] = min(max(y[i] + bias, af), bf)
    else:
        for i in range(y.size):
            y[i] = _act(y[i] + bias, slope, kind, af, bf)


@njit(cache=True)
def epilogue(y, c0, c1, t0, t1, bias, slope, kind, a, b):
    """Per-channel bias + activation in place on y[c0:c1, t0:t1]; y is (C, HW)."""
    for c in range(c0, c1):
        act_row(y[c, t0:t1], bias[c], slope[c], kind, a, b)


@njit(cache=True)
def act_vec(y, slope, kind, a, b):
    """y[i] = act(y[i]) with a per-element PRelu slope (channels-last rows)."""
    af, bf = np.float32(a), np.float32(b)
    if kind == 1:
        for i in range(y.size):
            y[i] = max(y[i], np.float32(0))
    elif kind == 2:
        for i in range(y.size):
            v = y[i]
            y[i] = v if v >= 0 else v * slope[i]
    elif kind != 0:
        for i in range(y.size):
            y[i] = _act(y[i], slope[i], kind, af, bf)


@njit(cache=True)
def unary(x, y, kind, a, b):
    """y = act(x) over flat arrays (y may be x)."""
    af, bf = np.float32(a), np.float32(b)
    if kind == 1:
        for i in range(x.size):
            v = x[i]
            y[i] = np.float32(0) if v <= 0 else v  # NaN passes
    elif kind == 3:
        for i in range(x.size):
            y[i] = min(max(x[i], af), bf)
    else:
        for i in range(x.size):
            y[i] = _act(x[i], np.float32(0), kind, af, bf)


# --- broadcasting and strided copies -------------------------------------------

def coalesce(shape, *strides):
    """Drop size-1 dims and merge dims that are contiguous in every operand,
    then left-pad to MAX_RANK. Returns int64 arrays (shape, strides...) or None
    if more than MAX_RANK dims remain."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(shape) if n != 1]
    merged = []
    for n, st in dims:
        if merged:
            pn, pst = merged[-1]
            if all(p == q * n for p, q in zip(pst, st)):
                merged[-1] = (pn * n, st)
                continue
        merged.append((n, st))
    if len(merged) > MAX_RANK:
        return None
    merged = [(1, [0] * len(strides))] * (MAX_RANK - len(merged)) + merged
    out = [np.array([m[0] for m in merged], np.int64)]
    for k in range(len(strides)):
        out.append(np.array([m[1][k] for m in merged], np.int64))
    return out


def bcast_strides(in_shape, out_shape):
    """Element strides of a C-contiguous array of in_shape broadcast to out_shape."""
    in_shape = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
    strides, acc = [0] * len(out_shape), 1
    for i in range(len(out_shape) - 1, -1, -1):
        strides[i] = acc if in_shape[i] != 1 else 0
        acc *= in_shape[i]
    return strides


def c_strides(shape):
    strides, acc = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = acc
        acc *= shape[i]
    return strides


@njit(cache=True)
def _binop(x, y, op):
    if op == 0:
        return x + y
    if op == 1:
        return x - y
    if op == 2:
        return x * y
    if op == 3:
        return x / y
    return x if x >= 0 else x * y  # 4: PRelu


@njit(cache=True)
def _binrow(a, a5, b, b5, y, op):
    """One innermost row of binary6 (a, b: slices starting at the row)."""
    n = y.size
    if a5 == 1 and b5 == 1:
        for i in range(n):
            y[i] = _binop(a[i], b[i], op)
    elif a5 == 1 and b5 == 0:
        bv = b[0]
        for i in range(n):
            y[i] = _binop(a[i], bv, op)
    elif a5 == 0 and b5 == 1:
        av = a[0]
        for i in range(n):
            y[i] = _binop(av, b[i], op)
    else:
        for i in range(n):
            y[i] = _binop(a[i * a5], b[i * b5], op)


@njit(cache=True)
def binary6(a, sa, b, sb, y, shape, op):
    """y = a (op) b over MAX_RANK-dim broadcast views of flat a, b (element
    strides sa, sb; 0 = broadcast); y is flat C-contiguous. y may be a."""
    n5 = shape[5]
    o = 0
    for i0 in range(shape[0]):
        for i1 in range(shape[1]):
            for i2 in range(shape[2]):
                for i3 in range(shape[3]):
                    for i4 in range(shape[4]):
                        ia = i0 * sa[0] + i1 * sa[1] + i2 * sa[2] + i3 * sa[3] + i4 * sa[4]
                        ib = i0 * sb[0] + i1 * sb[1] + i2 * sb[2] + i3 * sb[3] + i4 * sb[4]
                        _binrow(a[ia:], sa[5], b[ib:], sb[5], y[o:o + n5], op)
                        o += n5


@njit(cache=True)
def _copy2(src, dst, n4, n5, s4, s5, d4, d5):
    """2-D strided block copy (offsets already applied by slicing)."""
    if s5 == 1 and d5 == 1:
        for i4 in range(n4):
            s, d = src[i4 * s4:], dst[i4 * d4:]
            for k in range(n5):
                d[k] = s[k]
    elif s4 == 1 and d5 == 1 and n4 >= 8:  # a transpose: strips of 8 source lines
        for i0 in range(0, n4 - 7, 8):
            for k in range(n5):
                s, d = src[i0 + k * s5:], dst[i0 * d4 + k:]
                for i in range(8):
                    d[i * d4] = s[i]
        for i4 in range(n4 - n4 % 8, n4):
            s, d = src[i4:], dst[i4 * d4:]
            for k in range(n5):
                d[k] = s[k * s5]
    else:
        for i4 in range(n4):
            s, d = src[i4 * s4:], dst[i4 * d4:]
            for k in range(n5):
                d[k * d5] = s[k * s5]


@njit(cache=True)
def copy6(src, soff, ss, dst, doff, ds, shape):
    """dst[doff + i.ds] = src[soff + i.ss] over a MAX_RANK-dim index space."""
    for i0 in range(shape[0]):
        for i1 in range(shape[1]):
            for i2 in range(shape[2]):
                for i3 in range(shape[3]):
                    i = soff + i0 * ss[0] + i1 * ss[1] + i2 * ss[2] + i3 * ss[3]
                    o = doff + i0 * ds[0] + i1 * ds[1] + i2 * ds[2] + i3 * ds[3]
                    _copy2(src[i:], dst[o:], shape[4], shape[5], ss[4], ss[5], ds[4], ds[5])


def address(a: np.ndarray) -> int:
    """Where a's first element is (for kernels that take arrays by address)."""
    return a.__array_interface__["data"][0]


def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """a and b start at the same address (an in-place step: the compiler gave
    the output its input's buffer)."""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0]



# --- parts: kernels that split over threads (qnrt.threads) -----------------------

PART_MIN_NS = 100_000  # estimated time of one part: smaller kernels do not split
MAX_PARTS = 8  # = qnrt.threads.MAX_PARTS (ops do not import the session's layers)
NS_PER_MAC = 0.012  # BLAS's time per multiply-add on this class of machine, for parts_for


def parts_for(units: int, ns_per_unit: float) -> int:
    """How many parts a kernel of `units` independent pieces of about
    ns_per_unit each splits into: none under PART_MIN_NS a part, at most
    MAX_PARTS (fixed by the work, never by the thread count, so the arena plan
    and the arithmetic are the same for any number of threads)."""
    return min(units, work_parts(units * ns_per_unit))


def work_parts(ns: float) -> int:
    """Parts that `ns` of work asks for, whatever pieces it comes in."""
    return max(1, min(MAX_PARTS, int(ns // PART_MIN_NS)))


def split_ranges(units: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of `parts` near-equal contiguous ranges of range(units)."""
    return [(units * p // parts, units * (p + 1) // parts) for p in range(parts)]


def by_parts(run_span, parts: int):
    """(run, run_parts) of a kernel whose run_span(p0, p1, ins, outs,
    workspace, *rows) computes parts p0 .. p1 - 1 in one call, in order, with
    one thread's share of the workspace: run is every part in one call (one
    dispatch where no threads share the work), run_parts is run_span."""
    def run(*args):
        run_span(0, parts, *args)
    return run, run_span
