"""PyTorch weight files (.safetensors, .pt/.pth/.bin state dicts) -> QuickNet Graph.

A state dict holds weights only, no architecture: the architecture is the
QuickNet layer table (models.quicknet), and the tensors are mapped onto its
neutral weight names (models.quicknet.weight_shapes).

Reading (`read_state_dict`):

* ``.safetensors`` is parsed here with numpy and json (no safetensors package,
  no pickle): 8-byte little-endian header length, a JSON header
  ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}``,
  then the raw little-endian data. Every entry is validated (known dtype,
  shape, offsets inside the data, byte size matching the shape, no overlaps,
  the data buffer fully covered) and a malformed file raises ValueError.
  Floating dtypes (F16, BF16, F32, F64) come back as float32; integer and
  BOOL tensors keep their dtype. Tensors come back in header order.
* ``.pt``/``.pth``/``.bin`` go through ``torch.load(..., weights_only=True)``
  only: a pickle that needs anything besides tensors and plain containers is
  refused, never executed. Accepted: a state dict, or a dict holding one under
  "state_dict", "model" or "model_state_dict".

Mapping (`quicknet_from_state_dict`):

1. by name, when the keys follow tools/train.py's module:
   ``layers.<layer>.<sub>.<param>`` (also without ``layers.``, and behind
   ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefixes).
   BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var,
   PReLU weight -> slope, num_batches_tracked dropped. Missing, unexpected or
   mis-shaped tensors raise ValueError naming them.
2. otherwise by order: num_batches_tracked dropped, the remaining tensors are
   matched one by one against the neutral list in layer order (conv weight,
   BN weight, bias, running_mean, running_var, PReLU weight, ...). The stored
   order is tried first; if it does not fit, the keys sorted by module path
   (numbers compared as numbers, parameters in PyTorch's registration order)
   are tried, which recovers e.g. an nn.Sequential written by a safetensors
   writer that sorts names. The error raised is the stored order's: the first
   tensor whose shape differs from what the table expects there.

Width, classes and input channels are inferred from the shapes (stem conv:
width = out / 32, unless the other layers' channel counts need another width;
head conv: classes) unless given. A PReLU with one shared slope
(``nn.PReLU()``) is expanded to per-channel. BatchNorm epsilon is not stored in
a state dict: the table's (models.quicknet.BN_EPSILON = 1e-3, as in
tools/train.py) is used.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from qnrt.models.quicknet import LAYERS, build, layer_plan, weight_shapes

__all__ = ["read_state_dict", "read_safetensors", "read_torch", "quicknet_from_state_dict",
           "load_quicknet", "TorchNotInstalled", "TORCH_EXTENSIONS", "EXTENSIONS"]

TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
EXTENSIONS = (".safetensors",) + TORCH_EXTENSIONS


class TorchNotInstalled(ImportError, ValueError):
    """Reading a pickled PyTorch file needs torch (an ImportError, and a
    ValueError so command-line callers report it like any bad input)."""


# ----------------------------------------------------------------- safetensors

# safetensors dtype -> (numpy little-endian dtype of the stored bytes)
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "u1",
}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


def _st_error(path, msg):
    return ValueError(f"{path}: not a valid safetensors file: {msg}")


def read_safetensors(path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise _st_error(path, f"{len(blob)} bytes, too short for the 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n < 2 or n > _MAX_HEADER or 8 + n > len(blob):
        raise _st_error(path, f"header length {n} does not fit a file of {len(blob)} bytes")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _st_error(path, f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _st_error(path, "the header is not a JSON object")
    data = memoryview(blob)[8 + n:]
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _st_error(path, f"tensor '{name}': entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise _st_error(path, f"tensor '{name}': unsupported dtype {dtype!r} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _st_error(path, f"tensor '{name}': bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _st_error(path, f"tensor '{name}': bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= len(data):
            raise _st_error(path, f"tensor '{name}': data_offsets [{begin}, {end}] outside the "
                                  f"{len(data)} data bytes (truncated file?)")
        itemsize = np.dtype(_ST_DTYPES[dtype]).itemsize
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if (end - begin) != count * itemsize:
            raise _st_error(path, f"tensor '{name}': {end - begin} bytes for {dtype} shape "
                                  f"{tuple(shape)}, which needs {count * itemsize}")
        entries.append((name, dtype, tuple(shape), begin, end, count))
    pos = 0
    for name, _, _, begin, end, _ in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin < pos:
            raise _st_error(path, f"tensor '{name}': data_offsets [{begin}, {end}] overlap "
                                  "another tensor's")
        if begin > pos:
            raise _st_error(path, f"bytes [{pos}, {begin}) of the data belong to no tensor")
        pos = end
    if pos != len(data):
        raise _st_error(path, f"{len(data) - pos} bytes after the last tensor belong to no tensor")
    out = {}
    for name, dtype, shape, begin, end, count in entries:
        if count == 0:
            out[name] = np.zeros(shape, np.float32 if dtype.startswith(("F", "BF")) else
                                 (bool if dtype == "BOOL" else _ST_DTYPES[dtype]))
            continue
        raw = np.frombuffer(data, dtype=_ST_DTYPES[dtype], count=count, offset=begin)
        if dtype == "BF16":  # the upper half of a float32
            a = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype.startswith("F"):
            a = raw.astype(np.float32)
        elif dtype == "BOOL":
            a = raw != 0
        else:
            a = raw.astype(raw.dtype.newbyteorder("="))
        out[name] = np.array(a.reshape(shape))  # own copy, native byte order
    return out


# ----------------------------------------------------------------- torch pickle

_WRAPPERS = ("state_dict", "model_state_dict", "model")


def read_torch(path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise TorchNotInstalled(
            f"{path}: reading a pickled PyTorch file needs torch (pip install torch); "
            "or save the weights as .safetensors, which needs no torch to read") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        operand = re.search(r"Unsupported operand[^\n]*", text)
        if found:
            detail = f"it needs {found.group(1)}"
        elif operand:
            detail = operand.group(0).strip()[:200]
        else:
            detail = (text.strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path}: refused to load: the pickle holds more than tensors and plain "
            f"containers, and only a weights-only load is allowed ({detail}). "
            "Save a state dict instead: torch.save(model.state_dict(), path), or use "
            "safetensors") from None
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable PyTorch weights file ({exc})") from None
    state = obj
    if isinstance(obj, dict) and not _all_tensors(obj, torch):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of "
                         f"tensors, possibly under {' / '.join(repr(k) for k in _WRAPPERS)})")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: state dict entry '{key}' is a {type(value).__name__}, "
                             "not a tensor")
        t = value.detach().cpu()
        if t.is_floating_point():
            out[str(key)] = t.to(torch.float32).contiguous().numpy().copy()
        else:
            out[str(key)] = t.contiguous().numpy().copy()
    return out


def _all_tensors(d, torch) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def read_state_dict(path) -> dict[str, np.ndarray]:
    """name -> ndarray, in stored order, from .safetensors or .pt/.pth/.bin."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return read_safetensors(path)
    if ext in TORCH_EXTENSIONS:
        return read_torch(path)
    raise ValueError(f"{path}: unknown weights format '{ext}' (expected "
                     f"{', '.join(EXTENSIONS)})")


