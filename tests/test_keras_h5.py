"""Keras 2 .h5 files -> qnrt Graph (exporters/keras_h5.py), checked against a
NumPy reference of the same Keras layers computed channels-last exactly as
Keras/TensorFlow does (TF "same" padding, channels-last Flatten order, ...).

No TensorFlow here: the .h5 files are written with h5py in the layout
`model.save("m.h5")` produces in Keras 2.x (root attributes model_config /
keras_version / backend, weights in model_weights/<layer>/<layer>/<var>:0
listed by the group's weight_names attribute).
"""
from __future__ import annotations

import json
import zipfile
import zlib

import h5py
import numpy as np
import pytest

from helpers import assert_close
from qnrt.exporters.keras_h5 import from_h5
from qnrt import Session
from qnrt.graph import GraphError

RNG_SEED = 1234


# ------------------------------------------------------------------ writer

def write_keras_h5(path, model_config: dict, weights: dict, layer_names: list,
                   keras_version="2.13.1", chunk_weight_names=False, weight_names_attr=True):
    """Write `model_config` and weights {layer: [(var, array)]} as Keras 2's
    model.save() does (save_weights_to_hdf5_group)."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = keras_version
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config).encode("utf8")
        f.attrs["training_config"] = json.dumps({"loss": "categorical_crossentropy"}).encode()
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([n.encode("utf8") for n in layer_names], dtype="S")
        mw.attrs["backend"] = "tensorflow"
        mw.attrs["keras_version"] = keras_version
        for lname in layer_names:
            g = mw.create_group(lname)
            entries = weights.get(lname, [])
            # a var with a "/" is a full variable name (a nested model's weights)
            names = [(var if "/" in var else f"{lname}/{var}").encode("utf8") + b":0"
                     for var, _ in entries]
            if weight_names_attr:
                if chunk_weight_names and names:  # as Keras splits an oversized attribute
                    for k, part in enumerate(np.array_split(np.array(names, dtype="S"),
                                                            len(names))):
                        g.attrs[f"weight_names{k}"] = part
                else:
                    g.attrs["weight_names"] = np.array(names, dtype="S") if names else []
            for n, (_, a) in zip(names, entries):
                ds = g.create_dataset(n.decode(), a.shape, dtype=a.dtype)
                if a.shape:
                    ds[:] = a
                else:
                    ds[()] = a


# ---------------------------------------------- mini Keras: config + reference

def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def tf_same_pads(n, k, s, d=1):
    ext = (k - 1) * d + 1
    out = -(-n // s)
    total = max((out - 1) * s + ext - n, 0)
    return total // 2, total - total // 2


def pad_like_tf(x, k, s, d, padding, value=0.0):
    if padding == "valid":
        return x
    t, b = tf_same_pads(x.shape[1], k[0], s[0], d[0])
    l, r = tf_same_pads(x.shape[2], k[1], s[1], d[1])
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=value)


def windows(xp, k, s, d=(1, 1)):
    """(i, j, strided NHWC slice) for every kernel tap of a valid window."""
    oh = (xp.shape[1] - ((k[0] - 1) * d[0] + 1)) // s[0] + 1
    ow = (xp.shape[2] - ((k[1] - 1) * d[1] + 1)) // s[1] + 1
    assert oh >= 1 and ow >= 1
    for i in range(k[0]):
        for j in range(k[1]):
            yield i, j, xp[:, i * d[0]:i * d[0] + (oh - 1) * s[0] + 1:s[0],
                           j * d[1]:j * d[1] + (ow - 1) * s[1] + 1:s[1], :]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


ACT = {
    "linear": lambda x: x, "relu": lambda x: np.maximum(x, 0), "sigmoid": sigmoid,
    "relu6": lambda x: np.clip(x, 0, 6), "tanh": np.tanh, "softmax": softmax,
    "hard_sigmoid": lambda x: np.clip(0.2 * x + 0.5, 0, 1),  # Keras 2
    "swish": lambda x: x * sigmoid(x),
}


class KT:
    """A Keras tensor: the producing layer/node and its reference value (NHWC)."""

    def __init__(self, layer, node, value):
        self.layer, self.node, self.value = layer, node, value


class Layer:
    cls = "Layer"

    def __init__(self, name, **cfg):
        self.name, self.cfg = name, cfg
        self.weights = None  # [(var, array)], made at the first call like Keras' build()
        self.inbound = []

    def config(self):
        return {"name": self.name, "trainable": True, "dtype": "float32", **self.cfg}

    def build(self, rng, *shapes):
        return []

    def forward(self, *xs):
        raise NotImplementedError

    def w(self, var):
        return dict(self.weights)[var].astype(np.float64)

    def __call__(self, *inputs):
        ins = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], list) else list(inputs)
        if self.weights is None:
            rng = np.random.default_rng(zlib.crc32(self.name.encode()) + RNG_SEED)
            self.weights = self.build(rng, *[t.value.shape for t in ins])
        self.inbound.append([[t.layer.name, t.node, 0, {}] for t in ins])
        out = self.forward(*[t.value for t in ins])
        return KT(self, len(self.inbound) - 1, out)


def _f32(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


class InputLayer(Layer):
    cls = "InputLayer"

    def __init__(self, name, shape, value):
        super().__init__(name, batch_input_shape=[None, *shape], sparse=False, ragged=False)
        self.weights, self.value = [], value

    def config(self):
        return {"batch_input_shape": self.cfg["batch_input_shape"], "dtype": "float32",
                "sparse": False, "ragged": False, "name": self.name}


def Input(name, value, shape=None):
    layer = InputLayer(name, shape or value.shape[1:], value)
    return KT(layer, 0, value.astype(np.float64))


_INIT = {"kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
         "bias_initializer": {"class_name": "Zeros", "config": {}}, "kernel_regularizer": None,
         "bias_regularizer": None, "activity_regularizer": None, "kernel_constraint": None,
         "bias_constraint": None}


class Conv2D(Layer):
    cls = "Conv2D"

    def __init__(self, name, filters, k, strides=1, padding="valid", use_bias=True,
                 activation="linear", dilation=1, groups=1, data_format="channels_last"):
        super().__init__(name, filters=filters, kernel_size=list(_pair(k)),
                         strides=list(_pair(strides)), padding=padding, data_format=data_format,
                         dilation_rate=list(_pair(dilation)), groups=groups,
                         activation=activation, use_bias=use_bias, **_INIT)

    def build(self, rng, shape):
        c = shape[-1] if self.cfg["data_format"] == "channels_last" else shape[1]
        kh, kw = self.cfg["kernel_size"]
        fan = kh * kw * c // self.cfg["groups"]
        ws = [("kernel", _f32(rng, (kh, kw, c // self.cfg["groups"], self.cfg["filters"]),
                              np.sqrt(2.0 / fan)))]
        if self.cfg["use_bias"]:
            ws.append(("bias", _f32(rng, (self.cfg["filters"],), 0.1)))
        return ws

    def forward(self, x):
        first = self.cfg["data_format"] == "channels_first"
        if first:
            x = x.transpose(0, 2, 3, 1)
        c, g = self.cfg, self.cfg["groups"]
        k, s, d = c["kernel_size"], c["strides"], c["dilation_rate"]
        xp = pad_like_tf(x, k, s, d, c["padding"])
        kern = self.w("kernel")
        cin, cout = kern.shape[2], kern.shape[3]
        y = 0
        for i, j, win in windows(xp, k, s, d):
            parts = [np.einsum("nhwc,cf->nhwf", win[..., q * cin:(q + 1) * cin],
                               kern[i, j, :, q * (cout // g):(q + 1) * (cout // g)])
                     for q in range(g)]
            y = y + np.concatenate(parts, axis=-1)
        if c["use_bias"]:
            y = y + self.w("bias")
        y = ACT[c["activation"]](y)
        return y.transpose(0, 3, 1, 2) if first else y


def depthwise_ref(x, dk, k, s, d, padding):
    xp = pad_like_tf(x, k, s, d, padding)
    y = 0
    for i, j, win in windows(xp, k, s, d):
        y = y + win[..., :, None] * dk[i, j]  # (n, h, w, c, m)
    return y.reshape(*y.shape[:3], -1)  # output channel c * m + mm


class DepthwiseConv2D(Layer):
    cls = "DepthwiseConv2D"

    def __init__(self, name, k, strides=1, padding="valid", depth_multiplier=1, use_bias=True,
                 activation="linear", dilation=1):
        cfg = {kk: v for kk, v in _INIT.items() if not kk.startswith("kernel")}
        super().__init__(name, kernel_size=list(_pair(k)), strides=list(_pair(strides)),
                         padding=padding, data_format="channels_last",
                         dilation_rate=list(_pair(dilation)), groups=1, activation=activation,
                         use_bias=use_bias, depth_multiplier=depth_multiplier,
                         depthwise_initializer={"class_name": "GlorotUniform",
                                                "config": {"seed": None}},
                         depthwise_regularizer=None, depthwise_constraint=None, **cfg)

    def build(self, rng, shape):
        kh, kw = self.cfg["kernel_size"]
        m = self.cfg["depth_multiplier"]
        ws = [("depthwise_kernel", _f32(rng, (kh, kw, shape[-1], m), np.sqrt(2.0 / (kh * kw))))]
        if self.cfg["use_bias"]:
            ws.append(("bias", _f32(rng, (shape[-1] * m,), 0.1)))
        return ws

    def forward(self, x):
        c = self.cfg
        y = depthwise_ref(x, self.w("depthwise_kernel"), c["kernel_size"], c["strides"],
                          c["dilation_rate"], c["padding"])
        if c["use_bias"]:
            y = y + self.w("bias")
        return ACT[c["activation"]](y)


class SeparableConv2D(Layer):
    cls = "SeparableConv2D"

    def __init__(self, name, filters, k, strides=1, padding="valid", depth_multiplier=1,
                 use_bias=True, activation="linear", dilation=1):
        super().__init__(name, filters=filters, kernel_size=list(_pair(k)),
                         strides=list(_pair(strides)), padding=padding,
                         data_format="channels_last", dilation_rate=list(_pair(dilation)),
                         groups=1, activation=activation, use_bias=use_bias,
                         depth_multiplier=depth_multiplier,
                         bias_initializer={"class_name": "Zeros", "config": {}})

    def build(self, rng, shape):
        kh, kw = self.cfg["kernel_size"]
        m, c, f = self.cfg["depth_multiplier"], shape[-1], self.cfg["filters"]
        ws = [("depthwise_kernel", _f32(rng, (kh, kw, c, m), np.sqrt(2.0 / (kh * kw)))),
              ("pointwise_kernel", _f32(rng, (1, 1, c * m, f), np.sqrt(2.0 / (c * m))))]
        if self.cfg["use_bias"]:
            ws.append(("bias", _f32(rng, (f,), 0.1)))
        return ws

    def forward(self, x):
        c = self.cfg
        y = depthwise_ref(x, self.w("depthwise_kernel"), c["kernel_size"], c["strides"],
                          c["dilation_rate"], c["padding"])
        y = np.einsum("nhwc,cf->nhwf", y, self.w("pointwise_kernel")[0, 0])
        if c["use_bias"]:
            y = y + self.w("bias")
        return ACT[c["activation"]](y)


class BatchNormalization(Layer):
    cls = "BatchNormalization"

    def __init__(self, name, epsilon=1e-3, center=True, scale=True, axis=3):
        super().__init__(name, axis=[axis], momentum=0.99, epsilon=epsilon, center=center,
                         scale=scale)

    def build(self, rng, shape):
        ch = shape[self.cfg["axis"][0]]
        ws = []
        if self.cfg["scale"]:
            ws.append(("gamma", (1 + 0.2 * rng.standard_normal(ch)).astype(np.float32)))
        if self.cfg["center"]:
            ws.append(("beta", _f32(rng, (ch,), 0.2)))
        ws.append(("moving_mean", _f32(rng, (ch,), 0.3)))
        ws.append(("moving_variance", (0.5 + rng.random(ch)).astype(np.float32)))
        return ws

    def forward(self, x):
        shape = [1] * x.ndim
        shape[self.cfg["axis"][0]] = -1
        d = dict(self.weights)
        ch = d["moving_mean"].size
        g = d.get("gamma", np.ones(ch)).astype(np.float64).reshape(shape)
        b = d.get("beta", np.zeros(ch)).astype(np.float64).reshape(shape)
        m, v = self.w("moving_mean").reshape(shape), self.w("moving_variance").reshape(shape)
        return (x - m) / np.sqrt(v + self.cfg["epsilon"]) * g + b


class PReLU(Layer):
    cls = "PReLU"

    def __init__(self, name, shared_axes=(1, 2)):
        super().__init__(name, alpha_initializer={"class_name": "Constant",
                                                  "config": {"value": 0.25}},
                         alpha_regularizer=None, alpha_constraint=None,
                         shared_axes=list(shared_axes) if shared_axes else None)

    def build(self, rng, shape):
        p = list(shape[1:])
        for a in self.cfg["shared_axes"] or []:
            p[a - 1] = 1
        return [("alpha", (0.25 + 0.1 * rng.standard_normal(p)).astype(np.float32))]

    def forward(self, x):
        return np.maximum(x, 0) - self.w("alpha") * np.maximum(-x, 0)


class LeakyReLU(Layer):
    cls = "LeakyReLU"

    def __init__(self, name, alpha=0.3):
        super().__init__(name, alpha=alpha)

    def forward(self, x):
        return np.where(x > 0, x, self.cfg["alpha"] * x)


class ReLU(Layer):
    cls = "ReLU"

    def __init__(self, name, max_value=None, negative_slope=0.0):
        super().__init__(name, max_value=max_value, negative_slope=negative_slope, threshold=0.0)

    def forward(self, x):
        y = np.where(x > 0, x, self.cfg["negative_slope"] * x)
        return y if self.cfg["max_value"] is None else np.minimum(y, self.cfg["max_value"])


class Activation(Layer):
    cls = "Activation"

    def __init__(self, name, activation):
        super().__init__(name, activation=activation)

    def forward(self, x):
        return ACT[self.cfg["activation"]](x)


class _Pool(Layer):
    def __init__(self, name, pool=2, strides=None, padding="valid"):
        super().__init__(name, pool_size=list(_pair(pool)),
                         padding=padding, strides=list(_pair(strides or pool)),
                         data_format="channels_last")


class MaxPooling2D(_Pool):
    cls = "MaxPooling2D"

    def forward(self, x):
        c = self.cfg
        xp = pad_like_tf(x, c["pool_size"], c["strides"], (1, 1), c["padding"], -np.inf)
        return np.max([w for _, _, w in windows(xp, c["pool_size"], c["strides"])], axis=0)


class AveragePooling2D(_Pool):
    cls = "AveragePooling2D"

    def forward(self, x):  # TF "same": the average over the taps inside the image
        c = self.cfg
        xp = pad_like_tf(x, c["pool_size"], c["strides"], (1, 1), c["padding"])
        ones = pad_like_tf(np.ones_like(x[..., :1]), c["pool_size"], c["strides"], (1, 1),
                           c["padding"])
        total = sum(w for _, _, w in windows(xp, c["pool_size"], c["strides"]))
        count = sum(w for _, _, w in windows(ones, c["pool_size"], c["strides"]))
        return total / count


class GlobalAveragePooling2D(Layer):
    cls = "GlobalAveragePooling2D"

    def __init__(self, name, keepdims=False):
        super().__init__(name, data_format="channels_last", keepdims=keepdims)

    def forward(self, x):
        return x.mean(axis=(1, 2), keepdims=self.cfg["keepdims"])


class GlobalMaxPooling2D(GlobalAveragePooling2D):
    cls = "GlobalMaxPooling2D"

    def forward(self, x):
        return x.max(axis=(1, 2), keepdims=self.cfg["keepdims"])


class Flatten(Layer):
    cls = "Flatten"

    def __init__(self, name, data_format="channels_last"):
        super().__init__(name, data_format=data_format)

    def forward(self, x):
        if self.cfg["data_format"] == "channels_first" and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        return x.reshape(x.shape[0], -1)


class Dense(Layer):
    cls = "Dense"

    def __init__(self, name, units, activation="linear", use_bias=True):
        super().__init__(name, units=units, activation=activation, use_bias=use_bias, **_INIT)

    def build(self, rng, shape):
        ws = [("kernel", _f32(rng, (shape[-1], self.cfg["units"]), np.sqrt(1.0 / shape[-1])))]
        if self.cfg["use_bias"]:
            ws.append(("bias", _f32(rng, (self.cfg["units"],), 0.1)))
        return ws

    def forward(self, x):
        y = x @ self.w("kernel")
        if self.cfg["use_bias"]:
            y = y + self.w("bias")
        return ACT[self.cfg["activation"]](y)


class Dropout(Layer):
    cls = "Dropout"

    def __init__(self, name, rate=0.5):
        super().__init__(name, rate=rate, noise_shape=None, seed=None)

    def forward(self, x):
        return x


class Add(Layer):
    cls = "Add"

    def forward(self, *xs):
        return sum(xs)


class Concatenate(Layer):
    cls = "Concatenate"

    def __init__(self, name, axis=-1):
        super().__init__(name, axis=axis)

    def forward(self, *xs):
        return np.concatenate(xs, axis=self.cfg["axis"])


class ZeroPadding2D(Layer):
    cls = "ZeroPadding2D"

    def __init__(self, name, padding):
        super().__init__(name, padding=padding, data_format="channels_last")

    def forward(self, x):
        (t, b), (l, r) = self.cfg["padding"]
        return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))


class Reshape(Layer):
    cls = "Reshape"

    def __init__(self, name, target_shape):
        super().__init__(name, target_shape=list(target_shape))

    def forward(self, x):
        return x.reshape(x.shape[0], *self.cfg["target_shape"])


class Permute(Layer):
    cls = "Permute"

    def __init__(self, name, dims):
        super().__init__(name, dims=list(dims))

    def forward(self, x):
        return x.transpose(0, *self.cfg["dims"])


class Opaque(Layer):
    """A layer we only need the config of (the converter must refuse it)."""

    def __init__(self, name, cls, **cfg):
        super().__init__(name, **cfg)
        self.cls = cls

    def forward(self, x):
        return x


def functional(name, inputs, outputs):
    """Keras 2 functional model_config, layer list and weights from the traced calls."""
    layers, seen = [], set()

    def visit(t):
        if t.layer.name in seen:
            return
        for node in t.layer.inbound:
            for ref in node:
                visit(_BY_NAME[ref[0]])
        seen.add(t.layer.name)
        layers.append(t.layer)

    _BY_NAME.clear()
    for t in _ALL:
        _BY_NAME[t.layer.name] = t
    for t in outputs:
        visit(t)
    cfg = {"name": name, "trainable": True,
           "layers": [{"class_name": l.cls, "config": l.config(), "name": l.name,
                       "inbound_nodes": l.inbound} for l in layers],
           "input_layers": [[t.layer.name, 0, 0] for t in inputs],
           "output_layers": [[t.layer.name, t.node, 0] for t in outputs]}
    return {"class_name": "Functional", "config": cfg}, layers


_ALL: list = []
_BY_NAME: dict = {}


def trace(t):
    _ALL.append(t)
    return t


def sequential(name, x, layers, input_name="input_1"):
    """Run `layers` one after the other on x; Keras 2 Sequential config."""
    t = Input(input_name, x)
    inp = t.layer
    for layer in layers:
        t = layer(t)
    cfg = {"name": name, "layers": [{"class_name": "InputLayer", "config": inp.config()}]
           + [{"class_name": l.cls, "config": l.config()} for l in layers]}
    return {"class_name": "Sequential", "config": cfg}, layers, t.value


def save_model(path, model_config, layers, **kw):
    write_keras_h5(path, model_config, {l.name: l.weights or [] for l in layers},
                   [l.name for l in layers], **kw)
    return str(path)


def run_qnrt(graph, x_nhwc, n_outputs=1):
    sess = Session(graph)
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2), dtype=np.float32)
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return outs if n_outputs > 1 else outs[0]


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------- tests

def quicknet_like(x):
    return sequential("quicknet_like", x, [
        Conv2D("conv2d", 8, 3, padding="same", use_bias=False),
        BatchNormalization("batch_normalization"),
        PReLU("p_re_lu", shared_axes=(1, 2)),
        SeparableConv2D("separable_conv2d", 16, 3, padding="same", use_bias=False),
        BatchNormalization("batch_normalization_1"),
        PReLU("p_re_lu_1", shared_axes=(1, 2)),
        DepthwiseConv2D("depthwise_conv2d", 3, padding="same", use_bias=False),
        BatchNormalization("batch_normalization_2"),
        LeakyReLU("leaky_re_lu", alpha=0.1),
        MaxPooling2D("max_pooling2d", 2),
        Dropout("dropout", 0.5),
        Conv2D("conv2d_1", 10, 1),
        GlobalAveragePooling2D("global_average_pooling2d"),
        Activation("activation", "softmax"),
    ])


def test_quicknet_like_sequential_matches_keras_reference(tmp_path):
    x = images((2, 16, 16, 3))
    config, layers, ref = quicknet_like(x)
    path = save_model(tmp_path / "q.h5", config, layers)
    graph = from_h5(path)
    assert graph.inputs[0].shape == ("N", 3, 16, 16)  # NCHW
    assert graph.metadata["model.source"] == "keras-h5"
    assert graph.metadata["model.name"] == "quicknet_like"
    assert graph.metadata["model.keras_version"] == "2.13.1"
    ops = [n.op for n in graph.nodes]
    assert ops.count("Conv") == 5 and ops.count("BatchNormalization") == 3
    assert ops.count("PRelu") == 2 and "Transpose" not in ops
    prelu_slopes = [graph.initializers[n.inputs[1]] for n in graph.nodes if n.op == "PRelu"]
    assert [s.shape for s in prelu_slopes] == [(8, 1, 1), (16, 1, 1)]
    sess = Session(graph)  # folds BN into the convs and fuses the activations
    assert not {"BatchNormalization", "PRelu", "LeakyRelu"} & {n.op for n in sess.graph.nodes}
    xin = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    (ours,) = sess.run(None, {"input_1": xin})
    assert ours.shape == (2, 10)
    assert_close(ours, ref)


def test_functional_add_concat_zeropad_stride2_avgpool_flatten_dense(tmp_path):
    _ALL.clear()
    x = images((2, 15, 13, 4), seed=1)
    inp = trace(Input("input_1", x))
    a = trace(Conv2D("conv2d", 8, 3, padding="same", activation="relu")(inp))
    b = trace(BatchNormalization("bn")(trace(Conv2D("conv2d_1", 8, 1)(a))))
    c = trace(Add("add")([a, b]))
    d = trace(Concatenate("concatenate")([c, a]))
    e = trace(ZeroPadding2D("zero_padding2d", [[1, 2], [0, 1]])(d))
    f = trace(Conv2D("conv2d_2", 12, 3, strides=2, padding="valid", use_bias=False)(e))
    g = trace(AveragePooling2D("average_pooling2d", 3, strides=2, padding="same")(f))
    h = trace(Flatten("flatten")(g))
    out = trace(Dense("dense", 5)(trace(Dropout("dropout", 0.2)(h))))
    config, layers = functional("model", [inp], [out, g])
    path = save_model(tmp_path / "f.h5", config, [l for l in layers])
    graph = from_h5(path)
    ops = [n.op for n in graph.nodes]
    assert "Pad" not in ops  # folded into the stride-2 valid conv
    conv2 = next(n for n in graph.nodes if n.op == "Conv" and "conv2d_2" in n.name)
    assert conv2.attrs["pads"] == [1, 0, 2, 1] and conv2.attrs["strides"] == [2, 2]
    pool = next(n for n in graph.nodes if n.op == "AveragePool")
    assert pool.attrs["count_include_pad"] == 0
    assert ops.count("Transpose") == 1  # only before Flatten: NCHW -> Keras' HWC order
    assert ops.index("Transpose") == ops.index("Flatten") - 1
    assert [o.name for o in graph.outputs] == ["dense", "average_pooling2d"]
    logits, pooled = run_qnrt(graph, x, n_outputs=2)
    assert_close(logits, out.value)
    assert_close(pooled, g.value.transpose(0, 3, 1, 2))  # 4-D outputs are NCHW


@pytest.mark.parametrize("size", [7, 8, 9, 10])
@pytest.mark.parametrize("kernel", [2, 3])
def test_stride2_same_padding_odd_and_even_sizes(tmp_path, size, kernel):
    x = images((1, size, size + 1, 3), seed=size)
    config, layers, ref = sequential("s2", x, [
        Conv2D("conv2d", 4, kernel, strides=2, padding="same"),
        DepthwiseConv2D("dw", kernel, strides=2, padding="same", depth_multiplier=2),
        Conv2D("grouped", 4, kernel, padding="same", groups=2),
        SeparableConv2D("sep", 5, kernel, strides=1, padding="same", activation="relu")]
        if size < 9 else [
        MaxPooling2D("mp", kernel, strides=2, padding="same"),
        AveragePooling2D("ap", kernel, strides=2, padding="same"),
        Conv2D("conv2d", 4, kernel, strides=2, padding="same", dilation=1)])
    graph = from_h5(save_model(tmp_path / "s.h5", config, layers))
    got = run_qnrt(graph, x)
    assert_close(got, ref.transpose(0, 3, 1, 2))


def test_unknown_input_size_uses_same_upper_and_runs_any_size(tmp_path):
    x = images((1, 11, 8, 3), seed=3)
    config, layers, ref = sequential("fcn", x, [
        Conv2D("conv2d", 6, 3, strides=2, padding="same"),
        MaxPooling2D("mp", 3, strides=2, padding="same"),
        Conv2D("conv2d_1", 4, 3, padding="same", dilation=2),
        GlobalMaxPooling2D("gmp")])
    config["config"]["layers"][0]["config"]["batch_input_shape"] = [None, None, None, 3]
    path = save_model(tmp_path / "fcn.h5", config, layers)
    graph = from_h5(path)
    assert graph.inputs[0].shape == ("N", 3, "H", "W")
    auto = [n.attrs.get("auto_pad") for n in graph.nodes if n.op in ("Conv", "MaxPool")]
    assert auto == ["SAME_UPPER", "SAME_UPPER", None]  # stride 1: pads known without size
    assert_close(run_qnrt(graph, x), ref)
    # with the size given, every pad is explicit
    fixed = from_h5(path, input_shape=(1, 3, 11, 8))
    assert fixed.inputs[0].shape == (1, 3, 11, 8)
    assert all("auto_pad" not in n.attrs for n in fixed.nodes)
    assert_close(run_qnrt(fixed, x), ref)


def test_activations_reshape_permute_relu6_and_dense_batchnorm(tmp_path):
    _ALL.clear()
    x = images((3, 6, 6, 2), seed=4)
    inp = trace(Input("input_1", x))
    a = trace(Conv2D("conv2d", 4, 3, padding="same", activation="hard_sigmoid")(inp))
    b = trace(ReLU("re_lu", max_value=0.6)(a))
    c = trace(Conv2D("conv2d_1", 4, 1, activation="swish")(b))
    d = trace(Reshape("reshape", (9, 16))(c))       # channels-last element order
    e = trace(Permute("permute", (2, 1))(d))         # (16, 9)
    f = trace(Dense("dense_3d", 3, activation="tanh")(e))   # Dense on a 3-D tensor
    g = trace(Flatten("flatten")(f))
    h = trace(Dense("dense", 8, activation="relu6")(g))
    i = trace(BatchNormalization("bn", axis=1, center=False)(h))
    j = trace(ReLU("leaky_capped", max_value=1.0, negative_slope=0.2)(i))
    out = trace(Dense("out", 4, activation="softmax", use_bias=False)(j))
    config, layers = functional("zoo", [inp], [out, f])
    graph = from_h5(save_model(tmp_path / "z.h5", config, layers))
    ops = [n.op for n in graph.nodes]
    assert {"HardSigmoid", "Clip", "Sigmoid", "Mul", "Reshape", "MatMul", "Tanh", "Gemm",
            "Softmax", "LeakyRelu"} <= set(ops)
    assert ops.count("Transpose") == 2  # before Reshape; Permute's own transpose for Dense
    probs, feats = run_qnrt(graph, x, n_outputs=2)
    assert_close(probs, out.value)
    assert_close(feats, f.value)


def test_prelu_per_pixel_alpha_needs_the_fixed_input_size(tmp_path):
    x = images((2, 5, 4, 3), seed=5)
    config, layers, ref = sequential("pp", x, [
        Conv2D("conv2d", 3, 3, padding="same"), PReLU("p_re_lu", shared_axes=None),
        Flatten("flatten"), Dense("dense", 2)])
    path = save_model(tmp_path / "pp.h5", config, layers)
    graph = from_h5(path)
    slope = next(graph.initializers[n.inputs[1]] for n in graph.nodes if n.op == "PRelu")
    assert slope.shape == (3, 5, 4)  # (C, H, W)
    assert_close(run_qnrt(graph, x), ref)
    with pytest.raises(GraphError, match="p_re_lu.*per-pixel"):
        from_h5(path, input_shape=(1, 3, 8, 8))


def test_channels_first_layers(tmp_path):
    x = images((2, 3, 7, 6), seed=6)  # NCHW, as the Keras model itself takes it
    config, layers, ref = sequential("cf", x, [
        Conv2D("conv2d", 4, 3, strides=2, padding="same", data_format="channels_first"),
        Flatten("flatten", data_format="channels_first"), Dense("dense", 3)])
    graph = from_h5(save_model(tmp_path / "cf.h5", config, layers))
    assert graph.metadata["model.keras_data_format"] == "channels_first"
    assert graph.inputs[0].shape == ("N", 3, 7, 6)
    (ours,) = Session(graph).run(None, {graph.inputs[0].name: x})
    assert_close(ours, ref)


def test_zero_padding_before_max_pool_stays_a_pad_node(tmp_path):
    from qnrt.ops import supported_ops

    x = images((1, 6, 6, 2), seed=7)
    config, layers, ref = sequential("zp", x, [
        ZeroPadding2D("zero_padding2d", [[1, 1], [2, 0]]), MaxPooling2D("mp", 2),
        ZeroPadding2D("zero_padding2d_1", [[1, 0], [0, 1]]),
        AveragePooling2D("ap", 2, strides=1, padding="valid")])
    graph = from_h5(save_model(tmp_path / "zp.h5", config, layers))
    ops = [n.op for n in graph.nodes]
    assert ops == ["Pad", "MaxPool", "AveragePool"]  # -inf vs 0: MaxPool cannot absorb it
    pad = graph.nodes[0]
    assert graph.initializers[pad.inputs[1]].tolist() == [0, 0, 1, 2, 0, 0, 1, 0]
    ap = graph.nodes[2]
    assert ap.attrs["pads"] == [1, 0, 0, 1] and ap.attrs["count_include_pad"] == 1
    if "Pad" in supported_ops():
        assert_close(run_qnrt(graph, x), ref.transpose(0, 3, 1, 2))


def test_unsupported_layers_are_all_named_in_one_error(tmp_path):
    x = images((1, 4, 4, 2))
    config, layers, _ = sequential("bad", x, [
        Conv2D("conv2d", 2, 3, padding="same"),
        Opaque("my_lambda", "Lambda", function=["4wEAAAAAAAAA", None, None],
               function_type="lambda", arguments={}),
        Reshape("reshape", (16, 2)),
        Opaque("lstm", "LSTM", units=4, return_sequences=False),
        Activation("act", "relu")])
    config["config"]["layers"][-1]["config"]["activation"] = "gelu"
    path = save_model(tmp_path / "bad.h5", config, layers)
    with pytest.raises(GraphError) as info:
        from_h5(path)
    msg = str(info.value)
    for part in ("'my_lambda' (Lambda)", "'lstm' (LSTM)", "'act' (Activation)", "gelu",
                 "3 unsupported layers"):
        assert part in msg, msg
    assert "conv2d'" not in msg.split("Supported")[0]


def test_not_keras_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not HDF5 at all" * 10)
    with pytest.raises(GraphError, match="not an HDF5 file"):
        from_h5(junk)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("data", data=np.zeros(3))
    with pytest.raises(GraphError, match="model_config"):
        from_h5(plain)
    weights_only = tmp_path / "w.h5"
    with h5py.File(weights_only, "w") as f:
        f.attrs["layer_names"] = np.array([b"dense"], dtype="S")
    with pytest.raises(GraphError, match="save_weights"):
        from_h5(weights_only)
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f.attrs["model_config"] = b'{"class_name": "Sequential", "config": {"layers": ['
    with pytest.raises(GraphError, match="not valid JSON"):
        from_h5(broken)
    archive = tmp_path / "m.keras"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(GraphError, match="Keras 3"):
        from_h5(archive)
    # a model whose weights are missing from the file
    x = images((1, 4, 4, 2))
    config, layers, _ = sequential("nw", x, [Conv2D("conv2d", 2, 3)])
    path = save_model(tmp_path / "nw.h5", config, layers)
    with h5py.File(path, "a") as f:
        del f["model_weights/conv2d/conv2d/kernel:0"]
    with pytest.raises(GraphError, match="conv2d.*kernel"):
        from_h5(path)


def test_weight_layouts_chunked_names_and_no_names_attribute(tmp_path):
    x = images((2, 8, 8, 3), seed=8)
    config, layers, ref = quicknet_like(x)
    for kw in ({"chunk_weight_names": True}, {"weight_names_attr": False}):
        path = save_model(tmp_path / f"{len(kw)}{list(kw)[0]}.h5", config, layers, **kw)
        assert_close(run_qnrt(from_h5(path), x), ref)


def test_input_shape_is_nchw_and_a_nhwc_shape_is_refused_with_a_hint(tmp_path):
    x = images((1, 8, 8, 3), seed=9)
    config, layers, _ = quicknet_like(x)
    path = save_model(tmp_path / "q.h5", config, layers)
    assert from_h5(path, input_shape=(4, 3, 8, 8)).inputs[0].shape == (4, 3, 8, 8)
    with pytest.raises(GraphError, match="NCHW input, e.g. 1,3,8,8"):
        from_h5(path, input_shape=(1, 8, 8, 3))


def test_keras3_style_functional_config(tmp_path):
    """Keras 3 legacy .h5: dict inbound nodes, batch_shape, negative_slope."""
    x = images((1, 6, 6, 3), seed=10)
    conv = Conv2D("conv2d", 4, 3, padding="same")
    y = conv(Input("input_layer", x))
    z = np.where(y.value > 0, y.value, 0.1 * y.value)

    def kt(name):
        return {"class_name": "__keras_tensor__",
                "config": {"shape": [None, 6, 6, 4], "dtype": "float32",
                           "keras_history": [name, 0, 0]}}

    cfg = {"name": "k3", "trainable": True, "layers": [
        {"module": "keras.layers", "class_name": "InputLayer", "name": "input_layer",
         "config": {"batch_shape": [None, 6, 6, 3], "dtype": "float32", "sparse": False,
                    "name": "input_layer"}, "registered_name": None, "inbound_nodes": []},
        {"module": "keras.layers", "class_name": "Conv2D", "name": "conv2d",
         "config": conv.config(), "registered_name": None,
         "inbound_nodes": [{"args": [kt("input_layer")], "kwargs": {}}]},
        {"module": "keras.layers", "class_name": "LeakyReLU", "name": "leaky",
         "config": {"name": "leaky", "negative_slope": 0.1}, "registered_name": None,
         "inbound_nodes": [{"args": [kt("conv2d")], "kwargs": {}}]}],
        "input_layers": [["input_layer", 0, 0]], "output_layers": [["leaky", 0, 0]]}
    path = tmp_path / "k3.h5"
    write_keras_h5(path, {"class_name": "Functional", "config": cfg},
                   {"conv2d": conv.weights}, ["input_layer", "conv2d", "leaky"],
                   keras_version="3.3.3")
    graph = from_h5(path)
    assert_close(run_qnrt(graph, x), z.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("outer", ["Functional", "Sequential"])
def test_nested_model_is_inlined(tmp_path, outer):
    """A Sequential used as a layer: its weights live in one group named after
    it, trainable ones first, as '<inner layer>/<var>:0'."""
    x = images((2, 8, 8, 3), seed=12)
    inner_cfg, inner_layers, feat = sequential("backbone", x, [
        Conv2D("c1", 4, 3, padding="same"), BatchNormalization("bn1"), ReLU("relu1"),
        Conv2D("c2", 5, 1)], input_name="backbone_input")
    backbone = Opaque("backbone", outer)
    gap, dense = GlobalAveragePooling2D("gap"), Dense("dense", 3, activation="softmax")
    out = dense(gap(KT(backbone, 0, feat)))
    nested = {"class_name": "Sequential", "config": inner_cfg["config"], "name": "backbone"}
    if outer == "Functional":
        layers = [{"class_name": "InputLayer", "name": "input_1", "inbound_nodes": [],
                   "config": Input("input_1", x).layer.config()},
                  {**nested, "inbound_nodes": [[["input_1", 0, 0, {}]]]},
                  {"class_name": "GlobalAveragePooling2D", "name": "gap", "config": gap.config(),
                   "inbound_nodes": gap.inbound},
                  {"class_name": "Dense", "name": "dense", "config": dense.config(),
                   "inbound_nodes": dense.inbound}]
        config = {"class_name": "Functional", "config": {
            "name": "outer", "layers": layers, "input_layers": [["input_1", 0, 0]],
            "output_layers": [["dense", 0, 0]]}}
    else:
        config = {"class_name": "Sequential", "config": {"name": "outer", "layers": [
            {"class_name": "InputLayer", "config": Input("input_1", x).layer.config()},
            nested, {"class_name": "GlobalAveragePooling2D", "config": gap.config()},
            {"class_name": "Dense", "config": dense.config()}]}}
    c1, bn1, c2 = (dict(l.weights) for l in (inner_layers[0], inner_layers[1], inner_layers[3]))
    group = ([("c1/kernel", c1["kernel"]), ("c1/bias", c1["bias"]), ("bn1/gamma", bn1["gamma"]),
              ("bn1/beta", bn1["beta"]), ("c2/kernel", c2["kernel"]), ("c2/bias", c2["bias"])]
             + [("bn1/moving_mean", bn1["moving_mean"]),
                ("bn1/moving_variance", bn1["moving_variance"])])
    path = tmp_path / "nested.h5"
    write_keras_h5(path, config, {"backbone": group, "dense": dense.weights},
                   ["input_1", "backbone", "gap", "dense"] if outer == "Functional"
                   else ["backbone", "gap", "dense"])
    graph = from_h5(path)
    assert {n.name for n in graph.nodes if n.op == "Conv"} == {"backbone/c1", "backbone/c2"}
    assert_close(run_qnrt(graph, x), out.value)


def test_shared_layer_two_inputs_and_outputs_named_after_layers(tmp_path):
    _ALL.clear()
    xa, xb = images((2, 6, 6, 3), seed=13), images((2, 6, 6, 3), seed=14)
    a, b = trace(Input("image_a", xa)), trace(Input("image_b", xb))
    shared = Conv2D("shared_conv", 4, 3, padding="same", activation="relu")
    fa, fb = trace(shared(a)), trace(shared(b))  # one layer, two calls (nodes 0 and 1)
    s = trace(Add("add")([fa, fb]))
    r = trace(Reshape("to_nhwc_order", (6, 6, 4))(s))  # 4-D output of a Reshape
    config, layers = functional("siamese", [a, b], [r, fb])
    graph = from_h5(save_model(tmp_path / "shared.h5", config, layers))
    assert [v.name for v in graph.inputs] == ["image_a", "image_b"]
    assert [v.name for v in graph.outputs] == ["to_nhwc_order", "shared_conv:1"]
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert len(convs) == 2 and convs[0].inputs[1] == convs[1].inputs[1]  # one weight
    sess = Session(graph)
    got = sess.run(None, {"image_a": np.ascontiguousarray(xa.transpose(0, 3, 1, 2)),
                          "image_b": np.ascontiguousarray(xb.transpose(0, 3, 1, 2))})
    assert_close(got[0], r.value.transpose(0, 3, 1, 2))
    assert_close(got[1], fb.value.transpose(0, 3, 1, 2))


def test_model_without_input_shape_needs_one(tmp_path):
    x = images((1, 8, 8, 3), seed=15)
    config, layers, ref = sequential("noshape", x, [Conv2D("conv2d", 2, 3, strides=2,
                                                          padding="same")])
    config["config"]["layers"] = config["config"]["layers"][1:]  # old Keras: no InputLayer
    path = save_model(tmp_path / "noshape.h5", config, layers)
    with pytest.raises(GraphError, match="no shape in the model; pass the input shape"):
        from_h5(path)
    graph = from_h5(path, input_shape=(1, 3, 8, 8))
    assert graph.inputs[0].shape == (1, 3, 8, 8)
    assert_close(run_qnrt(graph, x), ref.transpose(0, 3, 1, 2))


def test_convert_h5_to_qnb_end_to_end(tmp_path):
    from qnrt.exporters.convert import convert

    x = images((2, 16, 16, 3), seed=11)
    config, layers, ref = quicknet_like(x)
    src = save_model(tmp_path / "q.h5", config, layers)
    dst = tmp_path / "q.qnb"
    summary = convert(src, str(dst), input_shape=(1, 3, 16, 16))
    assert summary["nodes_after"] < summary["nodes_before"]
    sess = Session(str(dst))
    assert sess.metadata["model.source"] == "keras-h5"
    (ours,) = sess.run(None, {sess.get_inputs()[0].name:
                              np.ascontiguousarray(x[:1].transpose(0, 3, 1, 2))})
    assert_close(ours, ref[:1])
