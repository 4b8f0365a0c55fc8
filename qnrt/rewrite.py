"""Load-time graph rewrites. Each is idempotent, so a graph that the exporter
already optimized passes through untouched (and its memory-mapped weights are
not copied).

- identities removed: Identity, Dropout (inference)
- batch norm folded into the preceding convolution (or Gemm-free standalone
  BatchNormalization left for its own kernel)
- activation fused into the preceding convolution: PRelu kept per channel,
  LeakyRelu becomes its one-slope case
"""
from __future__ import annotations

import numpy as np

from .graph import Graph, Node
from .ops import ACTIVATIONS

FUSABLE = frozenset(ACTIVATIONS)  # every activation fuses into a Conv's epilogue


def optimize(graph: Graph) -> Graph:
    remove_identities(graph)
    fold_batchnorm(graph)
    fuse_activations(graph)
    drop_unused_initializers(graph)
    return graph


def _single_consumer(users: dict, outputs: set, name: str) -> Node | None:
    """The one node reading `name` (not a graph output), else None. `users` is
    graph.consumers(), taken once per pass: the passes below keep it valid for
    every name they look up (each rewrite removes the only reader it checked)."""
    if name in outputs:
        return None
    readers = users.get(name, [])
    return readers[0] if len(readers) == 1 else None


def remove_identities(graph: Graph) -> None:
    """Identity and inference-mode Dropout nodes removed, their readers rewired
    to the source (chains followed, in any node order). Linear in the graph."""
    outputs = {o.name for o in graph.outputs}
    source: dict[str, str] = {}  # removed output -> the tensor it passed through
    kept = []
    for node in graph.nodes:
        passthrough = (node.op in ("Identity", "Dropout") and node.inputs and node.outputs
                       and not any(node.outputs[1:]))
        if passthrough and node.outputs[0] not in outputs:
            source[node.outputs[0]] = node.inputs[0]
        else:
            kept.append(node)

    def resolve(name: str) -> str:
        path, seen = [], set()
        while name in source and name not in seen:  # (a cycle is left for validate())
            path.append(name)
            seen.add(name)
            name = source[name]
        for p in path:  # path compression: each name is walked once
            source[p] = name
        return name

    for node in kept:
        node.inputs = [resolve(i) if i in source else i for i in node.inputs]
    graph.nodes = kept


def fold_batchnorm(graph: Graph) -> None:
    """Conv -> BatchNormalization becomes one Conv with scaled weights."""
    producers = graph.producers()
    users, outputs = graph.consumers(), {o.name for o in graph.outputs}
    consts = graph.initializers
    kept = []
    for node in graph.nodes:
        conv = producers.get(node.inputs[0]) if node.op == "BatchNormalization" else None
        if (conv is None or conv.op != "Conv" or conv.attrs.get("activation")
                or _single_consumer(users, outputs, conv.outputs[0]) is not node
                or not all(i in consts for i in node.inputs[1:5])
                or not all(i in consts for i in conv.inputs[1:3] if i)
                or not _bn_matches(consts, node, conv)):
            kept.append(node)  # (a mismatched one is refused by its own shape rule)
            continue
        scale, bias, mean, var = (consts[i].astype(np.float64) for i in node.inputs[1:5])
        with np.errstate(invalid="ignore", divide="ignore"):  # a negative variance: NaN, as ORT
            k = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        w = consts[conv.inputs[1]].astype(np.float64)
        b = consts[conv.inputs[2]].astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] \
            else np.zeros(w.shape[0])
        # a weight only this conv reads keeps its name (files stay readable)
        wname = conv.inputs[1] if len(users.get(conv.inputs[1], [])) == 1 \
            else graph.fresh_name(conv.inputs[1] + ".folded")
        old_b = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2] else ""
        bname = old_b if old_b and len(users.get(old_b, [])) == 1 \
            else graph.fresh_name((conv.name or conv.outputs[0]) + ".bias")
        consts[wname] = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        consts[bname] = ((b - mean) * k + bias).astype(np.float32)
        conv.inputs = [conv.inputs[0], wname, bname] + conv.inputs[3:]
        conv.outputs = [node.outputs[0]]
    graph.nodes = kept


def _bn_matches(consts: dict, bn, conv) -> bool:
    """The batch norm's four vectors, and the conv's bias, have one value per
    output channel of the conv's 4-D weight."""
    w = consts[conv.inputs[1]]
    if np.ndim(w) != 4 or len(bn.inputs) < 5:
        return False
    sizes = [np.size(consts[i]) for i in bn.inputs[1:5]]
    if len(conv.inputs) > 2 and conv.inputs[2]:
        sizes.append(np.size(consts[conv.inputs[2]]))
    return all(n == w.shape[0] for n in sizes)


def _channel_slope(slope: np.ndarray, channels: int) -> np.ndarray | None:
    """A PRelu slope broadcastable as one value per channel of NCHW, as (C,)."""
    s = np.asarray(slope, dtype=np.float32)
    if s.size == 1:
        return np.full(channels, s.reshape(-1)[0], dtype=np.float32)
    squeezed = s.reshape(s.shape[-3:] if s.ndim >= 3 else s.shape)
    if s.ndim >= 3 and squeezed.shape == (channels, 1, 1) and all(d == 1 for d in s.shape[:-3]):
        return squeezed.reshape(channels).copy()
    return None


