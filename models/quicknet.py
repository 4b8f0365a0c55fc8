"""QuickNet (arXiv 1701.02291) as data: the layer table, and a builder that
turns it into a qnrt Graph with BatchNormalization and PRelu nodes unfused
(the neutral form every exporter and trainer shares).

Weight names (the neutral .npz layout, also used by tools/train.py):
    stem.conv.weight            (32, 3, 3, 3)
    <L>.bn.{scale,bias,mean,var}, <L>.prelu.slope       per channel
    sepK.dw.weight (C, 1, 3, 3), sepK.pw.weight (Cout, Cin, 1, 1)
    sepK.dw_bn.*, sepK.dw_prelu.slope, sepK.pw_bn.*, sepK.pw_prelu.slope
    head.conv.weight (classes, C, 1, 1), head.conv.bias (classes,)
"""
from __future__ import annotations

import numpy as np

from qnrt.graph import Graph, Node, ValueInfo

# (kind, channels): "conv" = 3x3 conv + BN + PReLU, "sep" = depthwise 3x3 + BN +
# PReLU + pointwise 1x1 + BN + PReLU, "pool" = maxpool 2x2/2, "head" = dropout,
# 1x1 conv to classes, global average pool, softmax.
LAYERS = (
    ("conv", 32),
    ("sep", 64), ("pool", 0),
    ("sep", 128), ("sep", 128), ("pool", 0),
    ("sep", 256), ("sep", 256), ("sep", 256), ("pool", 0),
    ("sep", 512), ("sep", 512), ("sep", 512), ("pool", 0),
    ("sep", 1024), ("sep", 1024), ("sep", 1024),
    ("head", 0),
)
BN_EPSILON = 1e-3  # Keras' default, which the paper trained with
PAPER_PARAMETERS = 3_560_000


def layer_plan(width: float = 1.0, num_classes: int = 10, in_channels: int = 3):
    """Yield (kind, name, in_channels, out_channels) for every layer."""
    c, sep = in_channels, 0
    for kind, channels in LAYERS:
        out = max(1, int(round(channels * width))) if channels else c
        if kind == "sep":
            sep += 1
            yield kind, f"sep{sep}", c, out
        elif kind == "conv":
            yield kind, "stem", c, out
        elif kind == "pool":
            yield kind, f"pool{sep}", c, c
        else:
            yield kind, "head", c, num_classes
        c = out