# ----------------------------------------------------------------- mapping

_BN_PARAMS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_LAYER_RE = re.compile(r"^(stem|head|sep\d+)$")
_SUBS = {"conv", "bn", "prelu", "dw", "dw_bn", "dw_prelu", "pw", "pw_bn", "pw_prelu"}
_PREFIXES = ("module.", "_orig_mod.")
_TABLE = [ch for kind, ch in LAYERS if kind in ("conv", "sep")]  # stem + every sep's out


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key.removeprefix("layers.")


def _neutral_name(key: str) -> str | None:
    """The neutral weight name for a tools/train.py-style key, "" for a tensor
    to drop (num_batches_tracked), None if the key is not of that form."""
    parts = _strip(key).split(".")
    if len(parts) != 3 or not _LAYER_RE.match(parts[0]) or parts[1] not in _SUBS:
        return None
    layer, sub, param = parts
    if sub.endswith("bn"):
        if param == "num_batches_tracked":
            return ""
        param = _BN_PARAMS.get(param)
    elif sub.endswith("prelu"):
        param = "slope" if param == "weight" else None
    elif param not in ("weight", "bias"):
        param = None
    return f"{layer}.{sub}.{param}" if param else None


def _fits(width, outs, in_channels) -> bool:
    plan = [cout for kind, _, _, cout in layer_plan(width, 1, in_channels) if kind in ("conv", "sep")]
    return plan == list(outs)


