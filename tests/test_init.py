"""`tlpipe init`: a params.yaml that fits the user's folders, holding only what differs from the defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.apps.cli import main
from components.core.config import load_params, shipped_defaults
from components.training.download import imagenet_cache_path
from tests.conftest import write_class_folders


def write_photo_folders(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (96, 72),
                        seed: int = 0) -> Path:
    """Colour JPEG "photos": class k is a noisy scene with a block of its own colour at its own place."""
    rng = np.random.default_rng(seed)
    width, height = size
    palette = [(220, 40, 40), (40, 180, 60), (50, 70, 220), (230, 200, 40), (170, 60, 200), (40, 200, 210)]
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(60, 140, size=(height, width, 3)).astype(np.uint8)
            top = (index % 3) * height // 3 + int(rng.integers(0, 4))
            left = (index // 3) * width // 2 + int(rng.integers(0, 6))
            pixels[top : top + height // 3 - 4, left : left + width // 2 - 8] = palette[index % len(palette)]
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


def test_init_fits_colour_photos_and_writes_only_what_differs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no pretrained weights placed here (source.cache_dir is relative)
    source = write_photo_folders(tmp_path / "photos_source", ["apple", "leaf", "sky"], per_class=24)
    target = write_photo_folders(tmp_path / "photos_target", ["lemon", "plum"], per_class=16, seed=1)
    output = tmp_path / "params.yaml"
    assert main(["init", "--source", str(source), "--target", str(target), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    for choice in ("data.color_mode: rgb", "data.image_size: 64", "clean.val_fraction: 0.3",
                   "model.backbone: simple_cnn", "curl -fL", "wrote"):
        assert choice in printed, (choice, printed)
    written = yaml.safe_load(output.read_text())
    assert written["data"] == {"source_dir": "photos_source", "target_dir": "photos_target", "color_mode": "rgb",
                               "image_size": 64}
    defaults = shipped_defaults()
    assert all(defaults[section][key] != value or key.endswith("_dir")
               for section, values in written.items() for key, value in values.items())
    params = load_params(output)
    assert params.data.source_dir == str(source)
    # Every target class keeps a usable validation split: 16 x 0.3 = 4.8 -> about 5 images.
    assert params.clean.val_fraction * 16 >= 4.5 and params.clean.val_fraction + params.clean.test_fraction < 0.9

    # Never overwritten without --force.
    before = output.read_text()
    assert main(["init", "--source", str(source), "--target", str(target), "--output", str(output)]) == 1
    assert "--force" in capsys.readouterr().err and output.read_text() == before


def test_init_keeps_grey_images_grey_and_picks_a_pretrained_backbone_when_its_weights_are_placed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the weights cache (source.cache_dir) is relative to where tlpipe runs
    source = write_class_folders(tmp_path / "s", ["a", "b"], per_class=12, size=(40, 40), mode="RGB")
    target = write_class_folders(tmp_path / "t", ["c", "d"], per_class=12, size=(40, 40))
    weights = imagenet_cache_path("mobilenet_v3_small", Path(shipped_defaults()["source"]["cache_dir"]))
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"placed by hand")
    assert main(["init", "--source", "s", "--target", "t"]) == 0
    printed = capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert "color_mode" not in written["data"]  # grey, the default, is not repeated
    assert "every sampled image is grey" in printed
    assert written["model"] == {"backbone": "mobilenet_v3_small"}
    assert written["source"] == {"mode": "download", "weights": "imagenet"}
    assert written["data"]["image_size"] == 32  # the median side is 40; Keras Applications need 32