def fuse_activations(graph: Graph) -> None:
    producers = graph.producers()
    users, outputs = graph.consumers(), {o.name for o in graph.outputs}
    consts = graph.initializers
    removed = set()
    for node in graph.nodes:
        if node.op not in FUSABLE:
            continue
        conv = producers.get(node.inputs[0])
        if (conv is None or conv.op != "Conv" or conv.attrs.get("activation")
                or _single_consumer(users, outputs, conv.outputs[0]) is not node):
            continue
        attrs = {"activation": node.op}
        extra = []
        cout = consts[conv.inputs[1]].shape[0] if conv.inputs[1] in consts else None
        if node.op in ("PRelu", "LeakyRelu"):
            if node.op == "PRelu":
                if node.inputs[1] not in consts or cout is None:
                    continue
                slope = _channel_slope(consts[node.inputs[1]], cout)
                if slope is None:
                    continue
            else:
                slope = np.full(cout or 0, node.attrs.get("alpha", 0.01), np.float32)
                if cout is None:
                    continue
            own = node.op == "PRelu" and len(users.get(node.inputs[1], [])) == 1
            sname = node.inputs[1] if own else graph.fresh_name(
                (node.name or node.outputs[0]) + ".slope")
            consts[sname] = slope
            attrs["activation"] = "PRelu"
            extra = [sname]
        elif node.op == "Clip":
            lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
            bounds = node.inputs[1:3] + ["", ""]
            if any(b and b not in consts for b in bounds[:2]):
                continue
            lo = float(consts[bounds[0]]) if bounds[0] else lo
            hi = float(consts[bounds[1]]) if bounds[1] else hi
            attrs.update(activation_min=float(lo), activation_max=float(hi))
        elif node.op == "HardSigmoid":
            attrs.update(activation_alpha=float(node.attrs.get("alpha", 0.2)),
                         activation_beta=float(node.attrs.get("beta", 0.5)))
        inputs = conv.inputs + [""] * (3 - len(conv.inputs))
        conv.inputs = inputs[:3] + extra if extra else conv.inputs
        conv.attrs = {**conv.attrs, **attrs}
        conv.outputs = [node.outputs[0]]
        removed.add(id(node))
        producers[node.outputs[0]] = conv
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def drop_unused_initializers(graph: Graph) -> None:
    used = {i for n in graph.nodes for i in n.inputs}
    for name in [k for k in graph.initializers if k not in used]:
        del graph.initializers[name]
        graph.encodings.pop(name, None)


WEIGHTS_INT8_INPUT = 4  # Conv input index of the per-output-channel scale (3 is PRelu's slope)


# The weight-bound layers: at QuickNet's 32x32 these are the 2x2, 512/1024-channel
# pointwise convs, which run as few-column products that stream W once. Smaller
# layers run through BLAS on dequantized weights: int8 would only cost a copy.
INT8_MIN_WEIGHTS = 512 * 1024


def quantize_pointwise_int8(graph: Graph, min_weights: int = INT8_MIN_WEIGHTS) -> Graph:
    """Opt-in (Session(weights="int8")), not part of optimize(): each 1x1
    stride-1 ungrouped unpadded Conv whose constant float weight (Cout, Cin,
    1, 1) has at least `min_weights` values gets an int8 weight q and a
    float32 per-output-channel scale (symmetric: W ~= scale[co] * q[co, ci],
    scale = max|W[co]| / 127) as input WEIGHTS_INT8_INPUT (4; inputs 2 and 3,
    bias and PRelu slope, padded with "" when absent), and attr
    weights_int8 = 1. The float32 array leaves the graph (its memory-mapped
    pages need not stay resident). Idempotent."""
    consts = graph.initializers
    users = graph.consumers()
    for node in graph.nodes:
        if node.op != "Conv" or node.attrs.get("weights_int8") or len(node.inputs) < 2:
            continue
        w = consts.get(node.inputs[1])
        if (w is None or w.dtype.kind != "f" or w.ndim != 4 or tuple(w.shape[2:]) != (1, 1)
                or w.size < min_weights or int(node.attrs.get("group", 1)) != 1
                or any(int(s) != 1 for s in node.attrs.get("strides", [1, 1]))
                or any(int(d) != 1 for d in node.attrs.get("dilations", [1, 1]))
                or any(int(p) != 0 for p in node.attrs.get("pads", [0, 0, 0, 0]))
                or len(node.inputs) > WEIGHTS_INT8_INPUT):
            continue
        w2 = np.asarray(w, dtype=np.float32).reshape(w.shape[0], -1)
        amax = np.abs(w2).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w2 / scale[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
        base = node.inputs[1]
        own = len(users.get(base, [])) == 1
        qname = graph.fresh_name(base + ".int8")
        consts[qname] = q
        sname = graph.fresh_name(base + ".scale")
        consts[sname] = scale
        if own:
            del consts[base]
        inputs = node.inputs + [""] * (WEIGHTS_INT8_INPUT - len(node.inputs))
        inputs[1] = qname
        node.inputs = inputs + [sname]
        node.attrs = {**node.attrs, "weights_int8": 1}
    drop_unused_initializers(graph)
    return graph
