"""tools/train.py: the PyTorch QuickNet, its neutral weights, data and CLI."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from qnrt.models import quicknet  # noqa: E402
from helpers import load_tool  # noqa: E402


train = load_tool("train")
datasets = train.datasets


# ---------------------------------------------------------------- NumPy reference forward
def _conv(x, w, group):
    """x (N,C,H,W), w (O, C/group, k, k), stride 1, 'same' padding."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((n, o, h, wd), dtype=np.float64)
    og = o // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for i in range(k):
            for j in range(k):
                out[:, g * og:(g + 1) * og] += np.einsum(
                    "nchw,oc->nohw", xs[:, :, i:i + h, j:j + wd], ws[:, :, i, j])
    return out


def _bn_prelu(x, wts, prefix, bn, prelu):
    b = f"{prefix}.{bn}"
    sc = lambda a: np.asarray(wts[a], np.float64)[None, :, None, None]  # noqa: E731
    y = (x - sc(f"{b}.mean")) / np.sqrt(sc(f"{b}.var") + quicknet.BN_EPSILON) * sc(f"{b}.scale") \
        + sc(f"{b}.bias")
    return np.where(y > 0, y, sc(f"{prefix}.{prelu}.slope") * y)


def numpy_forward(wts, x, width, num_classes=10):
    x = x.astype(np.float64)
    for kind, name, cin, cout in quicknet.layer_plan(width, num_classes):
        if kind == "conv":
            x = _bn_prelu(_conv(x, wts[f"{name}.conv.weight"], 1), wts, name, "bn", "prelu")
        elif kind == "sep":
            x = _bn_prelu(_conv(x, wts[f"{name}.dw.weight"], cin), wts, name, "dw_bn", "dw_prelu")
            x = _bn_prelu(_conv(x, wts[f"{name}.pw.weight"], 1), wts, name, "pw_bn", "pw_prelu")
        elif kind == "pool":
            n, c, h, w = x.shape
            x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        else:
            x = _conv(x, wts["head.conv.weight"], 1) + wts["head.conv.bias"][None, :, None, None]
            x = x.mean(axis=(2, 3))
    return x


# ---------------------------------------------------------------- model and neutral weights
@pytest.mark.parametrize("width", [0.125, 1.0])
def test_state_to_neutral_names_and_shapes(width):
    model = train.QuickNet(width)
    neutral = train.state_to_neutral(model)
    expected = quicknet.weight_shapes(width)
    assert list(neutral) == list(expected)
    for name, shape in expected.items():
        assert neutral[name].shape == shape, name
        assert neutral[name].dtype == np.float32


def test_neutral_mapping_semantics():
    model = train.QuickNet(0.125)
    neutral = train.state_to_neutral(model)
    bn, prelu = model.layers["sep2"].pw_bn, model.layers["sep2"].pw_prelu
    np.testing.assert_array_equal(neutral["sep2.pw_bn.scale"], bn.weight.detach().numpy())
    np.testing.assert_array_equal(neutral["sep2.pw_bn.var"], bn.running_var.numpy())
    np.testing.assert_array_equal(neutral["sep2.pw_prelu.slope"], prelu.weight.detach().numpy())
    assert bn.eps == quicknet.BN_EPSILON and abs(bn.momentum - 0.01) < 1e-12
    assert model.layers["sep3"].dw.groups == model.layers["sep3"].dw.in_channels
    assert model.layers["stem"].conv.bias is None and model.layers["head"].conv.bias is not None


def test_load_neutral_round_trip_and_torch_matches_numpy():
    width = 0.125
    wts = quicknet.initial_weights(width, seed=3)  # non-trivial BN statistics
    rng = np.random.default_rng(1)
    for k in wts:
        if k.endswith(".slope"):
            wts[k] = rng.uniform(0.0, 0.5, wts[k].shape).astype(np.float32)
    model = train.QuickNet(width)
    train.load_neutral(model, wts)
    back = train.state_to_neutral(model)
    for k in wts:
        np.testing.assert_array_equal(back[k], wts[k])
    model.eval()
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    ref = numpy_forward(wts, x, width)
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_load_neutral_rejects_wrong_width():
    model = train.QuickNet(0.25)
    with pytest.raises(ValueError, match="width|fit"):
        train.load_neutral(model, quicknet.initial_weights(0.125))


def test_graph_from_trained_weights_builds():
    model = train.QuickNet(0.125)
    graph = quicknet.build(train.state_to_neutral(model), width=0.125)
    assert graph.parameter_count() == quicknet.keras_parameter_count(0.125)


def test_magnitude_pruning_per_layer():
    model = train.QuickNet(0.125)
    masks = train.magnitude_masks(model, 0.5)
    train.apply_masks(model, masks)
    for name, p in train.conv_weights(model).items():
        zeros = int((p == 0).sum())
        assert abs(zeros - round(0.5 * p.numel())) <= 1, name
    assert abs(train.conv_sparsity(model) - 0.5) < 0.01

    model = train.QuickNet(0.125)
    ones = train.magnitude_masks(model, 0.75, "1x1")
    assert set(ones) == {n for n in train.conv_weights(model)
                         if n.endswith((".pw.weight", "head.conv.weight"))}
    train.apply_masks(model, ones)
    assert abs(train.conv_sparsity(model, "1x1") - 0.75) < 0.01
    assert int((model.layers["sep1"].dw.weight == 0).sum()) == 0
    assert train.cubic_sparsity(0.8, 0.0) == 0.0 and train.cubic_sparsity(0.8, 1.0) == 0.8


