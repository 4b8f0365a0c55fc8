"""Conv (2-D, NCHW) with an optional fused bias + activation epilogue.

Extra attrs (set by the fusion pass): `activation` in ACT_CODES, with
`activation_alpha`/`activation_beta` (HardSigmoid, LeakyRelu) and
`activation_min`/`activation_max` (Clip); for PRelu the per-output-channel
slope is input 3.

Paths:
- pointwise 1x1: one BLAS matmul per image; a batch of small images gathered
  into one matmul; at most 4 columns in all (weight-streaming bound) a Numba
  kernel over a transposed copy of W;
- depthwise: direct Numba loops. 3x3/s1/p1 (QuickNet's): channels-last below
  12 columns, a zero-padded flat kernel below 24, a flat plane kernel above;
  other windows: channels-last for small planes, per-row otherwise;
- the general one: im2col tiles in the workspace + matmul.

int8 weights (attr `weights_int8` = 1, set by rewrite.quantize_pointwise_int8
for Session(weights="int8")): input 1 is an int8 constant q and input 4 a
float32 per-output-channel scale, W = scale[co] * q[co, ...]. The skinny
pointwise kernel reads q itself (4x fewer weight bytes); every other path
dequantizes once in prepare to float32, which is correct but saves no memory.
"""
from __future__ import annotations


import numpy as np

from . import Kernel, register
from ._common import (ACT_CODES, act_row, act_vec, activation_params, attr_ints, attr_str,
                      const_of, epilogue, fail, has_input, njit, numba_const, window_geometry)
from ._common import valid_range as _valid

WORKSPACE_BUDGET = 256 * 1024  # bytes of im2col columns per tile
MIN_TILE = 64  # columns; BLAS gets inefficient below this
NHWC_MAX_WIDTH = 64  # depthwise outputs narrower than this go channels-last
NHWC_MAX_BYTES = 2 * 1024 * 1024  # ... if the transposed image fits this workspace
DW3X3_NHWC_MAX_WIDTH = 12  # ... or, for 3x3/s1/p1 (whose plane kernel is faster), this
DW3X3_PAD_MAX_WIDTH = 24  # 3x3/s1/p1 narrower than this: zero-padded flat kernel
BATCH_MAX_HW = 32  # pointwise: batches of images this small share one matmul ...
BATCH_COLS = 256  # ... of about this many columns
BATCH_WS_BYTES = 1024 * 1024  # ... within this workspace (gathered X and the product)
SKINNY_COLS = 4  # pointwise with at most this many columns in all (N * H * W) ...
SKINNY_MIN_WEIGHTS = 256 * 256  # ... and this many weights: a Numba pass over W


def _geometry(node, in_shapes):
    x, w = in_shapes[0], in_shapes[1] if len(in_shapes) > 1 else None
    if x is None or w is None:
        fail(node, "needs inputs X and W")
    if len(x) != 4 or len(w) != 4:
        fail(node, f"only 2-D convolution (NCHW) is supported; X {x}, W {w}")
    n, cin, h, wd = x
    cout, cg, kh, kw = w
    group = int(node.attrs.get("group", 1))
    if group < 1 or cin % group or cout % group:
        fail(node, f"group {group} must divide input channels {cin} and output channels {cout}")
    if cg != cin // group:
        fail(node, f"weight {w} needs {cin // group} input channels per group (X {x}, "
                   f"group {group})")
    kernel = attr_ints(node, "kernel_shape", [kh, kw])
    if kernel != [kh, kw]:
        fail(node, f"kernel_shape {kernel} does not match weight {w}")
    strides = attr_ints(node, "strides", [1, 1])
    dil = attr_ints(node, "dilations", [1, 1])
    begin, end, out = window_geometry(node, [h, wd], kernel, strides, dil)
    if min(out) < 1:
        fail(node, f"output would be empty: {out}")
    return dict(n=n, cin=cin, h=h, w=wd, cout=cout, cg=cg, kh=kh, kw=kw, group=group,
                strides=strides, dil=dil, begin=begin, end=end, oh=out[0], ow=out[1])


