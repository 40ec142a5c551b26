"""Grad-CAM (Selvaraju et al., 2017): where in an image a Keras classifier looked for its answer.

The map of class c is relu(sum_k w_k A_k), A the target layer's feature maps and w_k the spatial
mean of d(score_c)/dA_k; the score is the head's logit when the head is a softmax Dense (the
probability saturates, and its gradient vanishes on confident answers), else the output itself.
Keras 3 only: the graph is cut with keras.Model, gradients come from the backend (TensorFlow's
GradientTape or jax.grad) behind `_score_and_gradients`. The target layer is found by itself
(the last spatial feature map, inside nested backbones too) or named by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np

from components.core.errors import PipelineError

log = logging.getLogger(__name__)

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


@dataclass(frozen=True)
class Explanation:
    """Per image: class probabilities, the explained class, and its map in [0, 1] at the image's size."""

    probabilities: np.ndarray  # (N, classes)
    class_index: np.ndarray  # (N,) the class each map explains
    heatmaps: tuple[np.ndarray, ...]  # N maps, (H, W) of each input image
    layer: str  # the target layer's path, "backbone.block3_relu2"


def _walk(model: keras.Model, chain: tuple = ()) -> Iterator[tuple[str, keras.layers.Layer, tuple]]:
    """(path, layer, the models it sits in, outermost first) for every layer, nested models descended."""
    chain = chain or (model,)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from _walk(layer, (*chain, layer))
        else:
            yield ".".join([*(m.name for m in chain[1:]), layer.name]), layer, chain


def _output_shape(layer: keras.layers.Layer) -> tuple | None:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called more than once: no single output
        return None


def spatial_layers(model: keras.Model) -> list[str]:
    """Paths of the layers whose output is a (N, H, W, C) feature map, from the first convolution on."""
    found: list[str] = []
    seen_convolution = False
    for path, layer, _ in _walk(model):
        seen_convolution = seen_convolution or isinstance(layer, _CONVOLUTIONS)
        shape = _output_shape(layer)
        # Padding shifts the map off the image's grid; the layer before or after it is the map.
        padding = isinstance(layer, keras.layers.ZeroPadding2D)
        if seen_convolution and not padding and shape is not None and len(shape) == 4:
            found.append(path)
    return found


def _find(model: keras.Model, layer: str) -> tuple[str, keras.layers.Layer, tuple]:
    matches = [entry for entry in _walk(model) if entry[0] == layer or entry[1].name == layer]
    if len(matches) != 1:
        spatial = spatial_layers(model)
        hint = f"the spatial layers are {', '.join(spatial[-5:])} (last five)" if spatial else "it has no spatial layer"
        raise PipelineError(
            f"layer {layer!r} {'is ambiguous' if matches else 'is not in the model'}: name one by its path; {hint}"
        )
    return matches[0]


def target_layer(model: keras.Model, layer: str | None = None) -> str:
    """The path of the layer to explain: `layer` if given (checked), else the last spatial feature map.

    A 1x1 map cannot localize anything, so the last map wider than 1x1 is preferred (a 32 px input
    to MobileNet or ResNet ends at 1x1).
    """
    if layer is not None:
        path, found, _ = _find(model, layer)
        shape = _output_shape(found)
        if shape is None or len(shape) != 4:
            raise PipelineError(f"layer {path!r} outputs {shape}, not a (batch, height, width, channels) feature map")
        return path
    spatial = spatial_layers(model)
    if not spatial:
        raise PipelineError(
            f"model {model.name!r} has no spatial layer (no convolution followed by a (batch, height, width, channels) "
            "output), so Grad-CAM has no map to explain; it needs a convolutional model"
        )
    for path in reversed(spatial):
        shape = _output_shape(_find(model, path)[1])
        if shape[1] != 1 or shape[2] != 1:
            return path
    log.warning("every feature map of %s is 1x1: the Grad-CAM map will be uniform", model.name)
    return spatial[-1]


def _inbound(nested: keras.Model) -> tuple:
    # Where `nested` sits in its parent's graph: Keras keeps the call's tensors on its node.
    node = nested._inbound_nodes[0]
    return node.input_tensors[0], node.output_tensors[0]


