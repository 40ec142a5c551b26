"""Model building (a pure function of the params) and the layer walk that weight transfer uses.

Every model takes raw uint8 pixels of any size; scaling and resizing live inside the model, so
the exported ONNX graph needs no preprocessing re-implemented at serving time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import keras

from components.core.artifacts import atomic_dir
from components.core.config import DataParams, ModelParams
from components.core.errors import PipelineError
from components.training.backbones import BACKBONES, Backbone

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
INPUT_NAME = "input"
BACKBONE_NAME = "backbone"
HEAD_NAME = "head"

# "caffe" preprocessing (components.training.backbones): ImageNet mean subtraction, done with a
# built-in Normalization layer (no Lambda: models load with safe_mode=True and convert with tf2onnx).
# Caffe models were trained on BGR; rather than a channel-swap layer, the first convolution's kernel
# is flipped to RGB when ImageNet weights are loaded (same outputs).
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)


def _simple_cnn(side: int, channels: int, width: int) -> keras.Model:
    inputs = keras.Input((side, side, channels), name="backbone_input")
    x = inputs
    for block, filters in enumerate((width, width * 2, width * 4), start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            # momentum 0.9: small datasets give few steps, and 0.99 leaves the moving statistics unsettled.
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
        if block < 3:
            x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name=BACKBONE_NAME)


def _application(spec: Backbone, side: int, weights_file: str | None) -> keras.Model:
    constructor = getattr(keras.applications, spec.keras_class)
    inputs = keras.Input((side, side, 3), name="backbone_input")
    if spec.preprocessing == "caffe":
        x = keras.layers.Normalization(mean=CAFFE_MEAN_RGB, variance=(1.0, 1.0, 1.0), name="imagenet_mean")(inputs)
        base = constructor(input_tensor=x, include_top=False, weights=None, pooling="avg")
    else:
        base = constructor(input_tensor=inputs, input_shape=(side, side, 3), include_top=False, weights=None,
                           pooling="avg", include_preprocessing=True)
    # Re-wrap under one stable name, so layer paths read "backbone.<layer>" whatever Keras calls it.
    backbone = keras.Model(inputs, base.output, name=BACKBONE_NAME)
    if weights_file:
        try:
            backbone.load_weights(weights_file)
        except ValueError as error:
            raise PipelineError(f"{weights_file} does not fit backbone {spec.name}: {error}") from None
        if spec.preprocessing == "caffe":
            first = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
            kernel, *rest = first.get_weights()
            first.set_weights([kernel[:, :, ::-1, :], *rest])  # BGR-trained kernel, RGB input
    return backbone


def uses_application(model: ModelParams) -> bool:
    return BACKBONES[model.backbone].is_application


def build_model(
    model: ModelParams,
    data: DataParams,
    num_classes: int | None,
    *,
    bn_inference: bool,
    backbone_weights: str | Path | None = None,
) -> keras.Model:
    """Input (uint8, any size) -> scale -> resize -> backbone -> dropout -> softmax head.

    bn_inference=True calls the backbone with training=False (the Keras transfer-learning guide).
    That alone does not hold during `fit`: Keras 3 passes fit's training=True to every layer of a
    functional model, replacing the stored False, so fine-tuning also freezes the BatchNorm layers
    (keep_batchnorm_inference). num_classes=None
    builds a headless model (a downloaded backbone with no task of its own yet).
    backbone_weights: a local file, never a download (components.training.download fetches it first):
    Keras's ImageNet .h5 for an application backbone, a .weights.h5 of the backbone for simple_cnn.
    """
    if backbone_weights == "imagenet":
        raise ValueError("build_model takes a weights file: fetch ImageNet weights with download.fetch_imagenet")
    side, channels = data.image_size, data.channels
    spec = BACKBONES[model.backbone]
    if side < spec.min_side:
        raise PipelineError(
            f"backbone {spec.name} needs data.image_size >= {spec.min_side}, got {side}: raise data.image_size"
        )
    inputs = keras.Input((None, None, channels), dtype="uint8", name=INPUT_NAME)
    if spec.is_application:
        x = keras.layers.Rescaling(1.0, name="to_float")(inputs)  # applications scale 0..255 themselves
        x = keras.layers.Resizing(side, side, name="resize")(x)
        if channels == 1:
            x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
        backbone = _application(spec, side, str(backbone_weights) if backbone_weights else None)
    else:
        x = keras.layers.Rescaling(1.0 / 255, name="scale")(inputs)
        x = keras.layers.Resizing(side, side, name="resize")(x)
        backbone = _simple_cnn(side, channels, model.width)
        if backbone_weights:
            backbone.load_weights(backbone_weights)
    x = backbone(x, training=False) if bn_inference else backbone(x)
    if num_classes is None:
        return keras.Model(inputs, x, name="backbone_only")
    x = keras.layers.Dropout(model.dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=HEAD_NAME)(x)
    return keras.Model(inputs, outputs, name="classifier")


def keep_batchnorm_inference(model: keras.Model) -> list[str]:
    """Make every BatchNormalization layer of `model` (nested models included) non-trainable; their names.

    A non-trainable BatchNorm normalizes with its moving statistics and never updates them, whatever
    `training` it is called with: the one switch Keras 3 honours inside `fit` (see build_model).
    Call it after any change of `trainable` on an enclosing model, which resets its sublayers.
    """
    frozen = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            frozen += keep_batchnorm_inference(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def weighted_layers(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, keras.layers.Layer]]:
    """(path, layer) for every layer holding weights, descending into nested models: "backbone.block1_conv1"."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from weighted_layers(layer, prefix=f"{path}.")
        elif layer.weights:
            yield path, layer


def save_model_dir(model: keras.Model, classes: tuple[str, ...] | None, directory: Path) -> None:
    """Write <directory>/model.keras and labels.json together, atomically (all or nothing)."""
    with atomic_dir(directory) as temp:
        model.save(temp / MODEL_FILE)
        (temp / LABELS_FILE).write_text(json.dumps(list(classes) if classes is not None else None) + "\n")


def load_model_dir(directory: Path) -> tuple[keras.Model, tuple[str, ...] | None]:
    """The model and its class names; safe_mode=True, so a model file can never run arbitrary code."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the stage that writes it first (dvc repro)")
    model = load_keras_file(path)
    labels = json.loads((Path(directory) / LABELS_FILE).read_text())
    return model, tuple(labels) if labels is not None else None


def load_keras_file(path: Path) -> keras.Model:
    """A .keras file loaded with safe_mode=True: a Lambda layer (arbitrary code) is refused, not run."""
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as error:
        if "safe_mode" in str(error) or "lambda" in str(error).lower():
            raise PipelineError(
                f"{path} holds a Lambda layer or other Python code, which safe loading refuses to run; "
                "rebuild that model from built-in layers (or registered layer classes) and save it again"
            ) from None
        raise PipelineError(f"{path} is not a loadable Keras model: {error}") from None