def infer(node, in_shapes, consts):
    g = _geometry(node, in_shapes)
    if has_input(node, 2) and tuple(in_shapes[2]) != (g["cout"],):
        fail(node, f"bias shape {in_shapes[2]} must be ({g['cout']},)")
    return [(g["n"], g["cout"], g["oh"], g["ow"])]


def _epilogue_params(node, in_shapes, consts, cout):
    kind = attr_str(node, "activation", "")
    if kind not in ACT_CODES:
        fail(node, f"unsupported fused activation '{kind}'")
    a, b = activation_params(kind, node.attrs.get("activation_alpha"),
                             node.attrs.get("activation_beta"),
                             node.attrs.get("activation_min"), node.attrs.get("activation_max"))
    bias = slope = None
    if has_input(node, 2):
        bias = const_of(node, 2, consts)
        bias = numba_const(bias) if bias is not None else None
    if kind == "PRelu":
        if not has_input(node, 3) or int(np.prod(in_shapes[3])) not in (1, cout):
            fail(node, f"fused PRelu needs a slope of {cout} values as input 3")
        slope = const_of(node, 3, consts)
        if slope is not None:
            slope = numba_const(np.broadcast_to(np.asarray(slope).reshape(-1), (cout,)))
    return ACT_CODES[kind], a, b, bias, slope


