"""Image preprocessing as .qnb metadata describes it, for any Pillow mode and size."""
import os

import numpy as np
import pytest
from PIL import Image

from qnrt.image import ImageError, load_image, preprocess

META = {"preprocess.size": [32, 32], "preprocess.mode": "RGB", "preprocess.mean": [0.5] * 3,
        "preprocess.std": [0.5] * 3}


def test_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = preprocess(Image.fromarray(pixels), {**META, "preprocess.channel_order": "BGR"})
    ref = ((pixels[:, :, ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    np.testing.assert_allclose(x, ref, atol=1e-6)
    assert x.dtype == np.float32 and x.flags.c_contiguous


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"])
def test_every_mode_becomes_the_model_input(mode):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 13), dtype=np.uint8))
    x = preprocess(image.convert(mode), META)
    assert x.shape == (3, 32, 32) and np.isfinite(x).all()


def test_native_size_reads_an_enlarged_image_like_the_original():
    small = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8))
    meta = {**META, "preprocess.native_size": [8, 8]}
    big = small.resize((64, 64), Image.Resampling.NEAREST).convert("RGB")
    np.testing.assert_allclose(preprocess(big, meta), preprocess(small, meta), atol=1e-6)


def test_transparent_pixels_are_composited_on_black():
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    assert np.allclose(preprocess(rgba, META), -1.0)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(str(tmp_path / "bad.png"), META)
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(tmp_path / "none.png"), META)


def test_sixteen_bit_grey_keeps_its_range():
    grey = np.random.default_rng(3).integers(0, 256, (16, 16)).astype(np.uint16)
    wide = Image.fromarray(grey * 257)  # the same picture stored in 16 bits
    assert wide.mode.startswith("I")
    np.testing.assert_allclose(preprocess(wide, META),
                               preprocess(Image.fromarray(grey.astype(np.uint8)), META), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20), np.uint8)
    pixels[:, :5] = 255  # bright left edge
    upright = Image.fromarray(pixels).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_270)  # as a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation tag: turn 90 degrees counter-clockwise to display
    stored.save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_allclose(load_image(str(tmp_path / "photo.png"), META),
                               preprocess(upright, META), atol=1e-6)


def test_only_regular_files_and_the_listed_formats_are_opened(tmp_path):
    import threading

    from qnrt.image import IMAGE_FORMATS, ImageError, load_image

    meta = {"preprocess.size": [8, 8]}
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)  # a named pipe called x.png: refused at once, not read forever
    done = []
    t = threading.Thread(target=lambda: done.append(_error_of(load_image, str(fifo), meta)))
    t.start()
    t.join(5)
    assert done and "not a regular file" in done[0]
    eps = tmp_path / "drawing.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(ImageError, match="not a readable image in a format qnrt reads"):
        load_image(str(eps), meta)
    assert "EPS" not in IMAGE_FORMATS
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("TIFF", "tif")):
        path = tmp_path / f"ok.{suffix}"
        Image.new("RGB", (10, 12), (200, 10, 30)).save(path, fmt)
        assert load_image(str(path), meta).shape == (3, 8, 8)


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return str(exc)
    return ""


def test_a_large_16_bit_image_is_converted_without_float64_copies():
    import tracemalloc

    from qnrt.image import _to_8bit

    x = np.random.default_rng(5).integers(0, 65536, (3000, 2000), dtype=np.uint16)
    tracemalloc.start()
    try:
        out = np.asarray(_to_8bit(Image.fromarray(x)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(out, ((x.astype(np.int64) + 128) // 257).astype(np.uint8))
    assert peak < 4 * x.nbytes, peak  # a float64 copy alone would be 4x the 16-bit image
