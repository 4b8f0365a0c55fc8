"""Keras HDF5 model files (``model.save("m.h5")`` in Keras 2.x / tf.keras) -> qnrt Graph.

No TensorFlow or Keras is imported: the file is read with h5py. What is read:

* the root attribute ``model_config`` (JSON: Sequential, Functional or Model),
  ``keras_version`` and ``backend``;
* the weights under ``model_weights/<layer>/``, in the order of the layer
  group's ``weight_names`` attribute (chunked ``weight_names0, 1, ...`` too),
  or, when that attribute is missing, every dataset below the group. A weight
  is matched by its variable name (``kernel``, ``gamma``, ...) and, if the
  names are not the usual ones, by position in that order.

Layout (the one design decision that matters to users)
------------------------------------------------------
Keras runs channels-last (NHWC); the qnrt IR runs NCHW. The converted graph
**takes NCHW input** (N, C, H, W) -- ``qnrt run`` preprocesses images to
NCHW -- and 4-D graph outputs are NCHW too. Weights are transposed once at
conversion: Conv2D kernels (kh, kw, cin, cout) -> (cout, cin, kh, kw),
DepthwiseConv2D (kh, kw, cin, m) -> (cin*m, 1, kh, kw) with group=cin, the
pointwise half of SeparableConv2D like a 1x1 Conv2D; Dense stays (in, out) in
a Gemm with transB=0. Every tensor remembers how its IR layout relates to the
Keras one, and a Transpose is inserted only where Keras semantics depend on
the order of the elements: Flatten and Reshape see the channels-last
(H, W, C) order, so a Dense after Flatten uses its Keras kernel unchanged.

Padding "same" follows TensorFlow (the odd pad goes at the end): explicit
asymmetric ``pads`` when the spatial size is known (or the stride is 1), else
``auto_pad="SAME_UPPER"``. "same" average pooling does not count the padding
(count_include_pad=0). ZeroPadding2D becomes a ``Pad`` node, folded into the
following Conv (or a zero-padded AveragePool) when that is its only consumer.

Supported layers (``SUPPORTED``): InputLayer, Conv2D (groups, dilation),
DepthwiseConv2D, SeparableConv2D, Dense (2-D: Gemm; N-D: MatMul + Add),
BatchNormalization (scale/center optional), PReLU (per channel, or per pixel
for a fixed input size), LeakyReLU, ReLU (max_value, negative_slope),
Activation / inline ``activation=`` (linear, relu, relu6, sigmoid, tanh,
softmax, hard_sigmoid, swish/silu, hard_silu, leaky_relu), Softmax,
Max/AveragePooling2D, GlobalAverage/GlobalMaxPooling2D (keepdims), Flatten,
Reshape, Permute, Add, Subtract, Multiply, Average, Concatenate,
ZeroPadding2D, Rescaling, and Dropout and the other inference no-ops.
Sequential and functional models (Keras 2 list or Keras 3 dict
``inbound_nodes``), shared layers, several inputs/outputs, and nested models
(inlined as '<outer>/<inner>' layers) are handled. Anything else raises one
GraphError naming every unsupported layer.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from qnrt.graph import Graph, GraphError, Node, ValueInfo, unique_name

__all__ = ["from_h5", "read_h5", "SUPPORTED", "ACTIVATIONS"]

NCHW = (0, 3, 1, 2)  # IR axis i holds Keras (NHWC) axis NCHW[i]
MODEL_CLASSES = ("Sequential", "Functional", "Model")
PASS_THROUGH = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                "GaussianDropout", "GaussianNoise", "AlphaDropout", "ActivityRegularization",
                "Identity")
# activation names (inline `activation=` and the Activation layer)
ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "hard_sigmoid",
               "swish", "silu", "hard_silu", "hard_swish", "leaky_relu")
_HINTS = {
    "Lambda": "arbitrary Python code cannot be converted; replace it with built-in layers",
    "TFOpLambda": "a raw TensorFlow op recorded as a layer; use a Keras layer instead",
    "SlicingOpLambda": "a raw TensorFlow slicing op; use a Keras layer instead",
}


# ----------------------------------------------------------------- reading

@dataclass
class KerasFile:
    path: str
    config: dict  # the parsed model_config: {"class_name": ..., "config": ...}
    weights: dict  # layer name -> [(weight name, ndarray)] in the saved order
    keras_version: str = ""
    backend: str = ""


def _text(v) -> str:
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bytes, bytearray, np.bytes_)):
        return bytes(v).decode("utf-8")
    return str(v)


def _attr_list(group, name) -> list[str] | None:
    """A list-of-strings attribute as Keras writes it: whole, or split into
    name0, name1, ... when it exceeded the HDF5 object header limit."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    if f"{name}0" not in group.attrs:
        return None
    out, k = [], 0
    while f"{name}{k}" in group.attrs:
        out += [_text(v) for v in np.atleast_1d(group.attrs[f"{name}{k}"])]
        k += 1
    return out