def _infer_width(outs, in_channels) -> float | None:
    """A width whose layer_plan gives these stem+sep output channel counts:
    stem/32 if that fits, else the one with the fewest decimals."""
    if not outs or outs[0] <= 0:
        return None
    first = outs[0] / _TABLE[0]
    if len(outs) != len(_TABLE) or _fits(first, outs, in_channels):
        return first
    ratios = [c / t for c, t in zip(outs, _TABLE)]
    for digits in range(1, 7):
        for r in ratios[::-1]:  # the widest layers pin the width down best
            w = round(r, digits)
            if w > 0 and _fits(w, outs, in_channels):
                return w
    for r in ratios[::-1]:
        if _fits(r, outs, in_channels):
            return r
    return first  # none fits: the shape check names the first tensor that does not


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _fit_tensor(key, a, neutral, expected, describe):
    """`a` as the neutral tensor `neutral` of shape `expected`, or ValueError."""
    shape = tuple(a.shape)
    if _is_float(a):
        if shape == expected:
            return a.astype(np.float32)
        if neutral.endswith(".slope") and a.size == 1:  # nn.PReLU(): one shared slope
            return np.full(expected, float(a.reshape(-1)[0]), dtype=np.float32)
    what = f"shape {shape}" if _is_float(a) else f"dtype {a.dtype} shape {shape}"
    raise ValueError(f"tensor '{key}' ({what}) does not fit QuickNet {describe}: "
                     f"expected '{neutral}' with shape {expected} (float)")


def _describe(width, num_classes, in_channels) -> str:
    return f"(width {width:g}, {num_classes} classes, {in_channels} input channels)"


def _by_name(sd, names, width, num_classes, in_channels):
    def shape_of(name):
        key = next((k for k, n in names.items() if n == name), None)
        return None if key is None else tuple(sd[key].shape)

    stem = shape_of("stem.conv.weight")
    if in_channels is None:
        in_channels = stem[1] if stem and len(stem) == 4 else 3
    if num_classes is None:
        head = shape_of("head.conv.weight") or shape_of("head.conv.bias")
        if not head:
            raise ValueError("state dict has no 'head.conv.weight': cannot tell the number "
                             "of classes")
        num_classes = head[0]
    if width is None:
        if not stem or len(stem) != 4:
            raise ValueError(f"state dict has no 4-D 'stem.conv.weight' (found {stem}): "
                             "cannot tell the width")
        outs = [stem[0]]
        for i in range(1, len(_TABLE)):
            pw = shape_of(f"sep{i}.pw.weight")
            if not pw:
                break
            outs.append(pw[0])
        width = _infer_width(outs, in_channels)
    expected = weight_shapes(width, num_classes, in_channels)
    describe = _describe(width, num_classes, in_channels)
    unexpected = [k for k, n in names.items() if n is None or (n and n not in expected)]
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} tensors QuickNet {describe} does "
                         f"not have, e.g. {unexpected[:3]}")
    neutral, origin = {}, {}
    for key, name in names.items():
        if not name:
            continue
        if name in neutral:
            raise ValueError(f"tensors '{origin[name]}' and '{key}' both map to '{name}'")
        neutral[name] = _fit_tensor(key, sd[key], name, expected[name], describe)
        origin[name] = key
    missing = [n for n in expected if n not in neutral]
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} tensors of QuickNet {describe}, "
                         f"e.g. {missing[:3]}")
    return neutral, width, num_classes, in_channels