def test_recalibrate_bn_matches_batch_statistics():
    model = train.QuickNet(0.125)
    images = datasets.digits_split()[0][:40]
    train.recalibrate_bn(model, images, batch_size=40)
    x = torch.from_numpy(datasets.to_array(images))
    with torch.no_grad():
        h = model.layers["stem"].conv(x)
    bn = model.layers["stem"].bn
    np.testing.assert_allclose(bn.running_mean.numpy(), h.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert bn.momentum == 0.01 and not model.training


# ---------------------------------------------------------------- data
def test_digits_split_deterministic_and_stratified():
    a_tr, a_te = datasets.digits_split_indices()
    b_tr, b_te = datasets.digits_split_indices()
    np.testing.assert_array_equal(a_tr, b_tr)
    np.testing.assert_array_equal(a_te, b_te)
    assert len(a_te) == 360 and len(a_tr) == 1437
    assert not set(a_tr) & set(a_te)
    from sklearn.datasets import load_digits
    target = load_digits().target
    counts = np.bincount(target[a_te], minlength=10)
    expected = np.bincount(target, minlength=10) * 0.2
    assert np.all(np.abs(counts - expected) <= 1)

    tr_x, tr_y, te_x, te_y = datasets.digits_split()
    assert len(te_x) == 360 and te_y == [int(t) for t in target[a_te]]
    assert te_x[0].mode == "L" and te_x[0].size == (8, 8)


def test_digit_image_is_what_a_png_would_hold():
    from sklearn.datasets import load_digits
    d = load_digits()
    im = datasets.digit_to_image(d.images[0])
    np.testing.assert_array_equal(np.asarray(im), np.rint(d.images[0] * 255 / 16).astype(np.uint8))
    x = datasets.to_array([im])
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x[0, 0], x[0, 2])  # grey repeated into RGB


