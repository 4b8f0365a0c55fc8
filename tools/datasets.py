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
             `digits_split`. Eleven classes: 0..9 and "not a digit". Training
             draws each sample afresh (`augment`): a training digit or a
             digit in one of TRAIN_FONTS, at a random size, place, slant and
             stroke width on a 32x32 canvas, in either polarity, grey or colour;
             or a non-digit (a crop of the top of sklearn's bundled photos, a
             blank, noise, a texture). `drawn_digits` and `non_digits` are
             the held-out "everyday input" sets, generated differently.
    cifar10  the official CIFAR-10 "python version" directory (data_batch_1..5,
             test_batch, batches.meta); held out = test_batch.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

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
# (None now: the digits model is trained on digits of every size on a 32x32
# canvas, so a picture is resized straight to 32x32, Pillow's bilinear filter
# widened to average every pixel when shrinking.)
NATIVE_SIZE: dict = {}


def metadata_for(dataset: str) -> dict:
    """METADATA plus the data set's native size, as the exported model carries it."""
    meta = dict(METADATA)
    if dataset in NATIVE_SIZE:
        meta["preprocess.native_size"] = list(NATIVE_SIZE[dataset])
    return meta

NOT_A_DIGIT = "not a digit"
DIGITS_LABELS = [str(i) for i in range(10)] + [NOT_A_DIGIT]
NOT_A_DIGIT_CLASS = 10
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
        train_images, train_labels, test_images, test_labels = digits_split()
        items, labels = digits_training_items(train_images, train_labels)
        return items, labels, test_images, test_labels, list(DIGITS_LABELS)
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


def augment(name: str, image, rng: np.random.Generator) -> Image.Image:
    """The training augmentation for a dataset, on the PIL image before preprocess.

    For digits, `image` is a training item (`digits_training_items`): an 8x8
    training digit, a FontDigit or a NonDigit, drawn afresh every time."""
    if name == "digits":
        return draw_training_item(image, rng)
    # CIFAR-10: the usual shift by up to 4 px (zero filled) and horizontal flip
    return random_affine(image, rng, degrees=0.0, translate=4.0, scale=(1.0, 1.0), flip=True)


# ----------------------------------------------------------------------------- everyday digits
CANVAS = 32  # the network's input size: training items are drawn at it

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")
# Digits are drawn in these fonts for training; HELDOUT_FONTS (other faces, and
# Pillow's built-in font, None) only for evaluation.
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
               "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansCondensed.ttf",
               "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerifCondensed.ttf")
HELDOUT_FONTS = (None, "DejaVuSans-ExtraLight.ttf", "DejaVuSerifCondensed-BoldItalic.ttf",
                 "DejaVuSansMono-BoldOblique.ttf", "DejaVuSansCondensed-BoldOblique.ttf")
# Non-digit photo crops: training crops lie wholly in the first rows of each of
# sklearn's bundled photos (427 rows), held-out crops wholly below the gap.
PHOTO_TRAIN_ROWS = (0, 280)
PHOTO_HELDOUT_ROWS = (300, 427)
HELDOUT_SEED = 20261204  # the held-out sets' own seed (training uses --seed)


@dataclass(frozen=True)
class FontDigit:
    font: str | None  # a font file name (found in FONT_DIRS), None: Pillow's built-in
    digit: int


@dataclass(frozen=True)
class NonDigit:
    kind: str  # "photo", "blank", "noise" or "texture"


_FONT_PATHS: dict = {}


def find_font(name: str | None):
    """The path of a font file by name in FONT_DIRS (None when absent or name is None)."""
    if name is None:
        return None
    if not _FONT_PATHS:
        for d in FONT_DIRS:
            for root, _, files in os.walk(d):
                for f in files:
                    _FONT_PATHS.setdefault(f, os.path.join(root, f))
        _FONT_PATHS.setdefault("", "")
    return _FONT_PATHS.get(name)


