#!/usr/bin/env python3
"""Write held-out digits (never seen in training) as ordinary PNG files: one
per class as the 8x8 grey image the data set holds, and a few enlarged to
64x64 colour, the way a user's own picture might arrive.

    python tools/make_examples.py examples/
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write the PNGs")
    p.add_argument("--large", type=int, default=3, help="how many also as 64x64 RGB (default 3)")
    args = p.parse_args(argv)
    from PIL import Image

    import datasets

    _, _, images, labels = datasets.digits_split()
    os.makedirs(args.folder, exist_ok=True)
    seen = set()
    for image, label in zip(images, labels):
        if label in seen:
            continue
        seen.add(label)
        image.save(os.path.join(args.folder, f"digit_{label}.png"))
        if label < args.large:
            big = image.resize((64, 64), Image.Resampling.NEAREST).convert("RGB")
            big.save(os.path.join(args.folder, f"digit_{label}_64px_rgb.png"))
    print(f"wrote {len(seen) + min(args.large, len(seen))} images to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
