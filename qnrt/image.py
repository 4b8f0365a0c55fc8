"""Image preprocessing as the .qnb metadata describes it.

Metadata keys (all optional; defaults in DEFAULTS):
    preprocess.size       [H, W] the network input size
    preprocess.mode       "RGB" or "L": the colour mode the image is converted to
                          before resizing (an "L" image is repeated to fill 3 channels)
    preprocess.resample   "nearest" | "bilinear" | "bicubic" | "lanczos" | "box"
    preprocess.scale      multiply the 0..255 pixel values by this first
    preprocess.mean, preprocess.std   per channel, after scaling: (x - mean) / std
    preprocess.channel_order          "RGB" or "BGR"
    preprocess.native_size  [H, W], optional: the resolution the training images
                          had. An image of another size is first area-averaged
                          (box filter) to it, so a large picture is seen the way
                          the training data was: e.g. 8x8 digits viewed at 32x32.
"""
from __future__ import annotations

import os
import stat

import numpy as np

DEFAULTS = {
    "preprocess.size": [32, 32],
    "preprocess.mode": "RGB",
    "preprocess.resample": "bilinear",
    "preprocess.scale": 1.0 / 255.0,
    "preprocess.mean": [0.0, 0.0, 0.0],
    "preprocess.std": [1.0, 1.0, 1.0],
    "preprocess.channel_order": "RGB",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The only formats Pillow may decode here: not every plugin it has (EPS, for
# one, is handed to Ghostscript), whatever a file's name says.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


from .errors import ImageError  # noqa: E402  (defined with the others, re-exported here)


RESAMPLE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
MODES = ("RGB", "L", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F")


def check_preprocess(metadata: dict, channels: int | None = None) -> None:
    """ImageError naming the key for preprocessing metadata that cannot be used
    (so `qnrt convert` refuses it and `qnrt run` says so once, not per image)."""
    s = settings(metadata)

    def fail(key, why):
        raise ImageError(f"preprocess.{key} = {metadata.get('preprocess.' + key)!r}: {why}")

    for key in ("size", "native_size"):
        v = metadata.get(f"preprocess.{key}", s.get(f"preprocess.{key}"))
        if v is None:
            continue
        if (not isinstance(v, (list, tuple)) or len(v) != 2
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                           and 0 < d <= 1 << 16 for d in v)):
            fail(key, "must be two positive ints, height and width (e.g. size=32,32)")
    for key in ("mean", "std"):
        v = s[f"preprocess.{key}"]
        ok = (isinstance(v, (list, tuple)) and len(v) in (1, channels or len(v))
              and all(isinstance(x, (int, float)) and np.isfinite(x) for x in v))
        if not ok:
            fail(key, f"must be 1{f' or {channels}' if channels and channels != 1 else ''} "
                      "finite numbers")
        if key == "std" and any(x == 0 for x in v):
            fail(key, "must not be 0")
    scale = s["preprocess.scale"]
    if not isinstance(scale, (int, float)) or not np.isfinite(scale):
        fail("scale", "must be a finite number")
    if s["preprocess.mode"] not in MODES:
        fail("mode", f"must be one of {', '.join(MODES)}")
    if str(s["preprocess.resample"]).lower() not in RESAMPLE_FILTERS:
        fail("resample", f"must be one of {', '.join(RESAMPLE_FILTERS)}")
    if s["preprocess.channel_order"] not in ("RGB", "BGR"):
        fail("channel_order", "must be RGB or BGR")


def settings(metadata: dict) -> dict:
    return {k: metadata.get(k, v) for k, v in DEFAULTS.items()}


def preprocess(image, metadata: dict, channels: int = 3) -> np.ndarray:
    """A PIL image (any mode, any size) -> float32 array (channels, H, W)."""
    from PIL import Image, ImageOps

    s = settings(metadata)
    image = ImageOps.exif_transpose(image)  # a phone photo's orientation tag
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _to_8bit(image)
    h, w = (int(v) for v in s["preprocess.size"])
    mode = s["preprocess.mode"]
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # composite transparent pixels on black, which is what the training data saw
        bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(bg, image.convert("RGBA"))
    image = image.convert(mode)
    resample = getattr(Image.Resampling, str(s["preprocess.resample"]).upper(), None)
    if resample is None:
        raise ImageError(f"unknown resample filter '{s['preprocess.resample']}'")
    native = metadata.get("preprocess.native_size")
    if native:
        nh, nw = (int(v) for v in native)
        if image.size != (nw, nh):
            image = image.resize((nw, nh), Image.Resampling.BOX)
    if image.size != (w, h):
        image = image.resize((w, h), resample)
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], channels, axis=2)
    if x.shape[2] != channels:
        raise ImageError(f"image has {x.shape[2]} channels after conversion to {mode}, "
                         f"the model takes {channels}")
    if s["preprocess.channel_order"] == "BGR":
        x = x[:, :, ::-1]
    x = x * np.float32(s["preprocess.scale"])
    mean = np.asarray(s["preprocess.mean"], dtype=np.float32)
    std = np.asarray(s["preprocess.std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


BLOCK_ROWS = 256  # rows converted at a time: no float64 copy of a whole large image


def _to_8bit(image):
    """16-bit and 32-bit grey images to 8 bits, keeping their range (Pillow's own
    convert clips them at 255). Block by block, so a large picture needs one
    8-bit copy, not float64 ones."""
    from PIL import Image

    src = np.asarray(image)
    out = np.empty(src.shape, np.uint8)
    peak = src.max() if src.size else 0
    if image.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if image.mode.startswith("I;16") or peak > 255 else 1.0  # 0..65535
    for r0 in range(0, src.shape[0], BLOCK_ROWS):
        block = src[r0:r0 + BLOCK_ROWS].astype(np.float64) * scale
        out[r0:r0 + BLOCK_ROWS] = np.clip(np.rint(block), 0, 255)
    return Image.fromarray(out, "L")


MAX_PIXELS = 89_478_485  # Pillow's own limit (about 0.25 GiB of RGBA): larger is refused


def load_image(path: str, metadata, channels: int = 3, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image at `path`, preprocessed as `metadata` says (a Session's metadata,
    or the Session itself). Images of more than `max_pixels` pixels are refused
    before they are decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if hasattr(metadata, "metadata") and not isinstance(metadata, dict):  # a Session
        metadata = metadata.metadata
    try:
        with _open_regular(path) as f, Image.open(f, formats=IMAGE_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"{path}: {im.width}x{im.height} is more than {max_pixels:,} "
                                 "pixels; refused (qnrt run --max-pixels N raises the limit)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked above
                im.load()
            return preprocess(im, metadata, channels)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image in a format qnrt reads "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None


def _open_regular(path: str):
    """The file, opened for reading only if it is a regular file: a FIFO, a
    device or a socket is refused instead of blocking the reader forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: not a regular file (a pipe, device or socket); refused")
        if st.st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def list_images(paths: list[str], recursive: bool = False) -> list[str]:
    """Files as given; folders expanded to their image files, sorted (and their
    subfolders' with `recursive`)."""
    found = []
    for p in paths:
        if not os.path.isdir(p):
            found.append(p)
        elif recursive:
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found += sorted(os.path.join(root, f) for f in files
                                if f.lower().endswith(IMAGE_SUFFIXES))
        else:
            found += sorted(os.path.join(p, f) for f in os.listdir(p)
                            if f.lower().endswith(IMAGE_SUFFIXES))
    return found


def skipped_subfolders(paths: list[str]) -> list[str]:
    """The subfolders of the given folders (not walked without `recursive`)."""
    return [os.path.join(p, d) for p in paths if os.path.isdir(p)
            for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d))]