def available_fonts(names) -> list:
    return [n for n in names if n is None or find_font(n)]


_GLYPHS: dict = {}


def font_glyph(font: str | None, digit: int, stroke: int = 0, size: int = 64) -> Image.Image:
    """The digit in `font` as white ink on black, cropped to its ink, about `size` px tall."""
    from PIL import ImageDraw, ImageFont

    key = (font, digit, stroke, size)
    if key not in _GLYPHS:
        face = (ImageFont.load_default(size=size) if font is None
                else ImageFont.truetype(find_font(font), size=size))
        canvas = Image.new("L", (2 * size, 2 * size), 0)
        ImageDraw.Draw(canvas).text((size // 2, size // 4), str(digit), fill=255, font=face,
                                    stroke_width=stroke, stroke_fill=255)
        _GLYPHS[key] = canvas.crop(canvas.getbbox())
    return _GLYPHS[key]


def digit_glyph(image: Image.Image, size: int = 32) -> Image.Image:
    """An 8x8 data-set digit enlarged (bilinear) and cropped to its ink."""
    big = image.resize((size, size), Image.Resampling.BILINEAR)
    box = big.point(lambda v: 255 if v > 24 else 0).getbbox() or (0, 0, size, size)
    return big.crop(box)


def place(glyph: Image.Image, canvas: int, height: float, rng: np.random.Generator,
          degrees: float = 0.0, aspect: float = 1.0, centre: bool = False) -> Image.Image:
    """The glyph (white on black), rotated, scaled to `height` of the canvas (its
    width following, times `aspect`, at most the canvas) and put at a random
    place (or the centre) of a black square canvas."""
    if degrees:
        glyph = glyph.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
        glyph = glyph.crop(glyph.getbbox() or (0, 0, glyph.width, glyph.height))
    gh = max(2, min(canvas, int(round(height * canvas))))
    gw = max(1, min(canvas, int(round(glyph.width * gh / glyph.height * aspect))))
    shrink = gh < glyph.height
    g = glyph.resize((gw, gh), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    if centre:
        x0, y0 = (canvas - gw) // 2, (canvas - gh) // 2
    else:
        x0, y0 = int(rng.integers(0, canvas - gw + 1)), int(rng.integers(0, canvas - gh + 1))
    out = Image.new("L", (canvas, canvas), 0)
    out.paste(g, (x0, y0))
    return out


def _random_colour_pair(rng):
    """Two RGB colours (0..1) whose luminances differ by at least 0.45."""
    while True:
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        lum = np.array([0.299, 0.587, 0.114])
        if abs(float(lum @ a - lum @ b)) >= 0.45:
            return a, b


def style(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Ink `mask` (white on black) as a picture: random ink and paper levels, either
    polarity, sometimes colour, sometimes blurred or noisy."""
    from PIL import ImageFilter

    if rng.random() < 0.2:
        mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    m = np.asarray(mask, dtype=np.float32)[:, :, None] / 255.0
    if rng.random() < 0.3:
        paper, ink = _random_colour_pair(rng)
    else:
        paper = np.full(3, rng.uniform(0.0, 0.3))
        ink = np.full(3, rng.uniform(0.7, 1.0))
        if rng.random() < 0.5:
            paper, ink = 1.0 - paper, 1.0 - ink
    x = paper + (ink - paper) * m
    if rng.random() < 0.4:
        x = x + rng.normal(0.0, rng.uniform(0.01, 0.06), x.shape)
    x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    if np.all(x[..., 0] == x[..., 1]) and np.all(x[..., 1] == x[..., 2]):
        return Image.fromarray(x[..., 0], "L")
    return Image.fromarray(x, "RGB")


_PHOTOS: list = []


def photos() -> list:
    """sklearn's bundled sample photos (china.jpg, flower.jpg) as RGB PIL images."""
    if not _PHOTOS:
        from sklearn.datasets import load_sample_images

        _PHOTOS.extend(Image.fromarray(a, "RGB") for a in load_sample_images().images)
    return _PHOTOS


def photo_crop_box(rng: np.random.Generator, rows, min_size: int, max_size: int):
    """(photo index, (left, top, right, bottom)): a random crop (size and aspect
    random) of a bundled photo lying wholly within `rows`."""
    k = int(rng.integers(len(photos())))
    width = photos()[k].width
    top, bottom = rows
    h = int(rng.integers(min_size, min(max_size, bottom - top) + 1))
    w = int(min(width, max(min_size, round(h * rng.uniform(0.67, 1.5)))))
    y0 = int(rng.integers(top, bottom - h + 1))
    x0 = int(rng.integers(0, width - w + 1))
    return k, (x0, y0, x0 + w, y0 + h)


def photo_crop(rng: np.random.Generator, rows, min_size: int, max_size: int) -> Image.Image:
    k, box = photo_crop_box(rng, rows, min_size, max_size)
    return photos()[k].crop(box)


def texture(rng: np.random.Generator, size: int) -> Image.Image:
    """Stripes, a checkerboard, a gradient or blurred noise, grey or tinted."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = int(rng.integers(4))
    if kind == 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.5)
        v = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == 1:
        k = int(rng.integers(2, 9))
        v = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float32)
    elif kind == 2:
        angle = rng.uniform(0, 2 * np.pi)
        v = xx * np.cos(angle) + yy * np.sin(angle)
        v = (v - v.min()) / max(1e-6, float(v.max() - v.min()))
    else:
        from PIL import ImageFilter
        n = Image.fromarray((rng.uniform(0, 255, (size, size))).astype(np.uint8), "L")
        v = np.asarray(n.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, size / 6)))),
                       np.float32) / 255.0
        v = (v - v.min()) / max(1e-6, float(v.max() - v.min()))
    a, b = _random_colour_pair(rng) if rng.random() < 0.5 else (np.zeros(3), np.ones(3))
    x = a + (b - a) * v[:, :, None]
    return Image.fromarray(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), "RGB")


def non_digit(kind: str, rng: np.random.Generator, size: int, rows=PHOTO_TRAIN_ROWS) -> Image.Image:
    if kind == "photo":
        im = photo_crop(rng, rows, 12, rows[1] - rows[0])
        if rng.random() < 0.3:
            im = im.convert("L")
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im
    if kind == "blank":
        colour = tuple(int(v) for v in (rng.integers(0, 256, 3) if rng.random() < 0.5
                                        else [rng.integers(0, 256)] * 3))
        return Image.new("RGB", (size, size), colour)
    if kind == "noise":
        mean, sd = rng.uniform(0, 255), rng.uniform(5, 80)
        shape = (size, size, 3) if rng.random() < 0.5 else (size, size)
        return Image.fromarray(np.clip(rng.normal(mean, sd, shape), 0, 255).astype(np.uint8))
    return texture(rng, size)


NON_DIGIT_MIX = (("photo", 330), ("blank", 60), ("noise", 50), ("texture", 80))
FONT_REPEATS = 10  # each training font's digit this many times per epoch


def digits_training_items(train_images, train_labels):
    """(items, labels) for one epoch of `digits`: every training digit, every
    TRAIN_FONTS digit FONT_REPEATS times, and the NON_DIGIT_MIX non-digits."""
    items, labels = list(train_images), list(train_labels)
    for font in available_fonts(TRAIN_FONTS):
        for d in range(10):
            items += [FontDigit(font, d)] * FONT_REPEATS
            labels += [d] * FONT_REPEATS
    for kind, n in NON_DIGIT_MIX:
        items += [NonDigit(kind)] * n
        labels += [NOT_A_DIGIT_CLASS] * n
    return items, labels


def draw_training_item(item, rng: np.random.Generator) -> Image.Image:
    """One random rendering of a training item (`digits_training_items`)."""
    if isinstance(item, NonDigit):
        return non_digit(item.kind, rng, CANVAS)
    if isinstance(item, FontDigit):
        glyph = font_glyph(item.font, item.digit, stroke=int(rng.choice([0, 0, 1, 2, 3])))
        height = rng.uniform(0.3, 0.95)
    else:  # an 8x8 training digit
        if rng.random() < 0.2:  # as the data set holds it, either polarity
            return item if rng.random() < 0.5 else item.point(lambda v: 255 - v)
        glyph = digit_glyph(item)
        if rng.random() < 0.3:
            from PIL import ImageFilter
            glyph = glyph.filter(ImageFilter.MaxFilter(3))  # a broader pen
        height = rng.uniform(0.3, 1.0)
    mask = place(glyph, CANVAS, height, rng, degrees=float(rng.uniform(-12, 12)),
                 aspect=float(rng.uniform(0.8, 1.25)))
    return style(mask, rng)


# ----------------------------------------------------------------------------- held-out everyday input
DRAWN_CANVASES = (28, 64, 200)
DRAWN_HEIGHTS = (0.5, 0.8)  # the digit's height as a fraction of the canvas: the rest is margin
POLARITIES = ("white on black", "black on white")


@dataclass
class DrawnDigit:
    image: Image.Image
    label: int
    source: str  # "handwritten" (a held-out data-set digit) or the held-out font's name
    canvas: int
    height: float
    polarity: str


def drawn_digits(seed: int = HELDOUT_SEED):
    """Held-out digits drawn the way a user would: each of the 360 held-out
    data-set digits, and each digit in each HELDOUT_FONTS face (plain and bold
    pen), on a square canvas of every DRAWN_CANVASES size with the digit every
    DRAWN_HEIGHTS of its height at a random place (seeded by `seed`), in
    both POLARITIES, pure black and white. Nothing here was trained on: the
    data-set digits are the held-out split, the fonts are not TRAIN_FONTS, the
    canvases are not the training canvas, and there is no rotation."""
    rng = np.random.default_rng(seed)
    _, _, test_images, test_labels = digits_split()
    sources = [("handwritten", digit_glyph(im, 64), lab) for im, lab in zip(test_images, test_labels)]
    for font in available_fonts(HELDOUT_FONTS):
        for stroke in (0, 3):
            for d in range(10):
                sources.append((f"{font or 'pillow-default'}{' bold' if stroke else ''}",
                                font_glyph(font, d, stroke=stroke), d))
    for canvas in DRAWN_CANVASES:
        for height in DRAWN_HEIGHTS:
            for polarity in POLARITIES:
                for source, glyph, label in sources:
                    im = place(glyph, canvas, height, rng)
                    if polarity != POLARITIES[0]:
                        im = im.point(lambda v: 255 - v)
                    yield DrawnDigit(im, label, source, canvas, height, polarity)


def non_digits(seed: int = HELDOUT_SEED):
    """Held-out non-digits: (name, image) for 200 crops of the bundled photos
    from PHOTO_HELDOUT_ROWS (no pixel shared with a training crop), 16 blanks,
    16 noise images and 16 textures at 64x64 from the held-out seed, and the
    two whole photos (last; their top rows are what training crops came from)."""
    rng = np.random.default_rng(seed)
    for i in range(200):
        yield f"photo crop {i}", photo_crop(rng, PHOTO_HELDOUT_ROWS, 24, 127)
    for kind in ("blank", "noise", "texture"):
        for i in range(16):
            yield f"{kind} {i}", non_digit(kind, rng, 64)
    for name, photo in zip(("china.jpg", "flower.jpg"), photos()):
        yield f"whole photo {name}", photo
def to_array(images, metadata: dict = METADATA) -> np.ndarray:
    """PIL images -> float32 (N, 3, H, W) through qnrt.image.preprocess."""
    return np.stack([preprocess(im, metadata) for im in images]).astype(np.float32, copy=False)
