"""Grad-CAM: its sanity checks (localization, model randomization, TensorFlow vs JAX), every backbone, and
`tlpipe explain` on the exported model's Keras twin and on a model with a downloaded backbone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from components import source, transfer
from components.apps.cli import main
from components.core.config import Params, with_overrides
from components.core.errors import PipelineError
from components.deploy.predict import OnnxModel
from components.training.backbones import BACKBONES
from components.training.download import sha256_of
from components.training.gradcam import GradCam, target_layer
from components.training.models import build_model, save_model_dir
from tests.conftest import (REPO, clean_images, export_tiny_model, shrunk_params, write_class_folders,
                            write_clean_dataset)
from tests.test_source import _imagenet_like

SIDE, PATCH = 24, 8  # the patch covers 11% of the image; the top 10% of a map can all fall inside it


def patch_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise shared by both classes; only an 8x8 striped patch at a random place decides the class
    (horizontal stripes: 0, vertical: 1). Returns images, labels and each patch's top-left corner."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 190, size=(count, SIDE, SIDE, 1)).astype(np.uint8)
    labels = rng.integers(0, 2, size=count).astype(np.int32)
    corners = rng.integers(0, SIDE - PATCH + 1, size=(count, 2))
    stripes = (np.arange(PATCH) % 2 * 255).astype(np.uint8)
    for image, label, (row, col) in zip(images, labels, corners):
        pattern = np.tile(stripes[:, None], (1, PATCH)) if label == 0 else np.tile(stripes[None, :], (PATCH, 1))
        image[row : row + PATCH, col : col + PATCH, 0] = pattern
    return images, labels, corners


def _patch_params(root: Path, seed: int = 0) -> Params:
    return with_overrides(shrunk_params(root), {"data.image_size": SIDE, "model.width": 8, "seed": seed})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path, Params]:
    """A small CNN of the pipeline trained on the patch task (about 10 s here), saved as a model folder."""
    params = _patch_params(tmp_path_factory.mktemp("gradcam"))
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, 2, bn_inference=False)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    images, labels, _ = patch_images(400, seed=1)
    model.fit(images, labels, epochs=6, batch_size=32, verbose=0)
    save_model_dir(model, ("horizontal", "vertical"), params.paths.finetuned_model)
    return model, params.paths.finetuned_model, params


def _top_share_inside(heatmap: np.ndarray, corner: np.ndarray) -> float:
    """Share of the map's top-10% pixels that fall inside the patch."""
    top = np.argsort(heatmap.ravel(), kind="stable")[-heatmap.size // 10 :]
    rows, cols = np.unravel_index(top, heatmap.shape)
    row, col = corner
    return float(np.mean((rows >= row) & (rows < row + PATCH) & (cols >= col) & (cols < col + PATCH)))


def test_localization_the_map_points_at_the_patch_that_decides_the_class(trained) -> None:
    model, _, _ = trained
    images, labels, corners = patch_images(40, seed=2)
    explanation = GradCam(model).explain(images)
    assert (explanation.class_index == labels).mean() >= 0.9  # it learned the task (measured: 1.0)
    shares = np.array([_top_share_inside(h, c) for h, c in zip(explanation.heatmaps, corners)])
    # Measured: 36 of 40 images at >= 0.6, median 0.79. A map blind to the patch puts about 0.11 there.
    assert (shares >= 0.6).mean() >= 0.75, np.round(shares, 2)


def _rank_correlations(a, b) -> np.ndarray:
    return np.array([spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])


def test_model_randomization_the_maps_depend_on_the_learned_weights(trained) -> None:
    model, _, params = trained
    images, _, _ = patch_images(40, seed=2)
    cam = GradCam(model)
    first, second = cam.explain(images), cam.explain(images)
    keras.utils.set_random_seed(params.seed + 1)
    reinitialized = build_model(params.model, params.data, 2, bn_inference=False)  # same architecture, new weights
    random = GradCam(reinitialized).explain(images, first.class_index)
    same = np.median(_rank_correlations(first.heatmaps, second.heatmaps))
    other = np.nan_to_num(_rank_correlations(first.heatmaps, random.heatmaps))  # an all-zero map: no rank order
    # Adebayo et al. (2018): a map that survives randomization explains the input, not the model.
    # Measured: median 1.0 for two runs, about 0 for the reinitialized model.
    assert same > 0.99 and np.median(other) < 0.3, (same, np.round(other, 2))


# The map of a .keras file under JAX, written for the test to compare (the backend is fixed at import).
JAX_MAPS = """
import sys
import numpy as np
from components.deploy.explain import load_explained_model
from components.training.gradcam import GradCam
model, _ = load_explained_model(sys.argv[1])
explanation = GradCam(model).explain(np.load(sys.argv[2]))
np.savez(sys.argv[3], probabilities=explanation.probabilities, heatmaps=np.stack(explanation.heatmaps),
         layer=explanation.layer)
"""


# Slow: a JAX subprocess (import, load, first trace) took 35-75 s on 2 busy cores, 9 s of it CPU.
@pytest.mark.slow
def test_tensorflow_and_jax_maps_of_one_keras_file_agree(trained, tmp_path: Path) -> None:
    _, folder, _ = trained
    images, _, _ = patch_images(12, seed=3)
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", JAX_MAPS, str(folder), str(tmp_path / "images.npy"),
                           str(tmp_path / "jax.npz")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from components.deploy.explain import load_explained_model

    assert keras.backend.backend() == "tensorflow"
    model, _ = load_explained_model(folder)
    ours = GradCam(model).explain(images)
    theirs = np.load(tmp_path / "jax.npz")
    assert str(theirs["layer"]) == ours.layer
    np.testing.assert_allclose(theirs["probabilities"], ours.probabilities, atol=1e-5)
    np.testing.assert_allclose(theirs["heatmaps"], np.stack(ours.heatmaps), atol=1e-3)


# 5-20 s each to build and explain on 2 busy cores; the default suite explains VGG16 below (downloaded backbone).
HEAVY = pytest.mark.slow


@pytest.mark.parametrize("backbone", [
    pytest.param(name, marks=HEAVY) if spec.is_application else name for name, spec in BACKBONES.items()
])
def test_every_backbone_is_explained_at_its_last_spatial_map(tmp_path: Path, backbone: str) -> None:
    params = with_overrides(shrunk_params(tmp_path), {"model.backbone": backbone, "data.image_size": 32,
                                                      "data.color_mode": "rgb"})
    keras.utils.set_random_seed(0)
    model = build_model(params.model, params.data, 3, bn_inference=True)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 40, 36, 3), dtype=np.uint8)
    explanation = GradCam(model).explain(images)

    assert explanation.layer.startswith("backbone.")  # inside the nested backbone, not the input's resize
    feature = model.get_layer("backbone").get_layer(explanation.layer.split(".", 1)[1]).output
    assert len(feature.shape) == 4 and (feature.shape[1], feature.shape[2]) != (1, 1)
    np.testing.assert_allclose(explanation.probabilities, model.predict(images, verbose=0), atol=1e-5)
    for heatmap in explanation.heatmaps:
        assert heatmap.shape == (40, 36) and heatmap.min() >= 0 and heatmap.max() <= 1


