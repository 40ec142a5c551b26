"""Model building: Keras Applications backbones with in-model preprocessing, and safe loading."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from components.core.config import Params, with_overrides
from components.core.errors import PipelineError
from components.training.backbones import BACKBONES
from components.training.models import MODEL_FILE, build_model, load_model_dir, save_model_dir, weighted_layers

# Every registered Keras Applications backbone; the test compares it with Keras's own model fed
# through Keras's own preprocess_input (from the constructor's module), not with the registry's word.
APPLICATIONS = sorted(name for name, spec in BACKBONES.items() if spec.is_application)


def keras_reference(name: str) -> tuple[Callable[..., keras.Model], Callable[[np.ndarray], np.ndarray]]:
    constructor = getattr(keras.applications, BACKBONES[name].keras_class)
    return constructor, importlib.import_module(constructor.__module__).preprocess_input


def test_a_model_directory_holding_a_lambda_layer_is_refused(tmp_path: Path) -> None:
    inputs = keras.Input((4,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x + 1)(inputs))
    save_model_dir(unsafe, ("a",), tmp_path / "unsafe")
    assert (tmp_path / "unsafe" / MODEL_FILE).is_file()
    with pytest.raises(PipelineError, match="Lambda layer"):
        load_model_dir(tmp_path / "unsafe")


def test_build_model_never_downloads(params: Params) -> None:
    application = with_overrides(params, {"model.backbone": "resnet50", "data.image_size": 32})
    with pytest.raises(ValueError, match="fetch_imagenet"):
        build_model(application.model, application.data, None, bn_inference=False, backbone_weights="imagenet")


def test_applications_need_32_pixels(params: Params) -> None:
    small = with_overrides(params, {"model.backbone": "vgg16", "data.image_size": 16})
    with pytest.raises(PipelineError, match="image_size >= 32"):
        build_model(small.model, small.data, 3, bn_inference=True)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", APPLICATIONS)
def test_keras_weights_files_load_with_keras_preprocessing(params: Params, tmp_path: Path, backbone: str) -> None:
    """Each backbone takes Keras's own .h5 weights file and matches keras.applications with preprocess_input."""
    constructor, preprocess = keras_reference(backbone)
    cfg = with_overrides(params, {"model.backbone": backbone, "data.image_size": 32, "data.color_mode": "rgb"})
    keras.utils.set_random_seed(0)
    weights = tmp_path / f"{backbone}_notop.h5"
    constructor(include_top=False, weights=None, pooling="avg", input_shape=(32, 32, 3)).save(weights)

    model = build_model(cfg.model, cfg.data, 3, bn_inference=True, backbone_weights=weights)
    reference = constructor(include_top=False, weights=str(weights), pooling="avg", input_shape=(32, 32, 3))
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    expected = reference.predict(preprocess(pixels.astype("float32")), verbose=0)
    np.testing.assert_allclose(model.get_layer("backbone").predict(pixels.astype("float32"), verbose=0), expected,
                               rtol=1e-3, atol=1e-4)
    assert all(path.startswith("backbone.") for path, _ in weighted_layers(model) if path != "head")

    save_model_dir(model, ("a", "b", "c"), tmp_path / "saved")  # serializable with built-in layers only
    loaded, _ = load_model_dir(tmp_path / "saved")
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-5)


def test_every_registered_backbone_names_a_keras_constructor_that_fits_its_entry() -> None:
    """A typo in the registry fails here, fast, not in the slow build test or a user's run."""
    for name, spec in BACKBONES.items():
        assert spec.name == name and spec.min_side >= 1
        if not spec.is_application:
            assert spec.preprocessing == "unit" and spec.imagenet_file is None
            continue
        constructor = getattr(keras.applications, spec.keras_class)
        # "own": the application scales pixels itself, which only constructors with that switch do.
        takes_switch = "include_preprocessing" in inspect.signature(constructor).parameters
        assert takes_switch == (spec.preprocessing == "own"), name
        # The weights are the ones Keras itself downloads: same mirror folder, same published md5.
        keras_source = inspect.getsource(importlib.import_module(constructor.__module__))
        folder = spec.imagenet_file.split("/")[0]
        assert f"keras-applications/{folder}/" in keras_source and spec.imagenet_md5 in keras_source, name