def read_h5(path) -> KerasFile:
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        if zipfile.is_zipfile(path):
            raise GraphError(f"{path}: a Keras 3 '.keras' zip archive, not a Keras HDF5 "
                             "model; re-save it with model.save('model.h5') (legacy HDF5 "
                             "format) and convert that") from None
        raise GraphError(f"{path}: not an HDF5 file, so not a Keras .h5 model "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
            from None
    with f:
        if "model_config" not in f.attrs:
            if "layer_names" in f.attrs or "model_weights" in f:
                raise GraphError(f"{path}: holds Keras weights but no architecture (no "
                                 "'model_config' attribute; saved with save_weights()?); "
                                 "save the whole model with model.save('model.h5')")
            raise GraphError(f"{path}: an HDF5 file without a 'model_config' attribute: not a "
                             "Keras model saved with model.save('model.h5')")
        try:
            config = json.loads(_text(f.attrs["model_config"]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise GraphError(f"{path}: the 'model_config' attribute is not valid JSON "
                             f"({exc}); the file is corrupt") from None
        if not isinstance(config, dict) or "config" not in config:
            raise GraphError(f"{path}: 'model_config' is not a Keras model description "
                             "(expected {\"class_name\": ..., \"config\": ...})")
        keras_version = _text(f.attrs.get("keras_version", ""))
        backend = _text(f.attrs.get("backend", ""))
        root = f["model_weights"] if "model_weights" in f else f
        keras_version = keras_version or _text(root.attrs.get("keras_version", ""))
        backend = backend or _text(root.attrs.get("backend", ""))
        names = _attr_list(root, "layer_names")
        if names is None:
            names = [k for k in root.keys() if isinstance(root[k], h5py.Group)]
        weights = {}
        try:
            for lname in names:
                g = root.get(lname)
                if g is None or not isinstance(g, h5py.Group):
                    continue
                wnames = _attr_list(g, "weight_names")
                if wnames is None:  # no attribute: every dataset below the group
                    wnames = []
                    g.visititems(lambda n, obj: wnames.append(n)
                                 if isinstance(obj, h5py.Dataset) else None)
                entries = []
                for w in wnames:
                    if w not in g:
                        raise GraphError(f"{path}: layer '{lname}' lists weight '{w}', which "
                                         "is not in the file; the file is corrupt or truncated")
                    entries.append((w, np.asarray(g[w][()])))
                weights[lname] = entries
        except (OSError, KeyError) as exc:
            raise GraphError(f"{path}: cannot read the weights ({exc}); the file is corrupt "
                             "or truncated") from None
    return KerasFile(path, config, weights, keras_version, backend)


# ------------------------------------------------------- model description

@dataclass
class Layer:
    name: str
    cls: str
    config: dict
    calls: list  # per call (Keras "node"): the input refs (layer, node_index, tensor_index)


@dataclass
class Model:
    name: str
    layers: list  # [Layer], InputLayers included
    inputs: list  # refs
    outputs: list  # refs


def _refs(x) -> list[tuple]:
    if not x:
        return []
    if isinstance(x, dict):  # Keras 3 may store a dict of named inputs/outputs
        x = list(x.values())
    if isinstance(x[0], str):
        x = [x]
    out = []
    for r in x:
        if isinstance(r, (list, tuple)) and r and isinstance(r[0], str):
            out.append((r[0], int(r[1]) if len(r) > 1 else 0, int(r[2]) if len(r) > 2 else 0))
        else:
            out += _refs(r)
    return out


def _keras3_history(x, out):
    """Collect keras_history refs from a Keras 3 call's args, in order."""
    if isinstance(x, dict):
        if x.get("class_name") == "__keras_tensor__":
            h = x.get("config", {}).get("keras_history")
            if h:
                out.append((h[0], int(h[1]), int(h[2])))
        else:
            for v in x.values():
                _keras3_history(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _keras3_history(v, out)
    return out


def _call_refs(node) -> list[tuple]:
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        return _keras3_history(node.get("args", []), [])
    if node and isinstance(node[0], str):  # a single flat [name, node, tensor, kwargs]
        node = [node]
    return [(e[0], int(e[1]), int(e[2]) if len(e) > 2 else 0) for e in node]


def _batch_shape(cfg) -> list | None:
    for key in ("batch_input_shape", "batch_shape"):
        if cfg.get(key):
            return list(cfg[key])
    return None


def parse_model(top: dict) -> Model:
    cls, cfg = top.get("class_name"), top.get("config")
    if cls not in MODEL_CLASSES:
        raise GraphError(f"model class '{cls}' is not a Sequential or functional model "
                         "(subclassed models cannot be saved to .h5 with their architecture)")
    if cls == "Sequential":
        entries = cfg["layers"] if isinstance(cfg, dict) else cfg
        name = cfg.get("name", "sequential") if isinstance(cfg, dict) else "sequential"
        if not entries:
            raise GraphError(f"Sequential model '{name}' has no layers")
        layers = []
        first = entries[0]
        if first.get("class_name") == "InputLayer":
            inp = Layer(first["config"].get("name", "input_1"), "InputLayer",
                        first["config"], [])
            entries = entries[1:]
        else:
            shape = _batch_shape(first.get("config", {}))
            if shape is None and isinstance(cfg, dict) and cfg.get("build_input_shape"):
                shape = list(cfg["build_input_shape"])
            inp = Layer(first.get("config", {}).get("name", "layer") + "_input", "InputLayer",
                        {"batch_input_shape": shape}, [])
        layers.append(inp)
        prev = inp.name
        for e in entries:
            lcfg = e.get("config", {})
            lname = lcfg.get("name") or e.get("name") or f"layer_{len(layers)}"
            layers.append(Layer(lname, e.get("class_name", "?"), lcfg, [[(prev, 0, 0)]]))
            prev = lname
        return Model(name, layers, [(inp.name, 0, 0)], [(prev, 0, 0)])
    name = cfg.get("name", "model")
    layers = []
    for e in cfg.get("layers", []):
        lcfg = e.get("config", {}) or {}
        lname = e.get("name") or lcfg.get("name")
        calls = [_call_refs(n) for n in e.get("inbound_nodes", []) or []]
        layers.append(Layer(lname, e.get("class_name", "?"), lcfg, calls))
    return Model(name, layers, _refs(cfg.get("input_layers")), _refs(cfg.get("output_layers")))


def inline_nested(model: Model, lookup, weights_out: dict, prefix: str = "",
                  enclosing: list | None = None) -> Model:
    """Replace every nested model (a Sequential/Functional used as a layer) by
    its layers, renamed '<outer>/<inner>'. Keras saves a nested model's weights
    in one group named after it, with variable names '<inner layer>/<var>:0';
    `lookup(name)` gives a layer's saved weights, `weights_out` receives them
    under the inlined names. `enclosing` is the weight group of the model this
    one is nested in (a model nested twice may have no variables named after it)."""
    alias: dict[tuple, tuple] = {}

    def resolve(ref):
        while ref in alias:
            ref = alias[ref]
        return ref

    layers = []
    for l in model.layers:
        calls = [[resolve(r) for r in call] for call in l.calls]
        if l.cls not in MODEL_CLASSES:
            layers.append(Layer(l.name, l.cls, l.config, calls))
            weights_out[prefix + l.name] = lookup(l.name)
            continue
        outer = l.name
        group = lookup(outer) or enclosing or []

        def sub_lookup(name, group=group):
            return [e for e in group if name in e[0].split("/")[:-1]]

        sub_weights: dict = {}
        sub = inline_nested(parse_model({"class_name": l.cls, "config": l.config}),
                            sub_lookup, sub_weights, enclosing=group)
        for k, call in enumerate(calls):
            if len(call) != len(sub.inputs):
                raise GraphError(f"nested model '{outer}' takes {len(sub.inputs)} inputs, "
                                 f"call {k} gives it {len(call)}")
            pre = f"{outer}/" if len(calls) == 1 else f"{outer}_{k}/"
            feeds = dict(zip(sub.inputs, call))

            def rename(ref, pre=pre, feeds=feeds):
                return feeds[ref] if ref in feeds else (pre + ref[0], ref[1], ref[2])

            for s in sub.layers:
                if s.cls == "InputLayer":
                    continue
                layers.append(Layer(pre + s.name, s.cls, s.config,
                                    [[rename(r) for r in c] for c in s.calls]))
                weights_out[prefix + pre + s.name] = sub_weights.get(s.name, [])
            for t, ref in enumerate(sub.outputs):
                alias[(outer, k, t)] = rename(ref)
    return Model(model.name, layers, [resolve(r) for r in model.inputs],
                 [resolve(r) for r in model.outputs])


# -------------------------------------------------------------- conversion

@dataclass
class T:
    """A Keras tensor: its IR name, its Keras shape (batch first, None unknown)
    and perm: IR axis i holds Keras axis perm[i]."""
    name: str
    shape: tuple
    perm: tuple

    @property
    def rank(self):
        return len(self.shape)


def _ident(rank):
    return tuple(range(rank))


def _pair(v, n=2):
    if isinstance(v, (list, tuple)):
        v = list(v)
        return tuple(int(i) for i in (v * n if len(v) == 1 else v))
    return (int(v),) * n


def _act_name(act) -> str:
    if act is None:
        return "linear"
    if isinstance(act, dict):  # Keras 3 serialized function
        c = act.get("config")
        return str(c if isinstance(c, str) else act.get("class_name", "?"))
    return str(act)


def _axis_of(layer, default=-1):
    a = layer.config.get("axis", default)
    if isinstance(a, (list, tuple)):
        if len(a) != 1:
            raise GraphError(f"layer '{layer.name}' ({layer.cls}): only one axis is supported, "
                             f"got {a}")
        a = a[0]
    return int(a)


class _Converter:
    def __init__(self, kf: KerasFile, input_shape=None):
        self.kf = kf
        self.layer_weights: dict = {}
        self.model = inline_nested(parse_model(kf.config),
                                   lambda n: kf.weights.get(n, []), self.layer_weights)
        try:
            self.keras3 = int(kf.keras_version.split(".")[0]) >= 3
        except ValueError:
            self.keras3 = False
        self.input_shape = tuple(int(d) for d in input_shape) if input_shape else None
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}
        self.taken: set[str] = set()
        self.tensors: dict[tuple, T] = {}
        self._layouts: dict[tuple, str] = {}
        self._consts_by_base: dict[str, list] = {}
        self.layer: Layer | None = None
        fmts = [l.config.get("data_format") for l in self.model.layers
                if isinstance(l.config, dict) and l.config.get("data_format")]
        self.data_format = ("channels_first" if fmts.count("channels_first") > len(fmts) / 2
                            else "channels_last")

    # -- naming and emission -------------------------------------------------
    def fresh(self, base: str) -> str:
        return unique_name(base, self.taken)

    def const(self, base: str, value, dtype=np.float32) -> str:
        value = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        for name in self._consts_by_base.get(base, []):  # a shared layer's second call
            old = self.inits[name]
            if old.dtype == value.dtype and old.shape == value.shape and \
                    np.array_equal(old, value):
                return name
        name = self.fresh(base)
        self.inits[name] = value
        self._consts_by_base.setdefault(base, []).append(name)
        return name

    def emit(self, op, inputs, attrs=None, hint=None) -> str:
        base = self.layer.name if self.layer else "graph"
        out = self.fresh(f"{base}/{hint or op}")
        self.nodes.append(Node(op, list(inputs), [out], dict(attrs or {}), out))
        return out

    def as_layout(self, t: T, q) -> str:
        """The IR name of t laid out as transpose(keras_tensor, q)."""
        q = tuple(q)
        r = tuple(t.perm.index(a) for a in q)
        if r == _ident(t.rank):
            return t.name
        key = (t.name, r)
        if key not in self._layouts:
            self._layouts[key] = self.emit("Transpose", [t.name], {"perm": list(r)},
                                           hint="transpose")
        return self._layouts[key]

    def fail(self, msg):
        raise GraphError(f"layer '{self.layer.name}' ({self.layer.cls}): {msg}")

    # -- weights ---------------------------------------------------------------
    def weights(self, names: list[str], present: dict | None = None) -> list:
        """This layer's weights named `names` (those with present[name] False
        are absent and come back as None), matched by variable name, else by
        the saved order."""
        present = present or {}
        want = [n for n in names if present.get(n, True)]
        entries = self.layer_weights.get(self.layer.name, [])
        base = [w.split("/")[-1].split(":")[0] for w, _ in entries]
        found = {}
        if all(n in base for n in want):
            for n in want:
                found[n] = entries[base.index(n)][1]
        elif len(entries) == len(want):
            found = {n: a for n, (_, a) in zip(want, entries)}
        else:
            self.fail(f"the file holds weights {[w for w, _ in entries]}, expected {want}")
        out = []
        for n in names:
            a = found.get(n)
            if a is not None:
                a = np.asarray(a)
                if a.dtype.kind != "f":
                    self.fail(f"weight '{n}' has dtype {a.dtype}, expected floating point")
                a = a.astype(np.float32)
            out.append(a)
        return out

    # -- activations -------------------------------------------------------------
    def activation(self, t: T, act) -> T:
        name = _act_name(act)
        axis = t.perm.index(t.rank - 1)
        if name == "linear":
            return t
        if name == "relu":
            y = self.emit("Relu", [t.name])
        elif name == "relu6":
            y = self.clip(t.name, 0.0, 6.0)
        elif name == "sigmoid":
            y = self.emit("Sigmoid", [t.name])
        elif name == "tanh":
            y = self.emit("Tanh", [t.name])
        elif name == "softmax":
            y = self.emit("Softmax", [t.name], {"axis": axis})
        elif name == "hard_sigmoid":  # Keras 2: clip(0.2x + 0.5); Keras 3: relu6(x + 3) / 6
            alpha = 1.0 / 6.0 if self.keras3 else 0.2
            y = self.emit("HardSigmoid", [t.name], {"alpha": alpha, "beta": 0.5})
        elif name in ("swish", "silu"):
            s = self.emit("Sigmoid", [t.name])
            y = self.emit("Mul", [t.name, s], hint="swish")
        elif name in ("hard_silu", "hard_swish"):
            y = self.emit("HardSwish", [t.name])
        elif name == "leaky_relu":  # Keras 3 function, default negative_slope 0.2
            y = self.emit("LeakyRelu", [t.name], {"alpha": 0.2})
        else:
            self.fail(f"activation '{name}' is not supported")
        return T(y, t.shape, t.perm)

    def clip(self, x: str, lo: float, hi: float) -> str:
        base = self.layer.name
        return self.emit("Clip", [x, self.const(f"{base}/min", np.float32(lo)),
                                  self.const(f"{base}/max", np.float32(hi))])

    # -- spatial helpers ---------------------------------------------------------
    def spatial(self, t: T):
        """(IR name in NCHW, perm of that view, (C, H, W), data_format)."""
        if t.rank != 4:
            self.fail(f"needs a 4-D input, got Keras shape {_fmt_shape(t.shape)}")
        fmt = self.layer.config.get("data_format") or "channels_last"
        q = NCHW if fmt == "channels_last" else _ident(4)
        return self.as_layout(t, q), q, tuple(t.shape[a] for a in q[1:]), fmt

    @staticmethod
    def spatial_out(name, q, c, h, w) -> T:
        nchw = (None, c, h, w)
        shape = [None] * 4
        for i, a in enumerate(q):
            shape[a] = nchw[i]
        return T(name, tuple(shape), q)

    def window(self, padding, size, kernel, strides, dilations):
        """ONNX pads (or auto_pad) and output size for Keras/TF 'valid'/'same'."""
        padding = str(padding).lower()
        ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        if padding == "valid":
            out = [None if n is None else (n - e) // s + 1
                   for n, e, s in zip(size, ext, strides)]
            if any(o is not None and o < 1 for o in out):
                self.fail(f"window {ext} is larger than the input {list(size)}")
            return {"pads": [0, 0, 0, 0]}, out
        if padding != "same":
            self.fail(f"padding '{padding}' is not supported")
        begin, end, out = [], [], []
        for n, e, s in zip(size, ext, strides):
            o = None if n is None else -(-n // s)
            if n is None and s != 1:
                return {"auto_pad": "SAME_UPPER"}, [None if n is None else -(-n // s)
                                                    for n, s in zip(size, strides)]
            total = e - 1 if n is None else max((o - 1) * s + e - n, 0)
            begin.append(total // 2)  # TF puts the odd pixel at the end
            end.append(total - total // 2)
            out.append(o)
        return {"pads": begin + end}, out

    # -- layers ------------------------------------------------------------------
    def conv2d(self, ins):
        t, cfg = ins[0], self.layer.config
        x, q, (c, h, w), _ = self.spatial(t)
        k, s = _pair(cfg["kernel_size"]), _pair(cfg.get("strides", 1))
        d, groups = _pair(cfg.get("dilation_rate", 1)), int(cfg.get("groups", 1) or 1)
        kernel, bias = self.weights(["kernel", "bias"], {"bias": cfg.get("use_bias", True)})
        if kernel.ndim != 4 or kernel.shape[:2] != k or (c is not None and
                                                         kernel.shape[2] * groups != c):
            self.fail(f"kernel shape {kernel.shape} does not fit kernel_size {k}, groups "
                      f"{groups} and {c} input channels")
        cout = kernel.shape[3]
        inputs = [x, self.const(f"{self.layer.name}/kernel", kernel.transpose(3, 2, 0, 1))]
        if bias is not None:
            inputs.append(self.const(f"{self.layer.name}/bias", bias.reshape(cout)))
        attrs, (oh, ow) = self.window(cfg.get("padding", "valid"), (h, w), k, s, d)
        y = self.emit("Conv", inputs, {"kernel_shape": list(k), "strides": list(s),
                                       "dilations": list(d), "group": groups, **attrs})
        return self.activation(self.spatial_out(y, q, cout, oh, ow), cfg.get("activation"))

    def _depthwise(self, x, c, h, w, dk, cfg, bias=None, hint=None):
        k, s = _pair(cfg["kernel_size"]), _pair(cfg.get("strides", 1))
        d = _pair(cfg.get("dilation_rate", 1))
        if dk.ndim != 4 or dk.shape[:2] != k or (c is not None and dk.shape[2] != c):
            self.fail(f"depthwise kernel shape {dk.shape} does not fit kernel_size {k} and "
                      f"{c} input channels")
        cin, mult = dk.shape[2], dk.shape[3]
        # TF's output channel c*mult + m reads input channel c with dk[..., c, m]
        wt = dk.transpose(2, 3, 0, 1).reshape(cin * mult, 1, k[0], k[1])
        inputs = [x, self.const(f"{self.layer.name}/depthwise_kernel", wt)]
        if bias is not None:
            inputs.append(self.const(f"{self.layer.name}/bias", bias.reshape(cin * mult)))
        attrs, (oh, ow) = self.window(cfg.get("padding", "valid"), (h, w), k, s, d)
        y = self.emit("Conv", inputs, {"kernel_shape": list(k), "strides": list(s),
                                       "dilations": list(d), "group": int(cin), **attrs},
                      hint=hint)
        return y, cin * mult, oh, ow

    def depthwise_conv2d(self, ins):
        cfg = self.layer.config
        x, q, (c, h, w), _ = self.spatial(ins[0])
        dk, bias = self.weights(["depthwise_kernel", "bias"], {"bias": cfg.get("use_bias", True)})
        y, cout, oh, ow = self._depthwise(x, c, h, w, dk, cfg, bias)
        return self.activation(self.spatial_out(y, q, cout, oh, ow), cfg.get("activation"))

    def separable_conv2d(self, ins):
        cfg = self.layer.config
        x, q, (c, h, w), _ = self.spatial(ins[0])
        dk, pk, bias = self.weights(["depthwise_kernel", "pointwise_kernel", "bias"],
                                    {"bias": cfg.get("use_bias", True)})
        y, cmid, oh, ow = self._depthwise(x, c, h, w, dk, cfg, hint="depthwise")
        if pk.ndim != 4 or pk.shape[:3] != (1, 1, cmid):
            self.fail(f"pointwise kernel shape {pk.shape} does not fit {cmid} channels")
        cout = pk.shape[3]
        inputs = [y, self.const(f"{self.layer.name}/pointwise_kernel", pk.transpose(3, 2, 0, 1))]
        if bias is not None:
            inputs.append(self.const(f"{self.layer.name}/bias", bias.reshape(cout)))
        z = self.emit("Conv", inputs, {"kernel_shape": [1, 1], "strides": [1, 1],
                                       "dilations": [1, 1], "group": 1, "pads": [0, 0, 0, 0]})
        return self.activation(self.spatial_out(z, q, cout, oh, ow), cfg.get("activation"))

    def dense(self, ins):
        t, cfg = ins[0], self.layer.config
        kernel, bias = self.weights(["kernel", "bias"], {"bias": cfg.get("use_bias", True)})
        if kernel.ndim != 2 or (t.shape[-1] is not None and kernel.shape[0] != t.shape[-1]):
            self.fail(f"kernel shape {kernel.shape} does not fit the input "
                      f"{_fmt_shape(t.shape)}")
        units = kernel.shape[1]
        x = self.as_layout(t, _ident(t.rank))
        w = self.const(f"{self.layer.name}/kernel", kernel)
        b = self.const(f"{self.layer.name}/bias", bias.reshape(units)) if bias is not None else None
        if t.rank == 2:
            y = self.emit("Gemm", [x, w] + ([b] if b else []), {"transB": 0})
        else:
            y = self.emit("MatMul", [x, w])
            if b:
                y = self.emit("Add", [y, b], hint="bias")
        return self.activation(T(y, t.shape[:-1] + (units,), _ident(t.rank)),
                               cfg.get("activation"))

    def batch_normalization(self, ins):
        t, cfg = ins[0], self.layer.config
        axis = _axis_of(self.layer) % t.rank
        if axis == 0:
            self.fail("cannot normalize over the batch axis")
        gamma, beta, mean, var = self.weights(
            ["gamma", "beta", "moving_mean", "moving_variance"],
            {"gamma": cfg.get("scale", True), "beta": cfg.get("center", True)})
        ch = mean.size
        if t.shape[axis] is not None and t.shape[axis] != ch:
            self.fail(f"{ch} statistics for {t.shape[axis]} channels")
        gamma = np.ones(ch, np.float32) if gamma is None else gamma.reshape(ch)
        beta = np.zeros(ch, np.float32) if beta is None else beta.reshape(ch)
        eps = float(cfg.get("epsilon", 1e-3))
        ir_axis = t.perm.index(axis)
        base = self.layer.name
        if ir_axis == 1:
            y = self.emit("BatchNormalization",
                          [t.name, self.const(f"{base}/gamma", gamma),
                           self.const(f"{base}/beta", beta),
                           self.const(f"{base}/moving_mean", mean.reshape(ch)),
                           self.const(f"{base}/moving_variance", var.reshape(ch))],
                          {"epsilon": eps})
        else:  # another axis: the same affine map as Mul + Add
            scale = gamma.astype(np.float64) / np.sqrt(var.reshape(ch).astype(np.float64) + eps)
            shift = beta - mean.reshape(ch) * scale
            shape = [1] * t.rank
            shape[ir_axis] = ch
            y = self.emit("Mul", [t.name, self.const(f"{base}/scale", scale.reshape(shape))])
            y = self.emit("Add", [y, self.const(f"{base}/shift", shift.reshape(shape))])
        return T(y, t.shape, t.perm)

    def prelu(self, ins):
        t, cfg = ins[0], self.layer.config
        (alpha,) = self.weights(["alpha"])
        shared = cfg.get("shared_axes") or []
        shared = {int(a) for a in ([shared] if isinstance(shared, int) else shared)}
        if alpha.ndim != t.rank - 1:
            self.fail(f"alpha shape {alpha.shape} does not fit the input {_fmt_shape(t.shape)}")
        for a in range(1, t.rank):
            n = alpha.shape[a - 1]
            if n == 1:
                continue
            if t.shape[a] is None:
                self.fail(f"alpha has {n} values along axis {a} (not shared over it), which "
                          f"needs a fixed input size; the input is {_fmt_shape(t.shape)}: pass "
                          "an input shape")
            if t.shape[a] != n:
                self.fail(f"alpha shape {alpha.shape} does not fit the input "
                          f"{_fmt_shape(t.shape)} (per-pixel alphas fix the input size)")
        slope = np.transpose(alpha.reshape((1,) + alpha.shape), t.perm)[0]
        y = self.emit("PRelu", [t.name, self.const(f"{self.layer.name}/alpha", slope)])
        return T(y, t.shape, t.perm)

    def leaky_relu(self, ins):
        t, cfg = ins[0], self.layer.config
        alpha = cfg.get("alpha", cfg.get("negative_slope", 0.3))
        return T(self.emit("LeakyRelu", [t.name], {"alpha": float(alpha)}), t.shape, t.perm)

    def relu(self, ins):
        t, cfg = ins[0], self.layer.config
        slope = float(cfg.get("negative_slope") or 0.0)
        top = cfg.get("max_value")
        y = t.name
        if slope:
            y = self.emit("LeakyRelu", [y], {"alpha": slope})
        if top is not None:
            y = self.clip(y, -3.4e38 if slope else 0.0, float(top))
        elif not slope:
            y = self.emit("Relu", [y])
        return T(y, t.shape, t.perm)

    def activation_layer(self, ins):
        return self.activation(ins[0], self.layer.config.get("activation"))

    def softmax(self, ins):
        t = ins[0]
        axis = _axis_of(self.layer) % t.rank
        return T(self.emit("Softmax", [t.name], {"axis": t.perm.index(axis)}), t.shape, t.perm)

    def pool2d(self, ins):
        cfg = self.layer.config
        x, q, (c, h, w), _ = self.spatial(ins[0])
        k = _pair(cfg.get("pool_size", 2))
        s = _pair(cfg.get("strides") or k)
        attrs, (oh, ow) = self.window(cfg.get("padding", "valid"), (h, w), k, s, (1, 1))
        attrs.update(kernel_shape=list(k), strides=list(s))
        if self.layer.cls in ("MaxPooling2D", "MaxPool2D"):
            y = self.emit("MaxPool", [x], attrs)
        else:  # TF's "same" average ignores the padding
            y = self.emit("AveragePool", [x], {**attrs, "count_include_pad": 0})
        return self.spatial_out(y, q, c, oh, ow)

    def global_pool2d(self, ins):
        cfg = self.layer.config
        x, q, (c, h, w), _ = self.spatial(ins[0])
        op = "GlobalMaxPool" if "Max" in self.layer.cls else "GlobalAveragePool"
        y = self.emit(op, [x])
        if cfg.get("keepdims", False):
            return self.spatial_out(y, q, c, 1, 1)
        return T(self.emit("Flatten", [y], {"axis": 1}), (None, c), (0, 1))

    def flatten(self, ins):
        t, cfg = ins[0], self.layer.config
        if t.rank <= 2:
            return t
        # Keras flattens channels-last; channels_first Flatten moves C last first
        q = (_ident(t.rank) if (cfg.get("data_format") or "channels_last") == "channels_last"
             else (0,) + tuple(range(2, t.rank)) + (1,))
        x = self.as_layout(t, q)
        size = None if None in t.shape[1:] else int(np.prod(t.shape[1:]))
        return T(self.emit("Flatten", [x], {"axis": 1}), (None, size), (0, 1))

    def reshape(self, ins):
        t = ins[0]
        target = [int(d) for d in self.layer.config["target_shape"]]
        x = self.as_layout(t, _ident(t.rank))
        known = None if None in t.shape[1:] else int(np.prod(t.shape[1:]))
        if target.count(-1) > 1:
            self.fail(f"target_shape {target} has more than one -1")
        out = list(target)
        if -1 in out and known is not None:
            rest = int(np.prod([d for d in out if d != -1]))
            if rest == 0 or known % rest:
                self.fail(f"cannot reshape {_fmt_shape(t.shape)} to {target}")
            out[out.index(-1)] = known // rest
        elif -1 not in out and known is not None and int(np.prod(out)) != known:
            self.fail(f"cannot reshape {_fmt_shape(t.shape)} to {target}")
        spec = ([-1] + out) if -1 not in out else ([0] + out)  # 0: keep the batch size
        y = self.emit("Reshape", [x, self.const(f"{self.layer.name}/shape",
                                                np.array(spec, np.int64), np.int64)])
        return T(y, (None,) + tuple(None if d == -1 else d for d in out), _ident(len(out) + 1))

    def permute(self, ins):
        t = ins[0]
        dims = (0,) + tuple(int(d) for d in self.layer.config["dims"])
        if sorted(dims) != list(range(t.rank)):
            self.fail(f"dims {dims[1:]} are not a permutation of the input axes")
        # no data moves: the IR tensor is the same, only its Keras meaning changes
        return T(t.name, tuple(t.shape[d] for d in dims), tuple(dims.index(p) for p in t.perm))

    def merge(self, ins):
        cls = self.layer.cls
        if len(ins) < 2 or (cls == "Subtract" and len(ins) != 2):
            self.fail(f"takes {'two' if cls == 'Subtract' else 'at least two'} inputs, "
                      f"got {len(ins)}")
        rank, p0 = ins[0].rank, ins[0].perm
        if any(t.rank != rank for t in ins):
            self.fail(f"inputs of different ranks: {[_fmt_shape(t.shape) for t in ins]}")
        names = [self.as_layout(t, p0) for t in ins]
        op = {"Add": "Add", "Average": "Add", "Subtract": "Sub", "Multiply": "Mul"}[cls]
        y = names[0]
        for n in names[1:]:
            y = self.emit(op, [y, n])
        if cls == "Average":
            y = self.emit("Mul", [y, self.const(f"{self.layer.name}/mean",
                                                np.float32(1.0 / len(ins)))])
        shape = tuple(_bcast_dim([t.shape[i] for t in ins]) for i in range(rank))
        return T(y, shape, p0)

    def concatenate(self, ins):
        rank, p0 = ins[0].rank, ins[0].perm
        if any(t.rank != rank for t in ins):
            self.fail(f"inputs of different ranks: {[_fmt_shape(t.shape) for t in ins]}")
        axis = _axis_of(self.layer) % rank
        names = [self.as_layout(t, p0) for t in ins]
        y = self.emit("Concat", names, {"axis": p0.index(axis)}) if len(names) > 1 else names[0]
        sizes = [t.shape[axis] for t in ins]
        shape = list(ins[0].shape)
        shape[axis] = None if None in sizes else int(sum(sizes))
        return T(y, tuple(shape), p0)

    def zero_padding2d(self, ins):
        x, q, (c, h, w), _ = self.spatial(ins[0])
        p = self.layer.config.get("padding", 1)
        if isinstance(p, int):
            (t, b), (l, r) = (p, p), (p, p)
        elif all(isinstance(v, int) for v in p):
            (t, b), (l, r) = (p[0], p[0]), (p[1], p[1])
        else:
            (t, b), (l, r) = p
        pads = self.const(f"{self.layer.name}/pads", np.array([0, 0, t, l, 0, 0, b, r]),
                          np.int64)
        y = self.emit("Pad", [x, pads], {"mode": "constant"})
        return self.spatial_out(y, q, c, None if h is None else h + t + b,
                                None if w is None else w + l + r)

    def rescaling(self, ins):
        t, cfg = ins[0], self.layer.config
        y = t.name
        for key, op, neutral in (("scale", "Mul", 1.0), ("offset", "Add", 0.0)):
            v = np.asarray(cfg.get(key, neutral), np.float32)
            if v.size == 1 and float(v.reshape(-1)[0]) == neutral:
                continue
            if v.size > 1:  # per channel: broadcast along the last Keras axis
                v = np.transpose(v.reshape((1,) * (t.rank - 1) + (-1,)), t.perm)
            else:
                v = v.reshape(())
            y = self.emit(op, [y, self.const(f"{self.layer.name}/{key}", v)])
        return T(y, t.shape, t.perm)

    def pass_through(self, ins):
        return ins[0]

    # -- driver --------------------------------------------------------------
    def check(self, layer: Layer) -> str | None:
        """Why this layer cannot be converted, or None."""
        cls, cfg = layer.cls, layer.config if isinstance(layer.config, dict) else {}
        if cls not in SUPPORTED:
            return _HINTS.get(cls, "layer type not supported")
        fmt = cfg.get("data_format")
        if fmt not in (None, "channels_last", "channels_first"):
            return f"data_format '{fmt}' not supported"
        pad = str(cfg.get("padding", "valid")).lower() if "padding" in cfg and \
            cls != "ZeroPadding2D" else "valid"
        if pad not in ("valid", "same"):
            return f"padding '{pad}' not supported"
        if "activation" in cfg and _act_name(cfg["activation"]) not in ACTIVATIONS:
            return f"activation '{_act_name(cfg['activation'])}' not supported"
        if cls == "ReLU" and float(cfg.get("threshold") or 0.0) != 0.0:
            return "threshold != 0 not supported"
        if cls in ("BatchNormalization", "Concatenate", "Softmax"):
            a = cfg.get("axis", -1)
            if isinstance(a, (list, tuple)) and len(a) != 1:
                return f"axis {a}: only one axis is supported"
        return None

    def convert(self) -> Graph:
        m = self.model
        byname = {}
        for l in m.layers:
            if l.name in byname:
                raise GraphError(f"model '{m.name}' has two layers named '{l.name}'")
            byname[l.name] = l
        used = [l for l in m.layers if l.cls != "InputLayer"]
        problems = [(l, why) for l in used for why in [self.check(l)] if why]
        if problems:
            listed = "; ".join(f"'{l.name}' ({l.cls}): {why}" for l, why in problems)
            raise GraphError(f"cannot convert Keras model '{m.name}': {len(problems)} "
                             f"unsupported layer{'s' * (len(problems) > 1)}: {listed}. "
                             f"Supported layers: {', '.join(sorted(SUPPORTED))}")
        if not m.inputs or not m.outputs:
            raise GraphError(f"model '{m.name}' declares no inputs or no outputs")
        graph_inputs = [self.make_input(byname, ref, i) for i, ref in enumerate(m.inputs)]
        pending = [(l, k) for l in used for k in range(len(l.calls))]
        while pending:
            rest = []
            for l, k in pending:
                refs = l.calls[k]
                if all(r in self.tensors for r in refs):
                    self.run_layer(l, k, [self.tensors[r] for r in refs])
                else:
                    rest.append((l, k))
            if len(rest) == len(pending):
                missing = sorted({r[0] for l, k in rest for r in l.calls[k]
                                  if r not in self.tensors})
                if all(r in self.tensors for r in m.outputs):
                    break  # the rest does not feed the outputs
                raise GraphError(f"model '{m.name}': layers {[l.name for l, _ in rest]} read "
                                 f"outputs of {missing}, which are never computed")
            pending = rest
        self.layer = None
        outputs = []
        for ref in m.outputs:
            if ref not in self.tensors:
                raise GraphError(f"model '{m.name}': output {ref[0]} is never computed")
            t = self.tensors[ref]
            q = NCHW if t.rank == 4 and self.data_format == "channels_last" else _ident(t.rank)
            name = self.as_layout(t, q)
            if name in {v.name for v in graph_inputs} | {v.name for v in outputs}:
                name = self.emit("Identity", [name], hint=ref[0])
            want = ref[0] if ref[1] == 0 else f"{ref[0]}:{ref[1]}"
            if name != want and self._produced(name):  # outputs carry the layer's name
                blocked = ({v.name for v in outputs} | {v.name for v in graph_inputs}
                           | set(self.inits))
                if want not in blocked:
                    if self._produced(want):  # the tensor before the output's transpose
                        self._rename(want, self.fresh(f"{want}/keras_layout"))
                    self._rename(name, want)
                    name = want
            outputs.append(ValueInfo(name, _symbolic([t.shape[a] for a in q], t.rank == 4)))
        graph = Graph(self.nodes, graph_inputs, outputs, self.inits, name=m.name)
        _fold_zero_pads(graph)
        used_names = {i for n in graph.nodes for i in n.inputs}
        graph.initializers = {k: v for k, v in graph.initializers.items() if k in used_names}
        graph.metadata = {"model.name": m.name, "model.source": "keras-h5",
                          "model.keras_version": self.kf.keras_version or "unknown",
                          "model.keras_backend": self.kf.backend or "unknown",
                          "model.keras_data_format": self.data_format,
                          "model.input_layout": "NCHW"}
        graph.validate()
        return graph

    def _produced(self, name) -> bool:
        return any(name in n.outputs for n in self.nodes)

    def _rename(self, old: str, new: str) -> None:
        self.taken.add(new)
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
            if old in n.outputs:
                n.outputs = [new if o == old else o for o in n.outputs]
                n.name = new
        for key, v in list(self._layouts.items()):
            if v == old:
                self._layouts[key] = new

    def make_input(self, byname, ref, index) -> ValueInfo:
        layer = byname.get(ref[0])
        if layer is None or layer.cls != "InputLayer":
            raise GraphError(f"model input '{ref[0]}' is not an InputLayer")
        shape = _batch_shape(layer.config)
        given = self.input_shape if index == 0 else None
        if shape is None and given is None:
            raise GraphError(f"input '{layer.name}' has no shape in the model; pass the input "
                             "shape (NCHW, e.g. 1,3,32,32)")
        rank = len(given) if shape is None else len(shape)
        perm = NCHW if rank == 4 and self.data_format == "channels_last" else _ident(rank)
        keras = [None] * rank if shape is None else [None if d is None else int(d) for d in shape]
        batch = None
        if given is not None:
            if len(given) != rank:
                raise GraphError(f"input shape {given} has rank {len(given)}, the model's input "
                                 f"'{layer.name}' has rank {rank} (Keras shape "
                                 f"{_fmt_shape(keras)})")
            from_given = [None] * rank
            for i, a in enumerate(perm):
                from_given[a] = given[i]
            spatial = set(perm[2:]) if rank == 4 else set()
            for a in range(1, rank):
                if keras[a] is not None and keras[a] != from_given[a] and a not in spatial:
                    hint = (" (the converted graph takes NCHW input, e.g. "
                            f"{','.join(str(given[i]) for i in (0, 3, 1, 2))})"
                            if rank == 4 and given[3] == keras[a] else "")
                    raise GraphError(f"input shape {given} does not fit the model's input "
                                     f"'{layer.name}' (Keras shape {_fmt_shape(keras)}){hint}")
                keras[a] = from_given[a]
            batch = given[0]
        t = T(self.fresh(layer.name), tuple([None] + keras[1:]), perm)
        self.tensors[(layer.name, 0, 0)] = t
        ir = [t.shape[a] for a in perm]
        dims = _symbolic(ir, rank == 4)
        if batch is not None:
            dims = (batch,) + dims[1:]
        return ValueInfo(t.name, dims)

    def run_layer(self, layer: Layer, k: int, ins: list[T]):
        self.layer = layer
        before = len(self.nodes)
        method = getattr(self, SUPPORTED[layer.cls])
        if method.__name__ not in ("merge", "concatenate") and len(ins) != 1:
            self.fail(f"takes one input, got {len(ins)}")
        try:
            out = method(ins)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            if isinstance(exc, GraphError):
                raise
            self.fail(f"malformed config or weights ({type(exc).__name__}: {exc})")
        # the layer's last node writes the tensor named after the layer
        if len(self.nodes) > before and self.nodes[-1].outputs == [out.name] and \
                out.name not in self._layouts.values():
            clean = self.fresh(layer.name if k == 0 else f"{layer.name}:{k}")
            self.taken.discard(out.name)
            self.nodes[-1].outputs = [clean]
            self.nodes[-1].name = clean
            out = T(clean, out.shape, out.perm)
        self.tensors[(layer.name, k, 0)] = out


SUPPORTED = {
    "Conv2D": "conv2d", "DepthwiseConv2D": "depthwise_conv2d",
    "SeparableConv2D": "separable_conv2d", "Dense": "dense",
    "BatchNormalization": "batch_normalization", "PReLU": "prelu", "LeakyReLU": "leaky_relu",
    "ReLU": "relu", "Activation": "activation_layer", "Softmax": "softmax",
    "MaxPooling2D": "pool2d", "MaxPool2D": "pool2d", "AveragePooling2D": "pool2d",
    "AvgPool2D": "pool2d", "GlobalAveragePooling2D": "global_pool2d",
    "GlobalAvgPool2D": "global_pool2d", "GlobalMaxPooling2D": "global_pool2d",
    "GlobalMaxPool2D": "global_pool2d", "Flatten": "flatten", "Reshape": "reshape",
    "Permute": "permute", "Add": "merge", "Subtract": "merge", "Multiply": "merge",
    "Average": "merge", "Concatenate": "concatenate", "ZeroPadding2D": "zero_padding2d",
    "Rescaling": "rescaling", **{c: "pass_through" for c in PASS_THROUGH},
}


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _bcast_dim(dims):
    known = [d for d in dims if d is not None and d != 1]
    if known:
        return known[0]
    return 1 if all(d == 1 for d in dims) else None


def _symbolic(dims, image: bool) -> tuple:
    names = ("N", "C", "H", "W") if image else ("N",) + tuple(f"d{i}" for i in range(1, len(dims)))
    return tuple(names[i] if (i == 0 or d is None) else int(d) for i, d in enumerate(dims))


def _fold_zero_pads(graph: Graph) -> None:
    """Pad (zeros, spatial only) -> its only consumer's pads, when that is a Conv
    with explicit pads or an AveragePool that counts padding (or has none)."""
    outputs = {v.name for v in graph.outputs}
    removed = set()
    for pad in [n for n in graph.nodes if n.op == "Pad"]:
        users = graph.consumers().get(pad.outputs[0], [])
        p = graph.initializers.get(pad.inputs[1]) if len(pad.inputs) > 1 else None
        if (len(users) != 1 or pad.outputs[0] in outputs or p is None or p.size != 8
                or any(p[[0, 1, 4, 5]]) or pad.attrs.get("mode", "constant") != "constant"
                or (len(pad.inputs) > 2 and pad.inputs[2])):
            continue
        u = users[0]
        if u.inputs[0] != pad.outputs[0] or u.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        cur = list(u.attrs.get("pads", [0, 0, 0, 0]))
        new = [cur[0] + int(p[2]), cur[1] + int(p[3]), cur[2] + int(p[6]), cur[3] + int(p[7])]
        if u.op == "AveragePool":
            k = list(u.attrs["kernel_shape"]) * 2
            if (u.attrs.get("count_include_pad", 0) != 1 and any(cur)) or \
                    any(a >= b for a, b in zip(new, k)):
                continue
            u.attrs["count_include_pad"] = 1
        elif u.op != "Conv":
            continue
        u.attrs["pads"] = new
        u.inputs[0] = pad.inputs[0]
        removed.add(id(pad))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def from_h5(path, input_shape=None) -> Graph:
    """A qnrt Graph (NCHW input) from a Keras 2 .h5 model file.

    `input_shape` is the graph's NCHW input shape (e.g. (1, 3, 32, 32)); it fixes
    sizes the model leaves open, so "same" pads become explicit.
    """
    kf = read_h5(path)
    try:
        return _Converter(kf, input_shape).convert()
    except GraphError as exc:
        raise GraphError(f"{os.fspath(path)}: {exc}") from None
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise GraphError(f"{os.fspath(path)}: malformed Keras model config "
                         f"({type(exc).__name__}: {exc})") from None
