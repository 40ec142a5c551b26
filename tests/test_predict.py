"""`tlpipe predict`: label files with the exported ONNX model, with onnxruntime alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from components.core.errors import PipelineError
from components.data.images import load_normalized
from components.deploy.predict import predict_files
from tests.conftest import REPO, export_tiny_model

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("predict"), CLASSES)


def _tlpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "components", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _image(path: Path, size: tuple[int, int] = (20, 28), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)
    return path


def test_cli_prints_the_label_onnxruntime_ranks_first(onnx_model: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "my image.png", size=(16, 16))  # the model's size: fed as it is
    done = _tlpipe("predict", str(onnx_model), str(image))
    assert done.returncode == 0, done.stderr

    path, label, probability = done.stdout.strip().split("\t")
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": np.asarray(Image.open(image))[None, ..., None]})[0][0]
    assert path == str(image)
    assert label == CLASSES[int(expected.argmax())]
    assert float(probability) == pytest.approx(float(expected.max()), abs=1e-4)


def test_top_k_lists_every_class_best_first_summing_to_one(onnx_model: Path, tmp_path: Path) -> None:
    images = [_image(tmp_path / "a.png", seed=1), _image(tmp_path / "b.png", size=(64, 48), seed=2)]
    done = _tlpipe("predict", str(onnx_model), *map(str, images), "--top-k", str(len(CLASSES)))
    assert done.returncode == 0, done.stderr

    lines = done.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(image) for image in images]
    for line in lines:
        pairs = [pair.rsplit(":", 1) for pair in line.split("\t")[1:]]
        assert sorted(label for label, _ in pairs) == sorted(CLASSES)
        probabilities = [float(p) for _, p in pairs]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_images_are_read_as_a_user_sees_them(onnx_model: Path, tmp_path: Path) -> None:
    def scores(path: Path) -> list[str]:
        return predict_files(onnx_model, [path], top_k=len(CLASSES))[0].split("\t")[1:]

    # Transparent pixels are composited on white, whatever colour they hide.
    Image.new("L", (16, 16), 255).save(tmp_path / "white.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert scores(tmp_path / "clear.png") == scores(tmp_path / "white.png") != scores(tmp_path / "black.png")

    # EXIF orientation is applied: a sideways-stored photo is labelled as the upright one.
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[2:5, :] = 255
    Image.fromarray(pixels).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; a viewer turns it 90 degrees clockwise
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png")
    assert scores(tmp_path / "sideways.png") == scores(tmp_path / "upright.png")
    assert scores(tmp_path / "rotated.png") != scores(tmp_path / "upright.png")

    # A large photo is seen as the clean stage stored the training images (Pillow's area-like
    # downscale), not aliased by the model's own bilinear resize.
    big = Image.fromarray(pixels).resize((96, 128), Image.Resampling.NEAREST)
    noise = np.random.default_rng(3).normal(0, 40, size=(128, 96))
    Image.fromarray(np.clip(np.asarray(big) + noise, 0, 255).astype(np.uint8)).save(tmp_path / "big.png")
    load_normalized(tmp_path / "big.png", 16, "L").save(tmp_path / "as_cleaned.png")
    assert scores(tmp_path / "big.png") == scores(tmp_path / "as_cleaned.png")

    # 16-bit pixels are scaled to 8 bits, not clipped to white.
    grey = pixels // 2 + 20
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    assert scores(tmp_path / "sixteen.png") == scores(tmp_path / "eight.png")


@pytest.mark.parametrize("bad", ["missing image", "not an image", "missing model", "not a model"])
def test_bad_inputs_exit_1_naming_the_file(onnx_model: Path, tmp_path: Path, bad: str) -> None:
    model, image = onnx_model, _image(tmp_path / "ok.png")
    if bad == "missing image":
        image = tmp_path / "nowhere.png"
    elif bad == "not an image":
        image = tmp_path / "notes.png"
        image.write_text("not pixels")
    elif bad == "missing model":
        model = tmp_path / "nowhere.onnx"
    else:
        model = tmp_path / "model.onnx"
        model.write_text("not a graph")
    named = image if "image" in bad else model

    done = _tlpipe("predict", str(model), str(_image(tmp_path / "first.png")), str(image))
    assert done.returncode == 1
    assert done.stdout == ""
    assert str(named) in done.stderr and "Traceback" not in done.stderr


def test_top_k_below_one_is_refused(onnx_model: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="at least 1"):
        predict_files(onnx_model, [_image(tmp_path / "a.png")], top_k=0)


def test_serving_does_not_import_tensorflow_or_keras() -> None:
    check = (
        "import sys, components.deploy.predict, components.apps.cli\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'tf2onnx', 'onnx'})\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