def test_augmentation_keeps_image_format():
    from PIL import Image
    rng = np.random.default_rng(0)
    im = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    same = datasets.random_affine(im, rng, degrees=0, translate=0, scale=(1, 1))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(im))
    out = datasets.augment("cifar10", im.convert("RGB"), rng)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_digits_training_items_draw_every_kind_at_the_input_size():
    items, labels, test_images, test_labels, names = datasets.load("digits")
    assert names[-1] == datasets.NOT_A_DIGIT and len(names) == 11
    assert len(test_images) == 360 and set(test_labels) == set(range(10))
    kinds = {type(i).__name__ for i in items}
    assert kinds == {"Image", "FontDigit", "NonDigit"}
    assert all((lab == datasets.NOT_A_DIGIT_CLASS) == isinstance(i, datasets.NonDigit)
               for i, lab in zip(items, labels))
    assert all(lab == i.digit for i, lab in zip(items, labels) if isinstance(i, datasets.FontDigit))
    rng = np.random.default_rng(0)
    polarity = set()
    for k in np.random.default_rng(1).choice(len(items), 200, replace=False):
        im = datasets.augment("digits", items[k], rng)
        assert im.size in ((8, 8), (datasets.CANVAS, datasets.CANVAS)) or isinstance(items[k], datasets.NonDigit)
        x = datasets.to_array([im])
        assert x.shape == (1, 3, 32, 32) and np.isfinite(x).all()
        if not isinstance(items[k], datasets.NonDigit):
            corners = x[0, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean()
            polarity.add(bool(corners > 0))  # light paper or dark paper
    assert polarity == {True, False}


def test_the_everyday_sets_are_held_out():
    """The drawn digits use the held-out split, fonts and seed; the non-digit
    photo crops lie in rows no training crop reaches."""
    assert not set(datasets.TRAIN_FONTS) & set(datasets.HELDOUT_FONTS)
    assert datasets.PHOTO_TRAIN_ROWS[1] <= datasets.PHOTO_HELDOUT_ROWS[0]
    import inspect
    assert inspect.signature(datasets.non_digit).parameters["rows"].default == datasets.PHOTO_TRAIN_ROWS
    rng = np.random.default_rng(3)
    for rows, low, high in ((datasets.PHOTO_TRAIN_ROWS, 12, 280), (datasets.PHOTO_HELDOUT_ROWS, 24, 127)):
        for _ in range(300):
            k, (left, top, right, bottom) = datasets.photo_crop_box(rng, rows, low, high)
            assert rows[0] <= top < bottom <= rows[1] and 0 <= left < right <= datasets.photos()[k].width
    drawn = list(datasets.drawn_digits())
    handwritten = [d for d in drawn if d.source == "handwritten"]
    conditions = len(datasets.DRAWN_CANVASES) * len(datasets.DRAWN_HEIGHTS) * len(datasets.POLARITIES)
    assert len(handwritten) == 360 * conditions
    assert {d.canvas for d in drawn} == set(datasets.DRAWN_CANVASES)
    assert datasets.CANVAS not in datasets.DRAWN_CANVASES
    assert {d.image.size for d in drawn} == {(c, c) for c in datasets.DRAWN_CANVASES}


def test_widen_head_keeps_the_old_classes():
    width = 0.125
    old = quicknet.initial_weights(width, seed=4)
    wide = train.widen_head(old, 11)
    model10, model11 = train.QuickNet(width, 10), train.QuickNet(width, 11)
    train.load_neutral(model10, old)
    train.load_neutral(model11, wide)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    model10.eval(), model11.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model11(x)[:, :10].numpy(), model10(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="more than"):
        train.widen_head(wide, 10)


def _write_cifar_fixture(root, per_batch=4, test=10):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                  "dog", "frog", "horse", "ship", "truck")]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    for k, count in [(i, per_batch) for i in range(1, 6)] + [("test", test)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, count)]}
        name = "test_batch" if k == "test" else f"data_batch_{k}"
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reader(tmp_path):
    _write_cifar_fixture(tmp_path / "cifar")
    tr_x, tr_y, te_x, te_y, names = datasets.cifar10_split(str(tmp_path / "cifar"))
    assert len(tr_x) == 20 and len(te_x) == 10 and names[0] == "airplane"
    assert tr_x[0].mode == "RGB" and tr_x[0].size == (32, 32)
    with open(tmp_path / "cifar" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(np.asarray(tr_x[0]).transpose(2, 0, 1).reshape(-1), raw[b"data"][0])


# ---------------------------------------------------------------- CLI
def test_cli_cifar10_one_epoch(tmp_path):
    _write_cifar_fixture(tmp_path / "cifar")
    out = tmp_path / "w.npz"
    rc = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--epochs", "1",
                     "--limit", "16", "--width", "0.125", "--batch-size", "8", "--out-npz", str(out)])
    assert rc == 0
    w = train.load_npz(str(out))
    expected = quicknet.weight_shapes(0.125)
    assert set(w) == set(expected) and all(w[k].shape == s for k, s in expected.items())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_cli_digits_one_epoch_then_prune_from_init(tmp_path):
    out = tmp_path / "d.npz"
    assert train.main(["--dataset", "digits", "--epochs", "1", "--limit", "64", "--width", "0.125",
                       "--out-npz", str(out)]) == 0
    pruned = tmp_path / "p.npz"
    assert train.main(["--dataset", "digits", "--epochs", "0", "--limit", "64", "--width", "0.125",
                       "--init-npz", str(out), "--prune", "0.5", "--prune-epochs", "2",
                       "--out-npz", str(pruned)]) == 0
    w = train.load_npz(str(pruned))
    conv = [k for k in w if k.endswith((".pw.weight", "head.conv.weight"))]
    zeros = sum(int((w[k] == 0).sum()) for k in conv)
    total = sum(w[k].size for k in conv)
    assert abs(zeros / total - 0.5) < 0.02


def test_cli_is_repeatable(tmp_path):
    args = ["--dataset", "digits", "--epochs", "1", "--limit", "32", "--width", "0.125"]
    assert train.main(args + ["--out-npz", str(tmp_path / "a.npz")]) == 0
    assert train.main(args + ["--out-npz", str(tmp_path / "b.npz")]) == 0
    a, b = train.load_npz(str(tmp_path / "a.npz")), train.load_npz(str(tmp_path / "b.npz"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_export_metadata(tmp_path):
    pytest.importorskip("qnrt.format")
    from qnrt import format as qnb
    neutral = train.state_to_neutral(train.QuickNet(0.125))
    path = tmp_path / "m.qnb"
    train.export(neutral, width=0.125, labels=[str(i) for i in range(10)], dataset="digits",
                 accuracy=0.5, heldout="test", out_qnb=str(path))
    graph = qnb.load(str(path))
    for k, v in train.METADATA.items():
        assert graph.metadata[k] == pytest.approx(v) if isinstance(v, float) else graph.metadata[k] == v
    assert graph.metadata["model.trained"] is True and graph.metadata["model.dataset"] == "digits"


def test_torch_matches_qnrt_session_and_qnb_export(tmp_path):
    pytest.importorskip("qnrt.format")
    qnrt = pytest.importorskip("qnrt")
    width = 0.125
    wts = quicknet.initial_weights(width, seed=5)
    model = train.QuickNet(width)
    train.load_neutral(model, wts)
    model.eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    path = tmp_path / "m.qnb"
    train.export(train.state_to_neutral(model), width=width, labels=list("abcdefghij"),
                 dataset="digits", accuracy=0.25, heldout="test", out_qnb=str(path))
    sess = qnrt.Session(str(path))
    assert sess.metadata["labels"] == list("abcdefghij")
    assert sess.metadata["model.accuracy"] == pytest.approx(0.25)
    got = sess.run(["probabilities"], {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