def _module_order(keys):
    """Keys sorted by module path (numbers as numbers), then parameter in the
    order PyTorch registers them."""
    rank = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}

    def sort_key(k):
        path, _, param = k.rpartition(".")
        parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")) if path else ()
        return parts, rank.get(param, 5), param

    return sorted(keys, key=sort_key)


def _by_order(sd, keys, width, num_classes, in_channels):
    convs = [sd[k].shape for k in keys if sd[k].ndim == 4]
    if in_channels is None:
        in_channels = convs[0][1] if convs else 3
    if num_classes is None:
        if not convs:
            raise ValueError("state dict has no 4-D convolution weights: not a QuickNet")
        num_classes = convs[-1][0]
    if width is None:
        if not convs:
            raise ValueError("state dict has no 4-D convolution weights: not a QuickNet")
        outs = [convs[0][0]]
        if len(convs) == 2 * (len(_TABLE) - 1) + 2:  # stem, (dw, pw) per sep, head
            outs += [s[0] for s in convs[2:-1:2]]
        width = _infer_width(outs, in_channels)
    expected = weight_shapes(width, num_classes, in_channels)
    describe = _describe(width, num_classes, in_channels)
    order = list(expected.items())
    neutral = {}
    for i, key in enumerate(keys):
        if i >= len(order):
            raise ValueError(f"tensor '{key}' (shape {tuple(sd[key].shape)}) is #{i + 1}, but "
                             f"QuickNet {describe} has only {len(order)} tensors")
        name, shape = order[i]
        neutral[name] = _fit_tensor(key, sd[key], name, shape, describe)
    if len(keys) < len(order):
        name, shape = order[len(keys)]
        raise ValueError(f"state dict ends after {len(keys)} tensors; QuickNet {describe} "
                         f"expects {len(order)}, next '{name}' with shape {shape}")
    return neutral, width, num_classes, in_channels


def quicknet_from_state_dict(sd: dict, width: float | None = None,
                             num_classes: int | None = None, in_channels: int | None = None):
    """QuickNet Graph (BN and PReLU unfused, H and W symbolic) from a state dict
    of numpy arrays (or anything np.asarray takes)."""
    sd = {str(k): np.asarray(v) for k, v in sd.items()}
    if not sd:
        raise ValueError("the state dict is empty")
    names = {k: _neutral_name(k) for k in sd}
    if any(n == "stem.conv.weight" for n in names.values()):
        mapping = "by-name"
        neutral, width, num_classes, in_channels = _by_name(sd, names, width, num_classes,
                                                            in_channels)
    else:
        mapping = "by-order"
        keys = [k for k in sd if k.rsplit(".", 1)[-1] != "num_batches_tracked"]
        try:
            result = _by_order(sd, keys, width, num_classes, in_channels)
        except ValueError as stored_error:
            alt = _module_order(keys)
            if alt == keys:
                raise
            try:
                result = _by_order(sd, alt, width, num_classes, in_channels)
            except ValueError:
                raise stored_error from None
        neutral, width, num_classes, in_channels = result
    graph = build(neutral, width=width, num_classes=int(num_classes), input_size=None,
                  in_channels=int(in_channels))
    graph.metadata["model.source"] = "pytorch-state-dict"
    graph.metadata["model.weights_mapping"] = mapping
    return graph


def load_quicknet(path, width: float | None = None, num_classes: int | None = None):
    """read_state_dict + quicknet_from_state_dict; errors name the file."""
    sd = read_state_dict(path)
    try:
        return quicknet_from_state_dict(sd, width, num_classes)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None