def weight_shapes(width: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> dict:
    shapes = {}

    def bn_prelu(prefix, bn, prelu, ch):
        for p in ("scale", "bias", "mean", "var"):
            shapes[f"{prefix}.{bn}.{p}"] = (ch,)
        shapes[f"{prefix}.{prelu}.slope"] = (ch,)

    for kind, name, cin, cout in layer_plan(width, num_classes, in_channels):
        if kind == "conv":
            shapes[f"{name}.conv.weight"] = (cout, cin, 3, 3)
            bn_prelu(name, "bn", "prelu", cout)
        elif kind == "sep":
            shapes[f"{name}.dw.weight"] = (cin, 1, 3, 3)
            bn_prelu(name, "dw_bn", "dw_prelu", cin)
            shapes[f"{name}.pw.weight"] = (cout, cin, 1, 1)
            bn_prelu(name, "pw_bn", "pw_prelu", cout)
        elif kind == "head":
            shapes[f"{name}.conv.weight"] = (cout, cin, 1, 1)
            shapes[f"{name}.conv.bias"] = (cout,)
    return shapes


def initial_weights(width: float = 1.0, num_classes: int = 10, seed: int = 0,
                    in_channels: int = 3) -> dict[str, np.ndarray]:
    """Deterministic initial weights: He-normal convolutions, identity batch norm
    statistics perturbed slightly (so folding is exercised), PReLU slope 0.25."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(width, num_classes, in_channels).items():
        kind = name.rsplit(".", 1)[-1]
        if kind == "weight":
            fan_in = int(np.prod(shape[1:]))
            w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif kind == "scale":
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif kind in ("bias", "mean"):
            w = 0.1 * rng.standard_normal(shape)
        elif kind == "var":
            w = 1.0 + 0.1 * rng.random(shape)
        else:  # slope
            w = np.full(shape, 0.25)
        weights[name] = w.astype(np.float32)
    return weights


def build(weights: dict[str, np.ndarray] | None = None, width: float = 1.0,
          num_classes: int = 10, input_size: int | None = 32, seed: int = 0,
          labels: list[str] | None = None, in_channels: int = 3) -> Graph:
    """QuickNet as a Graph. `input_size=None` leaves H and W symbolic."""
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for {num_classes} classes")
    expected = weight_shapes(width, num_classes, in_channels)
    if weights is None:
        weights = initial_weights(width, num_classes, seed, in_channels)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight '{name}' has shape {tuple(weights[name].shape)}, "
                             f"QuickNet needs {shape}")
    inits = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in expected}
    nodes: list[Node] = []
    x = "input"

    def conv(name, src, w, group, k, bias=None):
        pad = k // 2
        nodes.append(Node("Conv", [src, w] + ([bias] if bias else []), [name],
                          {"kernel_shape": [k, k], "strides": [1, 1], "dilations": [1, 1],
                           "pads": [pad] * 4, "group": group}, name))
        return name

    def bn_prelu(prefix, src, bn, prelu):
        b = f"{prefix}.{bn}"
        nodes.append(Node("BatchNormalization",
                          [src] + [f"{b}.{p}" for p in ("scale", "bias", "mean", "var")],
                          [b], {"epsilon": BN_EPSILON}, b))
        p = f"{prefix}.{prelu}"
        slope = f"{p}.slope"
        # ONNX PRelu broadcasts the slope against NCHW, so it is stored as (C, 1, 1)
        inits[slope] = inits[slope].reshape(-1, 1, 1)
        nodes.append(Node("PRelu", [b, slope], [p], {}, p))
        return p

    for kind, name, cin, cout in layer_plan(width, num_classes, in_channels):
        if kind == "conv":
            x = bn_prelu(name, conv(f"{name}.conv", x, f"{name}.conv.weight", 1, 3), "bn", "prelu")
        elif kind == "sep":
            x = bn_prelu(name, conv(f"{name}.dw", x, f"{name}.dw.weight", cin, 3), "dw_bn", "dw_prelu")
            x = bn_prelu(name, conv(f"{name}.pw", x, f"{name}.pw.weight", 1, 1), "pw_bn", "pw_prelu")
        elif kind == "pool":
            nodes.append(Node("MaxPool", [x], [name], {"kernel_shape": [2, 2], "strides": [2, 2],
                                                     "pads": [0, 0, 0, 0]}, name))
            x = name
        else:
            nodes.append(Node("Dropout", [x], ["head.dropout"], {"ratio": 0.5}, "head.dropout"))
            x = conv("head.conv", "head.dropout", "head.conv.weight", 1, 1, "head.conv.bias")
            nodes.append(Node("GlobalAveragePool", [x], ["head.gap"], {}, "head.gap"))
            nodes.append(Node("Flatten", ["head.gap"], ["logits"], {"axis": 1}, "head.flatten"))
            nodes.append(Node("Softmax", ["logits"], ["probabilities"], {"axis": 1}, "head.softmax"))
    hw = input_size if input_size else "H"
    graph = Graph(nodes, [ValueInfo("input", ("N", in_channels, hw, input_size or "W"))],
                  [ValueInfo("probabilities", ("N", num_classes))], inits,
                  {"model.name": "QuickNet", "model.width": float(width),
                   "preprocess.size": [input_size or 32, input_size or 32],
                   "labels": list(labels or [str(i) for i in range(num_classes)])},
                  name="QuickNet")
    graph.validate()
    return graph


def keras_parameter_count(width: float = 1.0, num_classes: int = 10) -> int:
    """Parameters counted as Keras counts them (BN moving mean/variance included)."""
    return int(sum(np.prod(s) for s in weight_shapes(width, num_classes).values()))
