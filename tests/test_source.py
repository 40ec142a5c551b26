"""Stage `source`: training on the source task, and pinned downloads from a server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from components import source
from components.training import download
from components.core.config import Params, with_overrides
from components.training.backbones import BACKBONES
from components.training.download import sha256_of
from components.core.errors import PipelineError
from components.training.models import build_model, load_model_dir


def test_train_mode_saves_a_model_that_learned_the_source_task(clean_dataset: Params) -> None:
    params = with_overrides(clean_dataset, {"source.epochs": 6, "source.batch_size": 16})
    result = source.run(params)

    model, classes = load_model_dir(params.paths.source_model)
    assert classes == ("a", "b", "c", "d")
    report = json.loads(params.paths.source_report.read_text())
    assert report["mode"] == "train" and report["epochs_run"] >= 1
    assert report["test_accuracy"] == result.test_accuracy > 0.5  # 4 classes: chance is 0.25
    curves = params.paths.training_curves / "source" / "plots" / "metrics"
    assert (curves / "val_accuracy.tsv").read_text().startswith("step\tval_accuracy")


def _served_backbone(params: Params, folder, name: str):
    """A headless model of the configured backbone, saved under the served folder."""
    model = build_model(params.model, params.data, None, bn_inference=False)
    path = folder / name
    if name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        model.save(path)
    return model, path


@pytest.mark.parametrize("name", ["backbone.keras", "backbone.weights.h5"])
def test_download_by_url_checks_sha256_and_caches(params: Params, file_server, name: str) -> None:
    folder, base_url = file_server
    served, path = _served_backbone(params, folder, name)
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/{name}", "source.sha256": sha256_of(path),
        "source.cache_dir": str(params.paths.raw.parent / "cache"),
    })
    source.run(params)

    model, classes = load_model_dir(params.paths.source_model)
    assert classes is None  # pretrained weights carry no task of their own
    for mine, theirs in zip(model.get_weights(), served.get_weights()):
        assert (mine == theirs).all()
    cached = list((params.paths.raw.parent / "cache").iterdir())
    assert [p.name.endswith(name) for p in cached] == [True]

    path.unlink()  # the cache answers now: no server file needed
    source.run(params)


def test_download_with_a_wrong_sha256_fails_and_keeps_nothing(params: Params, file_server) -> None:
    folder, base_url = file_server
    _served_backbone(params, folder, "backbone.keras")
    cache = params.paths.raw.parent / "cache"
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/backbone.keras", "source.sha256": "0" * 64,
        "source.cache_dir": str(cache),
    })
    with pytest.raises(PipelineError, match="sha256 mismatch"):
        source.run(params)
    assert not cache.exists() or not any(cache.iterdir())
    assert not params.paths.source_model.exists()


def test_download_of_a_missing_file_says_so(params: Params, file_server) -> None:
    _, base_url = file_server
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/nothing.keras", "source.sha256": "0" * 64,
        "source.cache_dir": str(params.paths.raw.parent / "cache"),
    })
    with pytest.raises(PipelineError, match="HTTP 404"):
        source.run(params)


def test_download_needs_a_pinned_digest(params: Params) -> None:
    with pytest.raises(PipelineError, match="sha256"):
        with_overrides(params, {"source.mode": "download", "source.weights": "http://127.0.0.1/x.keras"})


# ImageNet weights: Keras's file names under a mirror, fetched and cached by our own download code.
VGG16_FILE = BACKBONES["vgg16"].imagenet_file


def _imagenet_like(folder: Path) -> Path:
    """A VGG16 weights file in Keras's own (legacy .h5) format, random: real ImageNet weights are not offline."""
    path = folder / VGG16_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.applications.VGG16(include_top=False, weights=None, pooling="avg", input_shape=(32, 32, 3)).save(path)
    return path


