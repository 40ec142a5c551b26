"""bench/photos.py: the realistic images benchmarks and tests use are real photo crops, reproducible, class-balanced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.photos import SOURCE_CLASSES, TARGET_CLASSES, write_photo_folders


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_photo_folders_are_reproducible_rgb_crops_one_class_per_photograph(tmp_path: Path) -> None:
    folders = write_photo_folders(tmp_path / "a", 50, workers=1)
    files = _files(tmp_path / "a")
    assert len(files) == 50
    assert sorted(p.name for p in folders["source"].iterdir()) == sorted(SOURCE_CLASSES)
    assert sorted(p.name for p in folders["target"].iterdir()) == sorted(TARGET_CLASSES)
    assert {len(list((folders["target"] / name).iterdir())) for name in TARGET_CLASSES} == {4}  # 40 % of 50, even

    write_photo_folders(tmp_path / "b", 50, workers=2)
    assert _files(tmp_path / "b") == files  # the same bytes whatever the number of processes

    means = {}
    for name in TARGET_CLASSES:
        images = [Image.open(p) for p in sorted((folders["target"] / name).iterdir())]
        assert {(im.mode, im.size) for im in images} == {("RGB", (160, 160))}
        pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images])
        assert pixels.std(axis=0).mean() > 10  # crops of one photo differ from each other
        means[name] = pixels.mean(axis=(0, 1, 2))
    # Different photographs look different: the class is learnable from colour alone.
    colours = np.stack(list(means.values()))
    assert min(np.linalg.norm(colours[i] - colours[j]) for i in range(5) for j in range(i + 1, 5)) > 5