def prepare(node, in_shapes, out_shapes, consts):
    g = _geometry(node, in_shapes)
    infer(node, in_shapes, consts)
    n, cout, oh, ow = g["n"], g["cout"], g["oh"], g["ow"]
    if tuple(out_shapes[0]) != (n, cout, oh, ow):
        fail(node, f"output shape {out_shapes[0]} != {(n, cout, oh, ow)}")
    kind, a, b, bias_c, slope_c = _epilogue_params(node, in_shapes, consts, cout)
    zeros = np.zeros(cout, np.float32)
    has_bias = has_input(node, 2)

    def side(ins):  # bias and slope: captured consts, run-time inputs, or zeros
        bias = bias_c if bias_c is not None else (ins[2].reshape(-1) if has_bias else zeros)
        if slope_c is not None or kind != ACT_CODES["PRelu"]:
            return bias, (slope_c if slope_c is not None else zeros)
        s = ins[3].reshape(-1)
        return bias, (s if s.size == cout else np.full(cout, s[0], np.float32))

    w_const = const_of(node, 1, consts)
    epi = (kind, a, b, has_bias or kind != 0)
    pointwise = (g["kh"] == g["kw"] == 1 and g["strides"] == [1, 1] and g["group"] == 1
                 and g["begin"] == g["end"] == [0, 0])
    if node.attrs.get("weights_int8"):
        q, scale = _int8_weights(node, g, w_const, consts)
        if pointwise and _skinny(g, q):
            return _skinny_kernel(g, q.reshape(cout, g["cin"]), scale, side, epi)
        # not weight-streaming bound: dequantize once (correct, but no memory saved)
        w_c = (q.astype(np.float32) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    else:
        w_c = None if w_const is None else np.ascontiguousarray(w_const, dtype=np.float32)
    if pointwise:
        return _pointwise(g, w_c, side, epi)
    if g["group"] == g["cin"] and g["cg"] == 1:
        return _depthwise_kernel(g, w_c, side, epi)
    return _general(g, w_c, side, epi)


def _int8_weights(node, g, q, consts):
    """Input 1 (int8 q) and input 4 (float32 scale per output channel), checked:
    the Numba kernel does not bounds-check."""
    cout = g["cout"]
    scale = const_of(node, 4, consts)
    if q is None or scale is None:
        fail(node, "weights_int8 needs a constant int8 weight (input 1) and a constant "
                   "scale (input 4)")
    q, scale = np.asarray(q), np.asarray(scale)
    if q.dtype != np.int8:
        fail(node, f"weights_int8: weight has dtype {q.dtype}, not int8")
    if tuple(q.shape) != (cout, g["cg"], g["kh"], g["kw"]):
        fail(node, f"weights_int8: weight shape {q.shape} does not match the geometry")
    if scale.dtype != np.float32 or scale.size != cout:
        fail(node, f"weights_int8: scale must be {cout} float32 values, not "
                   f"{scale.size} {scale.dtype}")
    return np.ascontiguousarray(q), numba_const(scale.reshape(cout))


def _skinny(g, w):
    return (w is not None and g["n"] * g["h"] * g["w"] <= SKINNY_COLS
            and g["cin"] * g["cout"] >= SKINNY_MIN_WEIGHTS)


def _skinny_kernel(g, w2, scale, side, epi):
    """The few-column pointwise path: one pass over W (Cout, Cin), float32 or
    int8 (then `scale` per output channel; ones for float32)."""
    n, cin, cout, hw = g["n"], g["cin"], g["cout"], g["h"] * g["w"]
    kind, a, b, _ = epi
    w_ro = w2.view()
    w_ro.flags.writeable = False  # one Numba specialization, mapped or not
    ws_bytes = 4 * SKINNY_COLS * (cin + cout)

    def run(ins, outs, workspace):
        bias, slope = side(ins)
        ws = workspace[:ws_bytes].view(np.float32)
        _pw_skinny(ins[0].reshape(n, cin, hw), w_ro, scale,
                   ws[:cin * SKINNY_COLS].reshape(SKINNY_COLS, cin),
                   ws[cin * SKINNY_COLS:].reshape(SKINNY_COLS, cout),
                   outs[0].reshape(n, cout, hw), bias, slope, kind, a, b)
    return Kernel(run, workspace=ws_bytes)


def _pointwise(g, w_c, side, epi):
    """1x1 stride 1: Y[n] = W (Cout, Cin) @ X[n] (Cin, HW) in BLAS, then the epilogue.
    With a batch of small images (HW <= BATCH_MAX_HW) one matmul per image
    would re-read W for every image and give BLAS too few columns: chunks of
    images are gathered into a (Cin, images * HW) workspace, multiplied at
    once, and scattered back through the epilogue. With at most SKINNY_COLS
    columns in all (the late layers of a small image) the time is the one pass
    over W, which BLAS's packing slows down: a Numba kernel reads W once, in
    place (_skinny_kernel)."""
    n, cin, cout, hw = g["n"], g["cin"], g["cout"], g["h"] * g["w"]
    kind, a, b, has_epi = epi
    w2 = w_c.reshape(cout, cin) if w_c is not None else None
    if _skinny(g, w2):
        return _skinny_kernel(g, w2, np.ones(cout, np.float32), side, epi)
    nb = min(n, max(1, BATCH_COLS // hw), max(1, BATCH_WS_BYTES // (4 * hw * (cin + cout))))
    if n > 1 and hw <= BATCH_MAX_HW and nb > 1:
        cols = nb * hw
        chunks = [(n0, min(nb, n - n0) * hw) for n0 in range(0, n, nb)]

        def run(ins, outs, workspace):
            x3, y3 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, hw)
            wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
            bias, slope = side(ins)
            ws = workspace[:4 * cols * (cin + cout)].view(np.float32)
            for n0, c in chunks:  # (a short last chunk: smaller C-contiguous views)
                xv = ws[:cin * c].reshape(cin, c)
                yv = ws[cin * cols:cin * cols + cout * c].reshape(cout, c)
                _gather_images(x3, n0, xv)
                np.matmul(wm, xv, out=yv)
                _scatter_images(yv, y3, n0, bias, slope, kind, a, b)
        return Kernel(run, workspace=4 * cols * (cin + cout))

    def run(ins, outs, workspace):
        x3, y3 = ins[0].reshape(n, cin, hw), outs[0].reshape(n, cout, hw)
        wm = w2 if w2 is not None else ins[1].reshape(cout, cin)
        bias, slope = side(ins)
        for i in range(n):
            np.matmul(wm, x3[i], out=y3[i])
            if has_epi:
                epilogue(y3[i], 0, cout, 0, hw, bias, slope, kind, a, b)
    return Kernel(run)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _pw_skinny(x3, w, scale, xs, yt, y3, bias, slope, kind, a, b):
    """Y = W @ X for at most 4 columns in all (images x pixels): the time is one
    pass over W (Cout, Cin), read row by row in place (no copy, unlike BLAS's
    packing). W is float32, or int8 with dot products scaled by scale[co]
    (compiled once per weight dtype). X goes to xs (4, Cin), zero-padded; each
    output is a dot product of a W row with an xs row. Reassociating those sums
    lets them vectorize; the error stays at float32 rounding level (tested
    against ONNX Runtime)."""
    n_, cin, hw = x3.shape
    cout = w.shape[0]
    ncols = n_ * hw
    xs[:] = 0
    for j in range(ncols):
        xn = x3[j // hw]
        p = j % hw
        for c in range(cin):
            xs[j, c] = xn[c, p]
    x0, x1, x2, x3_ = xs[0], xs[1], xs[2], xs[3]
    y0, y1, y2, y3r = yt[0], yt[1], yt[2], yt[3]
    for co in range(cout):
        r = w[co]
        s0 = np.float32(0)
        s1 = np.float32(0)
        s2 = np.float32(0)
        s3 = np.float32(0)
        for c in range(cin):
            v = np.float32(r[c])
            s0 += v * x0[c]
            s1 += v * x1[c]
            s2 += v * x2[c]
            s3 += v * x3_[c]
        sc = scale[co]
        y0[co] = s0 * sc
        y1[co] = s1 * sc
        y2[co] = s2 * sc
        y3r[co] = s3 * sc
    for j in range(ncols):
        row = yt[j]
        for k in range(cout):
            row[k] += bias[k]
        act_vec(row, slope, kind, a, b)
        yn = y3[j // hw]
        p = j % hw
        for k in range(cout):
            yn[k, p] = row[k]


@njit(cache=True)
def _gather_images(x, n0, xs):
    """xs[c, j * HW + p] = x[n0 + j, c, p] for the xs.shape[1] // HW images from n0."""
    hw = x.shape[2]
    for j in range(xs.shape[1] // hw):
        for c in range(x.shape[1]):
            src, dst = x[n0 + j, c], xs[c, j * hw:(j + 1) * hw]
            for p in range(hw):
                dst[p] = src[p]


@njit(cache=True)
def _scatter_images(ys, y, n0, bias, slope, kind, a, b):
    """y[n0 + j, c] = act(ys[c, j * HW:(j + 1) * HW] + bias[c]): the inverse of
    _gather_images with Conv's epilogue on each row while it is in L1."""
    hw = y.shape[2]
    for j in range(ys.shape[1] // hw):
        for c in range(y.shape[1]):
            src, dst = ys[c, j * hw:(j + 1) * hw], y[n0 + j, c]
            for p in range(hw):
                dst[p] = src[p]
            if kind != 0 or bias[c] != 0:
                act_row(dst, bias[c], slope[c], kind, a, b)


def _depthwise_kernel(g, w_c, side, epi):
    """group == Cin: small planes go channels-last; 3x3/s1/p1 has a padded
    kernel for narrow planes and a plane kernel for wide ones; anything else
    the general row kernel."""
    cin, cout, kh, kw, oh, ow = g["cin"], g["cout"], g["kh"], g["kw"], g["oh"], g["ow"]
    (sh, sw), (dh, dw), (ph, pw) = g["strides"], g["dil"], g["begin"]
    kind, a, b, _ = epi
    mult, hw, ohw = cout // cin, g["h"] * g["w"], oh * ow
    nhwc_bytes = ((hw + 1) * cin + ohw * cin) * 4
    dw3x3 = (kh, kw, sh, sw, dh, dw) == (3, 3, 1, 1, 1, 1) and g["begin"] == g["end"] == [1, 1]
    nhwc_width = min(NHWC_MAX_WIDTH, DW3X3_NHWC_MAX_WIDTH) if dw3x3 else NHWC_MAX_WIDTH
    if mult == 1 and ow < nhwc_width and nhwc_bytes <= NHWC_MAX_BYTES:
        taps = _nhwc_taps(g["h"], g["w"], oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)

        def weights_t(w):  # (K3, C), zero rows for the padding taps
            wt = np.zeros((taps.shape[1], cout), np.float32)
            wt[:kh * kw] = w.reshape(cout, kh * kw).T
            return wt
        wt_c = weights_t(w_c) if w_c is not None else None

        def run(ins, outs, workspace):
            bias, slope = side(ins)
            ws = workspace[:nhwc_bytes].view(np.float32)
            _dw_nhwc(ins[0], wt_c if wt_c is not None else weights_t(ins[1]), taps, bias,
                     slope, outs[0], ws[:(hw + 1) * cin].reshape(hw + 1, cin),
                     ws[(hw + 1) * cin:].reshape(ohw, cin), kind, a, b)
        return Kernel(run, workspace=nhwc_bytes)

    wd = numba_const(w_c) if w_c is not None else None
    if dw3x3 and (ow < DW3X3_PAD_MAX_WIDTH or ow < 2):  # (the plane kernel needs W >= 2)
        sp = g["w"] + 1
        pad_bytes = 4 * ((oh + 2) * sp + 1 + oh * sp)

        def run(ins, outs, workspace):
            bias, slope = side(ins)
            ws = workspace[:pad_bytes].view(np.float32)
            _dw3x3_padded(ins[0], wd if wd is not None else ins[1], bias, slope, outs[0], mult,
                          kind, a, b, ws[:(oh + 2) * sp + 1], ws[(oh + 2) * sp + 1:])
        return Kernel(run, workspace=pad_bytes)
    if dw3x3:
        zero = np.zeros(g["w"], np.float32)  # the row above the first and below the last

        def run(ins, outs, workspace):
            bias, slope = side(ins)
            _dw3x3(ins[0], wd if wd is not None else ins[1], bias, slope, outs[0], mult,
                   kind, a, b, zero)
        return Kernel(run)

    def run(ins, outs, workspace):
        bias, slope = side(ins)
        _depthwise(ins[0], wd if wd is not None else ins[1], bias, slope, outs[0], mult,
                   sh, sw, ph, pw, dh, dw, kind, a, b)
    return Kernel(run)


def _general(g, w_c, side, epi):
    """Any group/kernel/stride/pad/dilation: im2col over tiles of output
    columns in the workspace, one matmul per group and tile, then the epilogue
    on the tile while it is in cache."""
    n, cout, group, kh, kw, ow = g["n"], g["cout"], g["group"], g["kh"], g["kw"], g["ow"]
    (sh, sw), (dh, dw), (ph, pw) = g["strides"], g["dil"], g["begin"]
    kind, a, b, has_epi = epi
    cg, mg, kk, ohw = g["cg"], cout // group, g["cg"] * kh * kw, g["oh"] * ow
    tile = min(ohw, max(MIN_TILE, WORKSPACE_BUDGET // (4 * kk)))
    wg = w_c.reshape(group, mg, kk) if w_c is not None else None

    def run(ins, outs, workspace):
        x, y3 = ins[0], outs[0].reshape(n, cout, ohw)
        wm = wg if wg is not None else ins[1].reshape(group, mg, kk)
        bias, slope = side(ins)
        cols = workspace[:kk * tile * 4].view(np.float32)
        for i in range(n):
            for t0 in range(0, ohw, tile):
                t = min(tile, ohw - t0)
                col = cols[:kk * t].reshape(kk, t)
                for gi in range(group):
                    _im2col(x, i, gi * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, ow, t0, col)
                    np.matmul(wm[gi], col, out=y3[i, gi * mg:(gi + 1) * mg, t0:t0 + t])
                if has_epi:
                    epilogue(y3[i], 0, cout, t0, t0 + t, bias, slope, kind, a, b)
    return Kernel(run, workspace=kk * tile * 4)


@njit(cache=True)
def _depthwise(x, w, bias, slope, y, mult, sh, sw, ph, pw, dh, dw, kind, a, b):
    """Depthwise conv, output channel m reads input channel m // mult. Each
    output row accumulates kernel taps as axpys over the column range where
    the tap is inside the image (no per-pixel bounds checks)."""
    n_, c_, h, wd = x.shape
    m_, oh_, ow_ = y.shape[1], y.shape[2], y.shape[3]
    kh_, kw_ = w.shape[2], w.shape[3]
    for n in range(n_):
        for m in range(m_):
            xc, yc, wm, bm = x[n, m // mult], y[n, m], w[m, 0], bias[m]
            for oh in range(oh_):
                row = yc[oh]
                row[:] = bm
                for kh in range(kh_):
                    ih = oh * sh - ph + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    for kw in range(kw_):
                        wv, off = wm[kh, kw], kw * dw - pw
                        lo, hi = _valid(off, sw, ow_, wd)
                        dst, src = row[lo:hi], xr[lo * sw + off:]
                        if sw == 1:
                            for j in range(hi - lo):
                                dst[j] += wv * src[j]
                        else:
                            for j in range(hi - lo):
                                dst[j] += wv * src[j * sw]
                if kind != 0:
                    act_row(row, np.float32(0), slope[m], kind, a, b)


@njit(cache=True)
def _dw3x3(x, w, bias, slope, y, mult, kind, a, b, zero):
    """Depthwise 3x3, stride 1, pad 1 (QuickNet's) for W >= 2, plane by plane;
    zero: W zeros (the padding rows)."""
    for n in range(x.shape[0]):
        for m in range(y.shape[1]):
            _dw3x3_plane(x[n, m // mult], y[n, m], w[m, 0], bias[m], slope[m], zero,
                         kind, a, b)


@njit(cache=True)
def _dw3x3_plane(xc, yc, k, bm, s, zero, kind, a, b):
    """One (H, W >= 2) plane. Rows 1 .. H-2 are one flat loop over the plane
    (long, so it vectorizes well even for narrow images; its first and last
    columns wrap around to the neighbouring rows and are redone after), then
    rows 0 and H-1 against a zero row. PRelu/LeakyRelu run inside the loops,
    other activations as one pass over the plane while it is in cache."""
    h, wd = xc.shape
    hw, e = h * wd, wd - 1
    xf, yf = xc.reshape(hw), yc.reshape(hw)
    w00, w01, w02, w10, w11, w12 = k[0, 0], k[0, 1], k[0, 2], k[1, 0], k[1, 1], k[1, 2]
    w20, w21, w22 = k[2, 0], k[2, 1], k[2, 2]
    leaky = kind == 2 or kind == 7
    sl = s if kind == 2 else np.float32(a)
    if h > 2:
        t0, t1, t2 = xf[0:], xf[1:], xf[2:]
        m0, m1, m2 = xf[wd:], xf[wd + 1:], xf[wd + 2:]
        b0, b1, b2 = xf[2 * wd:], xf[2 * wd + 1:], xf[2 * wd + 2:]
        o = yf[wd + 1:]
        if leaky:
            for j in range((h - 2) * wd - 2):
                v = bm + (w00 * t0[j] + w01 * t1[j] + w02 * t2[j]
                          + w10 * m0[j] + w11 * m1[j] + w12 * m2[j]
                          + w20 * b0[j] + w21 * b1[j] + w22 * b2[j])
                o[j] = v if v >= 0 else v * sl
        else:
            for j in range((h - 2) * wd - 2):
                o[j] = bm + (w00 * t0[j] + w01 * t1[j] + w02 * t2[j]
                             + w10 * m0[j] + w11 * m1[j] + w12 * m2[j]
                             + w20 * b0[j] + w21 * b1[j] + w22 * b2[j])
        for i in range(1, h - 1):
            r0, r1, r2 = xc[i - 1], xc[i], xc[i + 1]
            v0 = bm + (w01 * r0[0] + w02 * r0[1] + w11 * r1[0] + w12 * r1[1]
                       + w21 * r2[0] + w22 * r2[1])
            ve = bm + (w00 * r0[e - 1] + w01 * r0[e] + w10 * r1[e - 1] + w11 * r1[e]
                       + w20 * r2[e - 1] + w21 * r2[e])
            if leaky:
                v0 = v0 if v0 >= 0 else v0 * sl
                ve = ve if ve >= 0 else ve * sl
            yc[i, 0], yc[i, e] = v0, ve
    for i in (0, h - 1):
        r0 = xc[i - 1] if i > 0 else zero
        r1 = xc[i]
        r2 = xc[i + 1] if i + 1 < h else zero
        out = yc[i]
        out[0] = bm + (w01 * r0[0] + w02 * r0[1] + w11 * r1[0] + w12 * r1[1]
                       + w21 * r2[0] + w22 * r2[1])
        out[e] = bm + (w00 * r0[e - 1] + w01 * r0[e] + w10 * r1[e - 1] + w11 * r1[e]
                       + w20 * r2[e - 1] + w21 * r2[e])
        o, a0, a1, a2 = out[1:], r0[1:], r1[1:], r2[1:]
        b0, b1, b2 = r0[2:], r1[2:], r2[2:]
        for j in range(wd - 2):
            o[j] = bm + (w00 * r0[j] + w01 * a0[j] + w02 * b0[j]
                         + w10 * r1[j] + w11 * a1[j] + w12 * b1[j]
                         + w20 * r2[j] + w21 * a2[j] + w22 * b2[j])
        if leaky:
            act_row(out, np.float32(0), sl, 2, a, b)
    if not leaky and kind != 0:
        act_row(yf, np.float32(0), s, kind, a, b)


@njit(cache=True)
def _dw3x3_padded(x, w, bias, slope, y, mult, kind, a, b, xp, yp):
    """Depthwise 3x3, stride 1, pad 1 for narrow planes, where the per-row
    and per-border work of _dw3x3_plane dominates: each plane is copied into
    xp with a zero row above and below and one zero column between rows
    (row stride W + 1, which pads both the right of a row and the left of the
    next), then every output pixel is one flat loop over xp (into yp, same
    stride; the zero-column positions are computed and dropped) and the rows
    are copied out. xp: (H + 2) * (W + 1) + 1 floats, yp: H * (W + 1)."""
    h, wd = x.shape[2], x.shape[3]
    s_ = wd + 1
    span = h * s_ - 1
    xp[:] = 0
    leaky = kind == 2 or kind == 7
    for n in range(x.shape[0]):
        for m in range(y.shape[1]):
            xc, yc, k, bm = x[n, m // mult], y[n, m], w[m, 0], bias[m]
            sl = slope[m] if kind == 2 else np.float32(a)
            for i in range(h):
                src, dst = xc[i], xp[(i + 1) * s_ + 1:]
                for j in range(wd):
                    dst[j] = src[j]
            w00, w01, w02, w10, w11, w12 = k[0, 0], k[0, 1], k[0, 2], k[1, 0], k[1, 1], k[1, 2]
            w20, w21, w22 = k[2, 0], k[2, 1], k[2, 2]
            t0, t1, t2 = xp[0:], xp[1:], xp[2:]
            m0, m1, m2 = xp[s_:], xp[s_ + 1:], xp[s_ + 2:]
            b0, b1, b2 = xp[2 * s_:], xp[2 * s_ + 1:], xp[2 * s_ + 2:]
            if leaky:
                for q in range(span):
                    v = bm + (w00 * t0[q] + w01 * t1[q] + w02 * t2[q]
                              + w10 * m0[q] + w11 * m1[q] + w12 * m2[q]
                              + w20 * b0[q] + w21 * b1[q] + w22 * b2[q])
                    yp[q] = v if v >= 0 else v * sl
            else:
                for q in range(span):
                    yp[q] = bm + (w00 * t0[q] + w01 * t1[q] + w02 * t2[q]
                                  + w10 * m0[q] + w11 * m1[q] + w12 * m2[q]
                                  + w20 * b0[q] + w21 * b1[q] + w22 * b2[q])
            for i in range(h):
                src, dst = yp[i * s_:], yc[i]
                for j in range(wd):
                    dst[j] = src[j]
            if not leaky and kind != 0:
                act_row(yc.reshape(h * wd), np.float32(0), slope[m], kind, a, b)


@njit(cache=True)
def _transpose2(src, dst):
    """dst = src.T for 2-D arrays: strips of 8 source rows, so each write is
    8 contiguous floats and each read line is reused from cache."""
    r_, s_ = src.shape
    for r0 in range(0, r_ - 7, 8):
        for s in range(s_):
            d = dst[s, r0:r0 + 8]
            for i in range(8):
                d[i] = src[r0 + i, s]
    for r in range(r_ - r_ % 8, r_):
        for s in range(s_):
            dst[s, r] = src[r, s]


@njit(cache=True)
def _dw_nhwc(x, wt, taps, bias, slope, y, xt, yt, kind, a, b):
    """Depthwise conv (multiplier 1) for small planes, whose rows are too short
    to vectorize: transpose the image to channels-last in the workspace, then
    each output pixel is a sum of (weight row * input row) over all channels.
    taps[p] lists the input pixel of each tap for output pixel p (the zero row
    xt[H*W] for taps in the padding), in groups of three so that one pass
    accumulates three taps; wt (taps.shape[1], C) is zero for the padding taps."""
    n_, c_ = x.shape[0], x.shape[1]
    hw, ohw = xt.shape[0] - 1, yt.shape[0]
    xt[hw, :] = 0
    for n in range(n_):
        _transpose2(x[n].reshape(c_, hw), xt)
        for p in range(ohw):
            acc, tp = yt[p], taps[p]
            if tp.size == 9:  # 3x3: all taps in one pass, accumulator in registers
                x0, x1, x2, x3, x4 = xt[tp[0]], xt[tp[1]], xt[tp[2]], xt[tp[3]], xt[tp[4]]
                x5, x6, x7, x8 = xt[tp[5]], xt[tp[6]], xt[tp[7]], xt[tp[8]]
                w0, w1, w2, w3, w4, w5, w6, w7, w8 = (wt[0], wt[1], wt[2], wt[3], wt[4],
                                                      wt[5], wt[6], wt[7], wt[8])
                for c in range(c_):
                    acc[c] = bias[c] + (w0[c] * x0[c] + w1[c] * x1[c] + w2[c] * x2[c]
                                        + w3[c] * x3[c] + w4[c] * x4[c] + w5[c] * x5[c]
                                        + w6[c] * x6[c] + w7[c] * x7[c] + w8[c] * x8[c])
                act_vec(acc, slope, kind, a, b)
                continue
            acc[:] = bias
            for k in range(0, tp.size, 3):
                x0, x1, x2 = xt[tp[k]], xt[tp[k + 1]], xt[tp[k + 2]]
                w0, w1, w2 = wt[k], wt[k + 1], wt[k + 2]
                for c in range(c_):
                    acc[c] += w0[c] * x0[c] + w1[c] * x1[c] + w2[c] * x2[c]
            act_vec(acc, slope, kind, a, b)
        _transpose2(yt, y[n].reshape(c_, ohw))


def _nhwc_taps(h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw):
    """(OH*OW, K3) input pixel of every tap (h*w = the zero row), K3 = KH*KW
    rounded up to a multiple of 3."""
    k3 = -(-kh * kw // 3) * 3
    ih = (np.arange(oh) * sh - ph)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    iw = (np.arange(ow) * sw - pw)[None, :, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    ok = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
    taps = np.where(ok, ih * w + iw, h * w).reshape(oh * ow, kh * kw)
    pad = np.full((oh * ow, k3 - kh * kw), h * w)
    return np.ascontiguousarray(np.concatenate([taps, pad], 1), dtype=np.int64)


@njit(cache=True)
def _im2col(x, n, c0, cg, kh_, kw_, sh, sw, ph, pw, dh, dw, ow_, t0, col):
    """col[k, t] = padded x[n, c0 + ci, ih, iw] for output columns t0 .. t0+T,
    k = (ci, kh, kw) in weight order."""
    h, wd = x.shape[2], x.shape[3]
    t_ = col.shape[1]
    k = 0
    for ci in range(cg):
        xc = x[n, c0 + ci]
        for kh in range(kh_):
            for kw in range(kw_):
                crow, off = col[k], kw * dw - pw
                oh, o0, t = t0 // ow_, t0 % ow_, 0
                while t < t_:  # one output-row segment at a time
                    seg = min(ow_ - o0, t_ - t)
                    dst = crow[t:t + seg]
                    ih = oh * sh - ph + kh * dh
                    if ih < 0 or ih >= h:
                        dst[:] = 0
                    else:
                        lo, hi = _valid(o0 * sw + off, sw, seg, wd)
                        dst[:lo] = 0
                        dst[hi:] = 0
                        d, src = dst[lo:hi], xc[ih, (o0 + lo) * sw + off:]
                        if sw == 1:
                            for j in range(hi - lo):
                                d[j] = src[j]
                        else:
                            for j in range(hi - lo):
                                d[j] = src[j * sw]
                    t += seg
                    oh += 1
                    o0 = 0
                k += 1


register("Conv", infer, prepare)