def _split(model: keras.Model, path: str, top_output) -> tuple[Callable, Callable]:
    """front(images) -> feature maps of `path`; back(feature maps) -> `top_output` of the model.

    A layer inside a nested model (the pipeline's "backbone") is reached by cutting each level:
    the parent's graph up to the nested model's input, the nested graph up to the layer, and back
    out the same way. Every piece is a keras.Model, so any backend runs it.
    """
    _, layer, chain = _find(model, path)
    fronts: list[keras.Model] = []
    backs: list[keras.Model] = []
    for parent, child in zip(chain, chain[1:]):
        child_in, child_out = _inbound(child)
        if child_in is not parent.inputs[0]:
            fronts.append(keras.Model(parent.inputs[0], child_in))
        backs.insert(0, keras.Model(child_out, top_output if parent is model else parent.outputs[0]))
    fronts.append(keras.Model(chain[-1].inputs[0], layer.output))
    backs.insert(0, keras.Model(layer.output, top_output if chain[-1] is model else chain[-1].outputs[0]))

    def run(pieces: list[keras.Model]) -> Callable:
        def call(x):
            for piece in pieces:
                x = piece(x, training=False)
            return x
        return call

    return run(fronts), run(backs)


def _softmax_head(model: keras.Model) -> keras.layers.Dense | None:
    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense) and getattr(last.activation, "__name__", "") == "softmax":
        return last
    return None


def _score_and_gradients(score: Callable, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """score(features) -> (N,) and its gradient with respect to the features, on the active backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            values = score(tensor)
        return np.asarray(values), np.asarray(tape.gradient(values, tensor))
    if backend == "jax":
        import jax

        def total(x):
            values = score(x)
            return values.sum(), values

        (_, values), gradients = jax.value_and_grad(total, has_aux=True)(jax.numpy.asarray(features))
        return np.asarray(values), np.asarray(gradients)
    raise PipelineError(f"Grad-CAM runs on the tensorflow or jax Keras backend, not {backend!r}: set KERAS_BACKEND")


class GradCam:
    """Grad-CAM for one model: the graph is cut once, then it explains any number of images."""

    def __init__(self, model: keras.Model, layer: str | None = None) -> None:
        self.model = model
        self.layer = target_layer(model, layer)
        self._head = _softmax_head(model)
        top = self._head.input if self._head is not None else model.outputs[0]
        self._front, self._back = _split(model, self.layer, top)

    def _logits(self, features):
        out = self._back(features)
        if self._head is None:
            return out
        # The softmax head's pre-activation, computed from its own weights.
        return keras.ops.matmul(out, self._head.kernel) + self._head.bias

    def explain(self, images: np.ndarray, class_index: np.ndarray | None = None, batch_size: int = 32) -> Explanation:
        """Maps for uint8 images (N, H, W, C) of one size; class_index None: the predicted class."""
        images = np.asarray(images)
        if images.ndim != 4 or not len(images):
            raise PipelineError(f"Grad-CAM takes a batch (N > 0, height, width, channels), got shape {images.shape}")
        chosen = None if class_index is None else np.asarray(class_index, dtype=np.int64)
        parts = [self._explain(images[start : start + batch_size],
                               None if chosen is None else chosen[start : start + batch_size])
                 for start in range(0, len(images), batch_size)]
        return Explanation(np.concatenate([p.probabilities for p in parts]),
                           np.concatenate([p.class_index for p in parts]),
                           tuple(h for p in parts for h in p.heatmaps), self.layer)

    def _explain(self, images: np.ndarray, class_index: np.ndarray | None) -> Explanation:
        features = keras.ops.convert_to_numpy(self._front(keras.ops.convert_to_tensor(images)))
        logits = keras.ops.convert_to_numpy(self._logits(keras.ops.convert_to_tensor(features)))
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits)) if self._head is not None else logits
        chosen = probabilities.argmax(axis=1) if class_index is None else np.asarray(class_index, dtype=np.int64)
        mask = keras.ops.convert_to_tensor(np.eye(logits.shape[1], dtype="float32")[chosen])
        _, gradients = _score_and_gradients(lambda x: keras.ops.sum(self._logits(x) * mask, axis=1), features)
        weights = gradients.mean(axis=(1, 2), keepdims=True)  # one weight per channel, per image
        maps = np.maximum((weights * features).sum(axis=-1), 0.0)
        height, width = images.shape[1:3]
        heatmaps = tuple(_resize_map(m, height, width) for m in maps)
        return Explanation(probabilities, chosen, heatmaps, self.layer)


def _resize_map(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """The map scaled to [0, 1] (all zero when the class found no positive evidence) at the image's size."""
    from PIL import Image

    peak = float(cam.max())
    scaled = (cam / peak).astype(np.float32) if peak > 0 else np.zeros_like(cam, dtype=np.float32)
    resized = Image.fromarray(scaled).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, side: int = 128, alpha: float = 0.45) -> np.ndarray:
    """The image (H, W, 1 or 3, uint8) with its map in the jet colours on top, RGB uint8, `side` px long side."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    height, width = rgb.shape[:2]
    scale = max(1, side // max(height, width))
    size = (width * scale, height * scale)
    base = np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.Resampling.NEAREST), dtype=np.float32)
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return ((1 - alpha) * base + alpha * colours).round().clip(0, 255).astype(np.uint8)

