"""exporters.torch_weights: PyTorch state dicts (.pt, .safetensors) -> QuickNet -> .qnb."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import qnrt  # noqa: E402
from qnrt.exporters.torch_weights import (TorchNotInstalled, quicknet_from_state_dict,  # noqa: E402
                                     read_state_dict)
from qnrt.cli import main as cli  # noqa: E402
from helpers import load_tool  # noqa: E402

WIDTH, CLASSES = 0.125, 10

train = load_tool("train")


def _randomize(model, seed=0):
    """Non-trivial weights, BN statistics and PReLU slopes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=g) - 0.1)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


class _Logits(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def _sequential(model: "train.QuickNet", shared_slopes: bool) -> nn.Sequential:
    """The same network flattened into nn.Sequential (keys '0.weight', ...);
    optionally every PReLU replaced by nn.PReLU() with one shared slope."""
    mods = []
    g = torch.Generator().manual_seed(1)
    for layer in model.layers.values():
        children = list(layer.children()) or [layer]
        for m in children:
            if shared_slopes and isinstance(m, nn.PReLU):
                m = nn.PReLU(init=float(0.4 * torch.rand(1, generator=g)) - 0.1)
            mods.append(m)
    mods.append(_Logits())
    return nn.Sequential(*mods).eval()


@pytest.fixture(scope="module")
def quicknet():
    torch.manual_seed(0)
    return _randomize(train.QuickNet(WIDTH, num_classes=CLASSES))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)


def _softmax_ref(model, x):
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


def _np(sd):
    return OrderedDict((k, v.detach().numpy()) for k, v in sd.items())


