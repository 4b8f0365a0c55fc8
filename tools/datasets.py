"""Training / evaluation data for QuickNet, as PIL images plus integer labels.

Every image goes through `qnrt.image.preprocess(image, METADATA)`, exactly the
preprocessing that the shipped model's metadata describes, so what the network
saw in training is what `qnrt run model.qnb digit.png` feeds it.

This module needs numpy, pillow and (for `digits`) scikit-learn, but not torch:
evaluation tools can import it on its own (load it by path, e.g.
`importlib.util.spec_from_file_location("qnrt_tools_datasets", "tools/datasets.py")`).

Datasets
    digits   sklearn.datasets.load_digits (1797 8x8 images, values 0..16, white
             ink on black), each turned into the 8-bit grey PNG a user would have:
             uint8 = round(v * 255 / 16), mode "L", 8x8. Held-out split: see
             `digits_split`.
    cifar10  the official CIFAR-10 "python version" directory (data_batch_1..5,
             test_batch, batches.meta); held out = test_batch.
"""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
from PIL import Image

from qnrt.image import preprocess

# The preprocess.* keys the shipped model carries; training and evaluation use
# exactly these. "RGB" mode: a grey image becomes three equal channels (what
# PIL's convert("RGB") does), so the same 3-channel network serves colour input.
METADATA = {
    "preprocess.size": [32, 32],
    "preprocess.mode": "RGB",
    "preprocess.resample": "bilinear",
    "preprocess.scale": 1.0 / 255.0,
    "preprocess.mean": [0.5, 0.5, 0.5],
    "preprocess.std": [0.5, 0.5, 0.5],
    "preprocess.channel_order": "RGB",
}
# The resolution each data set's images have: a user's image of another size is
# area-averaged to it first (qnrt.image), so it is seen as training saw its data.
NATIVE_SIZE = {"digits": [8, 8]}


def metadata_for(dataset: str) -> dict:
    """METADATA plus the data set's native size, as the exported model carries it."""
    meta = dict(METADATA)
    if dataset in NATIVE_SIZE:
        meta["preprocess.native_size"] = list(NATIVE_SIZE[dataset])
    return meta

DIGITS_LABELS = [str(i) for i in range(10)]
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digit_to_image(values: np.ndarray) -> Image.Image:
    """An 8x8 array of 0..16 -> the 8x8 mode-"L" image a user's PNG would hold."""
    pixels = np.rint(np.asarray(values, dtype=np.float64).reshape(8, 8) * 255.0 / 16.0)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L")


def digits_split_indices(n_labels=None):
    """(train_indices, test_indices) into sklearn's load_digits() arrays.

    The rule: sklearn.model_selection.train_test_split(np.arange(1797),
    test_size=0.2, stratify=digits.target, random_state=0, shuffle=True);
    360 images are held out (36 per class, +-1), 1437 train. Both index arrays
    are in train_test_split's (shuffled) order.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target if n_labels is None else np.asarray(n_labels)
    idx = np.arange(len(target))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION,
                                           stratify=target, random_state=DIGITS_SPLIT_SEED,
                                           shuffle=True)
    return np.asarray(train_idx), np.asarray(test_idx)


def digits_split():
    """(train_images, train_labels, test_images, test_labels) for `digits`.

    Images are 8x8 PIL mode-"L" images (see `digit_to_image`), labels ints 0..9.
    The held-out 20 % is fixed: stratified by label, seed 0 (`digits_split_indices`
    gives the rule). Evaluate with `qnrt.image.preprocess(image, METADATA)`.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    train_idx, test_idx = digits_split_indices(d.target)
    images = [digit_to_image(v) for v in d.images]
    labels = [int(t) for t in d.target]
    return ([images[i] for i in train_idx], [labels[i] for i in train_idx],
            [images[i] for i in test_idx], [labels[i] for i in test_idx])


def _unpickle(path):
    # pickle is used ONLY for the official CIFAR-10 "python version" batches
    # (https://www.cs.toronto.edu/~kriz/cifar.html): that layout is pickled dicts
    # by definition. Never point --data-dir at files you do not trust.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(batch):
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    images = [Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), mode="RGB") for a in data]
    return images, [int(v) for v in batch[b"labels"]]


def cifar10_split(data_dir: str):
    """(train_images, train_labels, test_images, test_labels, label_names) from a
    CIFAR-10 python-batch directory; train = data_batch_1..5 (those present, at
    least one), held out = test_batch."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CIFAR-10 directory '{data_dir}' does not exist")
    meta_path = os.path.join(data_dir, "batches.meta")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing (expected the CIFAR-10 python-batch layout)")
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _unpickle(meta_path)[b"label_names"]]
    train_x, train_y = [], []
    for k in range(1, 6):
        p = os.path.join(data_dir, f"data_batch_{k}")
        if os.path.exists(p):
            x, y = _cifar_images(_unpickle(p))
            train_x += x
            train_y += y
    if not train_x:
        raise FileNotFoundError(f"{data_dir}: no data_batch_1..5 files")
    test_path = os.path.join(data_dir, "test_batch")
    if not os.path.exists(test_path):
        raise FileNotFoundError(f"{test_path}: missing")
    test_x, test_y = _cifar_images(_unpickle(test_path))
    return train_x, train_y, test_x, test_y, names


def load(name: str, data_dir: str | None = None):
    """(train_images, train_labels, test_images, test_labels, label_names)."""
    if name == "digits":
        return (*digits_split(), list(DIGITS_LABELS))
    if name == "cifar10":
        if not data_dir:
            raise ValueError("cifar10 needs --data-dir (the CIFAR-10 python-batch directory)")
        return cifar10_split(data_dir)
    raise ValueError(f"unknown dataset '{name}'")


def random_affine(image: Image.Image, rng: np.random.Generator, degrees: float = 10.0,
                  translate: float = 1.0, scale=(0.9, 1.1), flip: bool = False) -> Image.Image:
    """A small random affine change of a PIL image (rotation +-degrees, shift
    +-translate pixels, zoom in `scale`), background filled with black (the
    digits' background), bilinear; optional random horizontal flip."""
    w, h = image.size
    angle = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(*scale)
    tx, ty = rng.uniform(-translate, translate, size=2)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # PIL maps every output point p to input point A p + b; we want
    # p_out = c + s R (p_in - c) + t, so p_in = c + R^-1 (p_out - c - t) / s.
    cx, cy = w / 2.0, h / 2.0
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    a, b, d, e = cos, sin, -sin, cos
    ox, oy = cx + tx, cy + ty
    coeffs = (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)
    fill = 0 if image.mode == "L" else (0,) * len(image.getbands())
    return image.transform((w, h), Image.Transform.AFFINE, coeffs,
                           resample=Image.Resampling.BILINEAR, fillcolor=fill)


def augment(name: str, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The training augmentation for a dataset, on the PIL image before preprocess."""
    if name == "digits":  # sized for the 8x8 source image, as a user's digit might vary
        return random_affine(image, rng, degrees=10.0, translate=1.0, scale=(0.9, 1.1))
    # CIFAR-10: the usual shift by up to 4 px (zero filled) and horizontal flip
    return random_affine(image, rng, degrees=0.0, translate=4.0, scale=(1.0, 1.0), flip=True)


def to_array(images, metadata: dict = METADATA) -> np.ndarray:
    """PIL images -> float32 (N, 3, H, W) through qnrt.image.preprocess."""
    return np.stack([preprocess(im, metadata) for im in images]).astype(np.float32, copy=False)
