"""The cleaned dataset as numpy arrays: what training, evaluation and export read (no TensorFlow needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.core.errors import PipelineError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split of one task: uint8 images (N, H, W, C), integer labels, and the class names."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)


def class_names(clean_dir: Path, task: str) -> tuple[str, ...]:
    path = Path(clean_dir) / task / "classes.json"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the clean stage first (dvc repro clean)")
    return tuple(json.loads(path.read_text()))


def load_split(clean_dir: Path, task: str, split: str) -> Split:
    """Read data/clean/<task>/<split>/<class>/*.png into memory (the images are already resized)."""
    classes = class_names(clean_dir, task)
    root = Path(clean_dir) / task / split
    images, labels, paths = [], [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).glob("*.png")):
            with Image.open(file) as image:
                pixels = np.asarray(image, dtype=np.uint8)
            images.append(pixels[..., None] if pixels.ndim == 2 else pixels)
            labels.append(index)
            paths.append(file.relative_to(clean_dir).as_posix())
    if not images:
        raise PipelineError(f"no images in {root}: run the clean stage first, or check the data")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int32), classes, tuple(paths))