def write_safetensors(path, tensors: dict, order=None, metadata=None):
    """A minimal safetensors writer: tensors (numpy) in `order` (default: as given)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8",
             np.dtype(bool): "BOOL"}
    header, chunks, pos = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order or list(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    _write_raw(path, header, b"".join(chunks))


def _write_raw(path, header, data: bytes, header_len=None):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if header_len is None else header_len))
        f.write(text)
        f.write(data)


def _convert_and_run(src, dst, x, *extra):
    assert cli(["convert", str(src), str(dst), *extra]) == 0
    sess = qnrt.Session(str(dst))
    assert sess.metadata["model.source"] == "pytorch-state-dict"
    return sess, sess.run(None, {"input": x})[0]


def _check(ours, ref):
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    assert err <= 1e-4 * scale, f"max abs error {err:.3g}"


# ------------------------------------------------------------ end to end

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_train_module_by_name(tmp_path, quicknet, image, fmt):
    src = tmp_path / f"quicknet.{fmt}"
    if fmt == "pt":
        torch.save(quicknet.state_dict(), src)
    else:
        write_safetensors(src, _np(quicknet.state_dict()), metadata={"format": "pt"})
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(CLASSES)) + "\n")
    sess, ours = _convert_and_run(src, tmp_path / "q.qnb", image, "--labels", str(labels),
                                  "--preprocess", "size=32,32", "--preprocess", "mean=0.5,0.5,0.5")
    _check(ours, _softmax_ref(quicknet, image))
    assert sess.metadata["model.weights_mapping"] == "by-name"
    assert sess.metadata["labels"][3] == "class3"
    assert sess.metadata["preprocess.mean"] == [0.5, 0.5, 0.5]
    assert sess.metadata["model.width"] == WIDTH


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "safetensors-sorted"])
def test_sequential_by_order(tmp_path, quicknet, image, fmt):
    seq = _sequential(quicknet, shared_slopes=True)
    sd = seq.state_dict()
    assert "0.weight" in sd and sd["2.weight"].shape == (1,)  # shared PReLU slope
    src = tmp_path / f"seq.{fmt.split('-')[0]}"
    if fmt == "pt":
        torch.save({"epoch": 3, "state_dict": sd}, src)  # a checkpoint wrapping it
    elif fmt == "safetensors":
        write_safetensors(src, _np(sd))
    else:  # names sorted as text, as the safetensors package lays them out
        write_safetensors(src, _np(sd), order=sorted(sd))
    sess, ours = _convert_and_run(src, tmp_path / "s.qnb", image)
    _check(ours, _softmax_ref(seq, image))
    assert sess.metadata["model.weights_mapping"] == "by-order"


def test_official_safetensors_writer(tmp_path, quicknet, image):
    st = pytest.importorskip("safetensors.torch")
    src = tmp_path / "official.safetensors"
    st.save_file(quicknet.state_dict(), str(src))
    _, ours = _convert_and_run(src, tmp_path / "o.qnb", image)
    _check(ours, _softmax_ref(quicknet, image))


# ------------------------------------------------------------ mapping rules

def test_prefix_variants_map_by_name(quicknet):
    sd = _np(quicknet.state_dict())
    base = quicknet_from_state_dict(sd).initializers
    variants = [
        {k.removeprefix("layers."): v for k, v in sd.items()},
        {"module." + k: v for k, v in sd.items()},
        {"module." + k.removeprefix("layers."): v for k, v in reversed(sd.items())},
    ]
    for v in variants:
        g = quicknet_from_state_dict(v)
        assert g.metadata["model.weights_mapping"] == "by-name"
        assert set(g.initializers) == set(base)
        for k in base:
            np.testing.assert_array_equal(g.initializers[k], base[k])


def test_infers_width_classes_and_neutral_match(quicknet):
    sd = _np(quicknet.state_dict())
    g = quicknet_from_state_dict(sd)
    assert g.metadata["model.width"] == WIDTH
    assert g.outputs[0].shape[1] == CLASSES
    neutral = train.state_to_neutral(quicknet)
    for k, v in neutral.items():
        np.testing.assert_allclose(g.initializers[k].reshape(v.shape), v)
    # a width whose stem alone is ambiguous (round(3.2) = 3, 3/32 would give sep2 12 not 13)
    m = train.QuickNet(0.1, num_classes=7)
    g = quicknet_from_state_dict(_np(m.state_dict()))
    assert g.metadata["model.width"] == pytest.approx(0.1) and g.outputs[0].shape[1] == 7
    # explicit width/classes that do not fit
    with pytest.raises(ValueError, match="layers.stem.conv.weight"):
        quicknet_from_state_dict(sd, width=0.25)


def test_wrong_channel_count_names_tensor(quicknet):
    sd = _np(quicknet.state_dict())
    bad = OrderedDict(sd)
    bad["layers.sep3.pw_bn.running_mean"] = np.zeros(15, np.float32)
    with pytest.raises(ValueError, match=r"layers\.sep3\.pw_bn\.running_mean.*\(15,\).*\(16,\)"):
        quicknet_from_state_dict(bad)
    seq = _np(_sequential(quicknet, shared_slopes=False).state_dict())
    assert quicknet_from_state_dict(seq).metadata["model.weights_mapping"] == "by-order"
    wrong = OrderedDict(seq)
    key = list(seq)[20]
    wrong[key] = np.zeros(tuple(seq[key].shape[:-1]) + (seq[key].shape[-1] + 1,), np.float32)
    with pytest.raises(ValueError, match=rf"'{key}'.*expected '[a-z0-9_.]+' with shape"):
        quicknet_from_state_dict(wrong)
    short = OrderedDict(list(seq.items())[:-1])
    with pytest.raises(ValueError, match=r"ends after .*'head.conv.bias'"):
        quicknet_from_state_dict(short)
    longer = OrderedDict(seq)
    longer["fc.weight"] = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="'fc.weight'.*only"):
        quicknet_from_state_dict(longer)
    missing = OrderedDict(sd)
    del missing["layers.sep2.dw_prelu.weight"]
    with pytest.raises(ValueError, match="sep2.dw_prelu.slope"):
        quicknet_from_state_dict(missing)
    extra = OrderedDict(sd)
    extra["layers.sep2.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="layers.sep2.extra.weight"):
        quicknet_from_state_dict(extra)


def test_cli_reports_bad_state_dict(tmp_path, quicknet, capsys):
    sd = _np(quicknet.state_dict())
    sd["layers.sep5.dw.weight"] = np.zeros((31, 1, 3, 3), np.float32)
    src = tmp_path / "bad.safetensors"
    write_safetensors(src, sd)
    assert cli(["convert", str(src), str(tmp_path / "x.qnb")]) == 1
    err = capsys.readouterr().err
    assert "layers.sep5.dw.weight" in err and "(31, 1, 3, 3)" in err
    assert not (tmp_path / "x.qnb").exists()


# ------------------------------------------------------------ safetensors reader

def test_safetensors_dtypes(tmp_path):
    f32 = np.array([[1.5, -2.0], [3.25, 0.0]], np.float32)
    bf16 = (f32.view(np.uint32) >> 16).astype(np.uint16)  # exact in bf16
    tensors = {"f32": f32.tobytes(), "f16": f32.astype(np.float16).tobytes(),
               "f64": f32.astype(np.float64).tobytes(), "bf16": bf16.astype("<u2").tobytes(),
               "i64": np.array([7, -1], "<i8").tobytes(), "i32": np.array([3], "<i4").tobytes(),
               "u8": np.array([255, 1], np.uint8).tobytes(), "b": np.array([1, 0], np.uint8).tobytes(),
               "empty": b""}
    meta = {"f32": ("F32", [2, 2]), "f16": ("F16", [2, 2]), "f64": ("F64", [2, 2]),
            "bf16": ("BF16", [2, 2]), "i64": ("I64", [2]), "i32": ("I32", [1]),
            "u8": ("U8", [2]), "b": ("BOOL", [2]), "empty": ("F32", [0, 3])}
    header, data = {"__metadata__": {"x": "y"}}, b""
    for name, raw in tensors.items():
        header[name] = {"dtype": meta[name][0], "shape": meta[name][1],
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    path = tmp_path / "d.safetensors"
    _write_raw(path, header, data)
    out = read_state_dict(path)
    assert list(out) == list(tensors)  # stored order, __metadata__ skipped
    for k in ("f32", "f16", "f64", "bf16"):
        assert out[k].dtype == np.float32
        np.testing.assert_array_equal(out[k], f32)
    np.testing.assert_array_equal(out["i64"], [7, -1])
    assert out["i64"].dtype == np.int64 and out["i32"].tolist() == [3]
    assert out["u8"].tolist() == [255, 1] and out["b"].tolist() == [True, False]
    assert out["empty"].shape == (0, 3)
    if importlib.util.find_spec("safetensors") is not None:  # cross-check the reference reader
        from safetensors.torch import load_file
        ref = load_file(str(path))
        assert list(ref) == list(out) or set(ref) == set(out)
        for k, t in ref.items():
            want = t.float().numpy() if t.is_floating_point() else t.numpy()
            np.testing.assert_array_equal(want, out[k])


def _valid(tmp_path):
    a = np.arange(6, dtype=np.float32)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    data = a.tobytes() + np.ones(2, np.float32).tobytes()
    path = tmp_path / "v.safetensors"
    _write_raw(path, header, data)
    assert set(read_state_dict(path)) == {"a", "b"}
    return path, header, data


@pytest.mark.parametrize("case, message", [
    ("header_too_long", "header length"),
    ("header_tiny", "header length"),
    ("short_file", "too short"),
    ("not_json", "not JSON"),
    ("not_object", "not a JSON object"),
    ("out_of_range", "outside"),
    ("overlap", "overlap"),
    ("unknown_dtype", "unsupported dtype 'F8_E9M9'"),
    ("size_mismatch", "needs 24"),
    ("bad_shape", "bad shape"),
    ("bad_offsets", "bad data_offsets"),
    ("truncated", "outside"),
    ("hole", "belong to no tensor"),
    ("trailing", "belong to no tensor"),
])
def test_malformed_safetensors(tmp_path, case, message):
    path, header, data = _valid(tmp_path)
    h = json.loads(json.dumps(header))
    if case == "header_too_long":
        _write_raw(path, h, data, header_len=10**6)
    elif case == "header_tiny":
        _write_raw(path, h, data, header_len=0)
    elif case == "short_file":
        path.write_bytes(b"\x01\x00")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 8) + b"{oops!!}" + data)
    elif case == "not_object":
        _write_raw(path, [1, 2], data)
    elif case == "out_of_range":
        h["b"]["data_offsets"] = [24, 40]
        h["b"]["shape"] = [4]
        _write_raw(path, h, data)
    elif case == "overlap":
        h["b"]["data_offsets"] = [16, 24]
        _write_raw(path, h, data[:24])
    elif case == "unknown_dtype":
        h["a"]["dtype"] = "F8_E9M9"
        _write_raw(path, h, data)
    elif case == "size_mismatch":
        h["a"]["data_offsets"] = [0, 20]
        _write_raw(path, h, data)
    elif case == "bad_shape":
        h["a"]["shape"] = [2, -3]
        _write_raw(path, h, data)
    elif case == "bad_offsets":
        h["a"]["data_offsets"] = [0]
        _write_raw(path, h, data)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    elif case == "hole":
        h["b"]["data_offsets"] = [28, 36]
        _write_raw(path, h, data + b"\0" * 4)
    elif case == "trailing":
        _write_raw(path, h, data + b"\0" * 4)
    with pytest.raises(ValueError, match=message) as info:
        read_state_dict(path)
    assert "not a valid safetensors file" in str(info.value)


# ------------------------------------------------------------ pickles

_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


class _Custom:
    def __init__(self):
        self.w = torch.zeros(3)


@pytest.mark.parametrize("obj", ["payload", "custom", "module"])
def test_unsafe_pickle_refused(tmp_path, obj, capsys):
    path = tmp_path / "evil.pt"
    value = {"payload": {"x": _Payload()}, "custom": {"w": _Custom()},
             "module": train.QuickNet(WIDTH)}[obj]
    torch.save(value, path)
    with pytest.raises(ValueError, match="refused to load.*weights-only") as info:
        read_state_dict(path)
    assert "state_dict()" in str(info.value)
    assert not _EXECUTED
    assert cli(["convert", str(path), str(tmp_path / "x.qnb")]) == 1
    assert "refused to load" in capsys.readouterr().err
    assert not _EXECUTED


def test_pt_wrappers_and_errors(tmp_path, quicknet):
    sd = quicknet.state_dict()
    for wrapped in ({"model": sd, "optimizer": {}}, {"model_state_dict": sd, "epoch": 1}):
        path = tmp_path / "w.pth"
        torch.save(wrapped, path)
        out = read_state_dict(path)
        assert list(out) == list(sd)
        assert out["layers.stem.bn.running_var"].dtype == np.float32
    half = tmp_path / "h.bin"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, half)
    assert read_state_dict(half)["layers.stem.conv.weight"].dtype == np.float32
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(tmp_path / "l.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip or a pickle")
    with pytest.raises(ValueError, match="junk.pt"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pt")


def test_without_torch(tmp_path, quicknet, monkeypatch):
    path = tmp_path / "m.pt"
    torch.save(quicknet.state_dict(), path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(TorchNotInstalled, match="pip install torch.*safetensors"):
        read_state_dict(path)
    st = tmp_path / "m.safetensors"
    write_safetensors(st, _np(quicknet.state_dict()))
    assert quicknet_from_state_dict(read_state_dict(st)).metadata["model.width"] == WIDTH