def test_a_named_layer_is_used_and_a_wrong_one_is_refused(trained) -> None:
    model, _, _ = trained
    assert target_layer(model) == "backbone.block3_relu2"
    assert GradCam(model, "backbone.block2_conv1").layer == "backbone.block2_conv1"
    assert GradCam(model, "block1_relu1").layer == "backbone.block1_relu1"  # a unique bare name is enough
    with pytest.raises(PipelineError, match="'nothing' is not in the model.*block3_relu2"):
        GradCam(model, "nothing")
    with pytest.raises(PipelineError, match="'head' outputs .* not a .* feature map"):
        GradCam(model, "head")


def test_a_model_with_no_spatial_layer_is_refused() -> None:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    dense = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x)))
    with pytest.raises(PipelineError, match="no spatial layer .* needs a convolutional model"):
        GradCam(dense)


def test_explain_on_the_exported_models_keras_twin_matches_the_onnx_model(tmp_path: Path, capsys) -> None:
    classes = ["cat", "dog", "eel"]
    onnx_path = export_tiny_model(tmp_path, classes)
    twin = tmp_path / "models" / "finetuned"
    files = sorted(write_class_folders(tmp_path / "inputs", classes, per_class=2, size=(30, 22)).rglob("*.png"))
    out = tmp_path / "explained"

    assert main(["explain", str(twin), *map(str, files), "--out", str(out)]) == 0

    report = json.loads((out / "predictions.json").read_text())
    assert report["layer"] == "backbone.block3_relu2" and len(report["images"]) == len(files)
    onnx = OnnxModel(onnx_path)
    for row, path in zip(report["images"], files):
        expected = onnx.session.run(None, {onnx.input_name: onnx.pixels(path)})[0][0]
        np.testing.assert_allclose(list(row["probabilities"].values()), expected, atol=1e-4)
        assert row["predicted"] == classes[int(expected.argmax())]
        with Image.open(out / row["overlay"]) as overlay:
            assert overlay.mode == "RGB" and min(overlay.size) >= 64
    assert len(capsys.readouterr().out.splitlines()) == len(files)

    assert main(["explain", str(tmp_path / "missing.keras"), str(files[0]), "--out", str(out)]) == 1
    assert "not a .keras model file" in capsys.readouterr().err


def test_explain_on_a_model_with_a_downloaded_backbone(params: Params, file_server) -> None:
    folder, base_url = file_server
    served = _imagenet_like(folder)
    params = with_overrides(params, {
        "model.backbone": "vgg16", "data.image_size": 32, "data.color_mode": "rgb",
        "source.mode": "download", "source.weights": "imagenet", "source.mirror": f"{base_url}/",
        "source.sha256": sha256_of(served), "source.cache_dir": str(params.paths.raw.parent / "cache"),
    })
    write_clean_dataset(params.paths.clean, "target", ["x", "y"], {"train": 4, "val": 2, "test": 2}, 32, mode="RGB")
    source.run(params)
    transfer.run(params)
    files = []  # the test images as files, the way a user hands them to `tlpipe explain`
    for number, (_, pixels) in enumerate(clean_images(params.paths.clean, "target").values()):
        files.append(params.paths.raw.parent / f"image_{number}.png")
        Image.fromarray(pixels).save(files[-1])
    out = params.paths.raw.parent / "explained"

    assert main(["explain", str(params.paths.transferred_model), *map(str, files), "--out", str(out)]) == 0

    report = json.loads((out / "predictions.json").read_text())
    assert report["layer"] == "backbone.block5_conv3"  # VGG16's last map: 2x2 at 32 px
    assert [row["predicted"] in ("x", "y") for row in report["images"]] == [True] * len(files)
    assert all((out / row["overlay"]).is_file() for row in report["images"])