def test_imagenet_weights_come_from_the_mirror_and_match_keras_preprocessing(params: Params, file_server) -> None:
    folder, base_url = file_server
    served = _imagenet_like(folder)
    cache = params.paths.raw.parent / "cache"
    params = with_overrides(params, {
        "model.backbone": "vgg16", "data.image_size": 32, "data.color_mode": "rgb",
        "source.mode": "download", "source.weights": "imagenet", "source.mirror": f"{base_url}/",
        "source.sha256": sha256_of(served), "source.cache_dir": str(cache),
    })
    source.run(params)

    assert [p.name for p in (cache / "imagenet").iterdir()] == [served.name]
    model, _ = load_model_dir(params.paths.source_model)
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    # Keras's own route: the weights file plus caffe preprocess_input (BGR, mean subtracted) on 32x32 images.
    reference = keras.applications.VGG16(include_top=False, weights=str(served), pooling="avg", input_shape=(32, 32, 3))
    resized = keras.ops.convert_to_numpy(keras.layers.Resizing(32, 32)(pixels.astype("float32")))
    expected = reference.predict(keras.applications.vgg16.preprocess_input(resized), verbose=0)
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_a_pre_seeded_imagenet_cache_needs_no_server(params: Params, tmp_path: Path) -> None:
    cache = tmp_path / "seeded"
    seeded = _imagenet_like(tmp_path / "keras")
    (cache / "imagenet").mkdir(parents=True)
    shutil.copy(seeded, cache / "imagenet" / seeded.name)
    params = with_overrides(params, {
        "model.backbone": "vgg16", "data.image_size": 32, "data.color_mode": "rgb",
        "source.mode": "download", "source.weights": "imagenet", "source.mirror": "http://127.0.0.1:9/",
        "source.sha256": sha256_of(seeded), "source.cache_dir": str(cache),
    })
    source.run(params)  # port 9 has no server: only the cache can answer
    assert json.loads(params.paths.source_report.read_text())["file"] == str(cache / "imagenet" / seeded.name)


def test_imagenet_weights_are_checked_against_keras_md5_when_no_sha256_is_pinned(params: Params, file_server) -> None:
    folder, base_url = file_server
    (folder / VGG16_FILE).parent.mkdir(parents=True)
    (folder / VGG16_FILE).write_bytes(b"not the weights Keras published")
    cache = params.paths.raw.parent / "cache"
    params = with_overrides(params, {
        "model.backbone": "vgg16", "data.image_size": 32, "source.mode": "download", "source.weights": "imagenet",
        "source.mirror": base_url, "source.cache_dir": str(cache),
    })
    with pytest.raises(PipelineError, match=f"md5 mismatch .* expected {BACKBONES['vgg16'].imagenet_md5}"):
        source.run(params)
    assert not (cache / "imagenet").exists() or not any((cache / "imagenet").iterdir())


def test_offline_imagenet_download_says_where_to_place_the_file(params: Params, monkeypatch) -> None:
    monkeypatch.setattr(download, "RETRY_DELAYS", (0.0,))  # the real delays add 13 s of waiting
    params = with_overrides(params, {
        "model.backbone": "resnet50", "data.image_size": 32, "source.mode": "download", "source.weights": "imagenet",
        "source.mirror": "http://127.0.0.1:9/", "source.cache_dir": str(params.paths.raw.parent / "cache"),
    })
    placed = Path(BACKBONES["resnet50"].imagenet_file).name
    with pytest.raises(PipelineError, match=f"after 2 tries .* place the file at .*{re.escape(placed)}"):
        source.run(params)


def test_a_keras_file_with_a_lambda_layer_is_refused(params: Params, file_server) -> None:
    folder, base_url = file_server
    inputs = keras.Input((4,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    unsafe.save(folder / "unsafe.keras")
    params = with_overrides(params, {
        "source.mode": "download", "source.weights": f"{base_url}/unsafe.keras",
        "source.sha256": sha256_of(folder / "unsafe.keras"), "source.cache_dir": str(params.paths.raw.parent / "c"),
    })
    with pytest.raises(PipelineError, match="Lambda layer .* safe loading refuses"):
        source.run(params)
    assert not params.paths.source_model.exists()
