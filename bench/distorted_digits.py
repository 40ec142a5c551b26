"""Distorted digits: a target that is hard from scratch at a few labels, made offline (issue 18).

    .venv/bin/python bench/distorted_digits.py DIR [--side 32] [--seed 0]

Writes DIR/source/<digit>/ (digits 0-4) and DIR/target/<digit>/ (digits 5-9, as the embedded default splits them) as grayscale PNGs: every
scikit-learn digit (bundled, about 180 a class) once, enlarged to `side` px, then rotated (up to 25
degrees), scaled (0.75-1.15), sheared, shifted (up to 1/6 of the side), partly covered by a grey
bar and overlaid with Gaussian noise. Each base digit appears once, so no two files share a
digit and clean's splits cannot leak one into another. The distortions are of the kinds
self-supervised pretraining augments with (components/training/self_supervised.py), which is the
regime where unlabelled images should teach a backbone what a few labels cannot. Reproducible byte
for byte: image i of a class depends only on seed, class and i.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

# The embedded default's split of the digits into source and target classes, from its one place.
_DATA = yaml.safe_load((Path(__file__).resolve().parents[1] / "components" / "core" / "defaults.yaml").read_text())["data"]
SOURCE, TARGET = tuple(_DATA["embedded_source_classes"]), tuple(_DATA["embedded_target_classes"])


def distort(digit: np.ndarray, side: int, rng: np.random.Generator) -> Image.Image:
    """One 8x8 digit (0..16) as a distorted `side`-px grayscale image."""
    image = Image.fromarray(np.uint8(digit * (255 / 16))).resize((side, side), Image.BILINEAR)
    angle = math.radians(rng.uniform(-25, 25))
    scale, shear = rng.uniform(0.75, 1.15), rng.uniform(-0.3, 0.3)
    shift = rng.uniform(-side / 6, side / 6, size=2)
    # Inverse map (output -> input) about the centre, as Image.transform takes it.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    a, b, d, e = cos, sin + shear * cos, -sin, cos - shear * sin
    centre = (side - 1) / 2
    c = centre - a * (centre + shift[0]) - b * (centre + shift[1])
    f = centre - d * (centre + shift[0]) - e * (centre + shift[1])
    pixels = np.asarray(image.transform((side, side), Image.AFFINE, (a, b, c, d, e, f), Image.BILINEAR), dtype=np.float64)
    width, height = rng.integers(side // 8, side // 3, size=2)
    x, y = rng.integers(0, side - width), rng.integers(0, side - height)
    pixels[y : y + height, x : x + width] = rng.uniform(60, 200)  # a grey bar over part of the digit
    pixels += rng.normal(0, 30, size=pixels.shape)
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))


def write_folders(root: Path, side: int = 32, seed: int = 0) -> dict[str, int]:
    """DIR/{source,target}/<digit>/<digit>_NNNN.png; the number of images written per task."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = {}
    for task, classes in (("source", SOURCE), ("target", TARGET)):
        written[task] = 0
        for label in classes:
            folder = root / task / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, digit in enumerate(digits.images[digits.target == label]):
                rng = np.random.default_rng([seed, label, i])
                distort(digit, side, rng).save(folder / f"{label}_{i:04d}.png")
                written[task] += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_folders(args.dir, args.side, args.seed))


if __name__ == "__main__":
    main()
