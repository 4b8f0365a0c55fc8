#!/usr/bin/env python3
"""Write held-out examples (never seen in training) as ordinary PNG files, named
by what they show (digit_<d>_... or not_a_digit_...; tests check every one):

- one digit per class as the 8x8 grey image the data set holds, and a few
  enlarged (bilinear) to 64x64 colour, the way a user's own picture might arrive;
- digits drawn the everyday way: small on a larger canvas, either polarity, in a
  font training never saw (tools/datasets.py HELDOUT_FONTS), or a held-out
  handwritten digit;
- things that are not digits: a crop of a bundled photo from the rows no
  training crop used, and blank images.

    python tools/make_examples.py examples/
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

# (file name, source, digit, canvas, digit height as a fraction of the canvas, black on white)
DRAWN = (
    ("digit_2_drawn_64px.png", None, 2, 64, 0.5, False),
    ("digit_7_drawn_200px_black_on_white.png", "DejaVuSansMono-BoldOblique.ttf", 7, 200, 0.6, True),
    ("digit_4_drawn_200px_black_on_white.png", "handwritten", 4, 200, 0.6, True),
    ("digit_9_drawn_64px_black_on_white.png", "DejaVuSerifCondensed-BoldItalic.ttf", 9, 64, 0.7, True),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write the PNGs")
    p.add_argument("--large", type=int, default=3, help="how many also as 64x64 RGB (default 3)")
    args = p.parse_args(argv)
    import numpy as np
    from PIL import Image

    import datasets

    _, _, images, labels = datasets.digits_split()
    os.makedirs(args.folder, exist_ok=True)
    written = []

    def save(image, name):
        image.save(os.path.join(args.folder, name))
        written.append(name)

    first = {}
    for image, label in zip(images, labels):
        first.setdefault(label, image)
    for label, image in sorted(first.items()):
        save(image, f"digit_{label}.png")
        if label < args.large:
            save(image.resize((64, 64), Image.Resampling.BILINEAR).convert("RGB"),
                 f"digit_{label}_64px_rgb.png")
    rng = np.random.default_rng(datasets.HELDOUT_SEED)  # unused by centred placement
    for name, source, digit, canvas, height, inverted in DRAWN:
        glyph = (datasets.digit_glyph(first[digit], 64) if source == "handwritten"
                 else datasets.font_glyph(source, digit))
        im = datasets.place(glyph, canvas, height, rng, centre=True)
        save(im.point(lambda v: 255 - v) if inverted else im, name)
    china = datasets.photos()[0]
    top = datasets.PHOTO_HELDOUT_ROWS[0]
    save(china.crop((200, top, 327, top + 127)), "not_a_digit_photo.png")
    save(Image.new("L", (64, 64), 255), "not_a_digit_blank_white.png")
    save(Image.new("RGB", (200, 200), (0, 0, 0)), "not_a_digit_blank_black.png")
    print(f"wrote {len(written)} images to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
