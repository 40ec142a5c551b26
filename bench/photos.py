"""Realistic image folders for benchmarks and tests: crops of the photographs the libraries ship.

    .venv/bin/python bench/photos.py OUT --images 2000 [--size 160] [--seed 0]

Writes OUT/source/<class>/*.jpg|png and OUT/target/<class>/*, the layout `data.source_dir` /
`data.target_dir` take. The class is the photograph a crop comes from (scikit-learn's china and
flower, matplotlib's grace_hopper, scikit-image's astronaut, coffee, rocket, chelsea,
motorcycle, hubble and retina), so a model can learn it; every image is a random square crop
(35-85 % of the photo's short side) resized to `size` px, flipped half the time, with brightness,
contrast and saturation jitter, saved as JPEG (quality 80-95) or, one in eight, PNG. Nothing is
downloaded: all ten photographs are inside the installed packages. Image i of a class depends
only on (seed, task, class, i), so the same call writes the same bytes, in any number of processes.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SOURCE_CLASSES = ("china", "flower", "grace_hopper", "astronaut", "coffee")
TARGET_CLASSES = ("rocket", "chelsea", "motorcycle", "hubble", "retina")
TARGET_SHARE = 0.4  # of all images; the source task gets the rest


def _sklearn(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(f"{name}.jpg")


def _matplotlib(name: str) -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data(name) as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    return pixels[0] if isinstance(pixels, tuple) else pixels  # stereo pairs: the left image


LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "china": functools.partial(_sklearn, "china"),
    "flower": functools.partial(_sklearn, "flower"),
    "grace_hopper": functools.partial(_matplotlib, "grace_hopper.jpg"),
    "astronaut": functools.partial(_skimage, "astronaut"),
    "coffee": functools.partial(_skimage, "coffee"),
    "rocket": functools.partial(_skimage, "rocket"),
    "chelsea": functools.partial(_skimage, "chelsea"),
    "motorcycle": functools.partial(_skimage, "stereo_motorcycle"),
    "hubble": functools.partial(_skimage, "hubble_deep_field"),
    "retina": functools.partial(_skimage, "retina"),
}


@functools.cache
def photo(name: str) -> Image.Image:
    return Image.fromarray(LOADERS[name]()).convert("RGB")


def crop(name: str, index: int, size: int, seed: int) -> tuple[Image.Image, str]:
    """Image `index` of class `name`: (the picture, its file suffix)."""
    rng = np.random.default_rng([seed, sum(map(ord, name)), index])
    source = photo(name)
    short = min(source.size)
    side = int(short * rng.uniform(0.35, 0.85))
    left = int(rng.integers(0, source.width - side + 1))
    top = int(rng.integers(0, source.height - side + 1))
    image = source.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.75, 1.25))
    return image, ".png" if rng.random() < 0.125 else ".jpg"


def _write_class(job: tuple[Path, str, int, int, int, int]) -> int:
    folder, name, start, count, size, seed = job
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        image, suffix = crop(name, index, size, seed)
        path = folder / f"{name}_{index:06d}{suffix}"
        if suffix == ".jpg":
            image.save(path, quality=int(80 + index * 7919 % 16), optimize=False)
        else:
            image.save(path)
    return count


def counts(images: int) -> dict[str, dict[str, int]]:
    """{task: {class: images}}: `images` in all, TARGET_SHARE of them in the target task, classes even."""
    target = round(images * TARGET_SHARE)
    plan: dict[str, dict[str, int]] = {}
    for task, classes, total in (("source", SOURCE_CLASSES, images - target), ("target", TARGET_CLASSES, target)):
        per, extra = divmod(total, len(classes))
        plan[task] = {name: per + (k < extra) for k, name in enumerate(classes)}
    return plan


def write_photo_folders(root: Path, images: int, size: int = 160, seed: int = 0, workers: int = 0) -> dict[str, Path]:
    """Write `images` crops under root/source and root/target; returns {task: its folder}."""
    root = Path(root)
    jobs = []
    chunk = 500  # per job, so several processes share one class
    for task, classes in counts(images).items():
        for name, count in classes.items():
            jobs += [(root / task / name, name, start, min(chunk, count - start), size, seed)
                     for start in range(0, count, chunk)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            _write_class(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_class, jobs))
    return {task: root / task for task in ("source", "target")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folders = write_photo_folders(args.out, args.images, args.size, args.seed)
    print(" ".join(str(folder) for folder in folders.values()))


if __name__ == "__main__":
    main()
