"""Label image files with an exported ONNX model, using only onnxruntime, numpy and Pillow.

Everything the model needs comes from the .onnx file's metadata (labels, input_spec), so serving
needs neither TensorFlow nor Keras nor params.yaml. Each file is decoded and resized exactly as the
clean stage stored the training images (components.data.images.load_normalized: EXIF orientation,
alpha on white, 16-bit scaled, Pillow's area-like downscaling); the model's own resize layer
then has nothing left to do, so a large photo is not aliased by a resize training never used.
The metadata is checked against the graph when the model loads: a file whose metadata lies is
refused then, by `tlpipe predict` and `tlpipe serve` alike, never per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from components.core.errors import PipelineError
from components.data.images import load_normalized
from components.deploy import onnx_runtime


class OnnxModel:
    """An exported .onnx file, its session and the tlpipe metadata it carries (shared with the server)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: model not found; export one with `tlpipe stage export` (models/model.onnx)")
        self.session = onnx_runtime.session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.preprocessing: str = meta.get("preprocessing", "")
        try:
            labels = json.loads(meta["labels"])
            spec = json.loads(meta["input_spec"])
        except (KeyError, ValueError) as error:
            raise PipelineError(
                f"{path}: ONNX model without tlpipe metadata ({type(error).__name__}: {error}); "
                "export it with `tlpipe stage export`"
            ) from None
        self.labels: list[str] = labels
        self.input_spec: dict[str, object] = spec
        self.input_name, self.size, self.channels = _check_metadata(self.session, labels, spec, path)
        self.pil_mode = "L" if self.channels == 1 else "RGB"

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, labels) class probabilities for a batch of (N, H, W, C) uint8 images."""
        return onnx_runtime.run(self.session, pixels)

    def pixels(self, path: Path) -> np.ndarray:
        """(1, H, W, C) uint8: the file as the clean stage would have stored it."""
        if not path.is_file():
            raise PipelineError(f"{path}: image not found")
        try:
            image = load_normalized(path, self.size, self.pil_mode)
        except Exception as error:  # Pillow raises many types for a bad file; each means "cannot decode"
            raise PipelineError(f"{path}: cannot decode image ({type(error).__name__}: {error})") from None
        pixels = np.asarray(image, dtype=np.uint8)
        return (pixels[..., None] if pixels.ndim == 2 else pixels)[None]


def _check_metadata(session: ort.InferenceSession, labels: object, spec: object, path: Path) -> tuple[str, int, int]:
    """(input name, image size, channels) once the metadata agrees with the graph, else PipelineError.

    The metadata is what the server and the CLI trust to decode, batch and name answers; a model
    whose metadata contradicts its graph would fail (or, worse, answer with wrong labels) on every
    request, so it is refused here, at load.
    """
    def refuse(problem: str) -> PipelineError:
        return PipelineError(f"{path}: {problem}; re-export the model with `tlpipe stage export`")

    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) and label for label in labels):
        raise refuse(f"metadata 'labels' must be a non-empty list of class names, not {json.dumps(labels)[:80]}")
    if len(set(labels)) != len(labels):
        raise refuse("metadata 'labels' names a class twice")
    if not isinstance(spec, dict):
        raise refuse("metadata 'input_spec' must be a JSON object")
    name, size, channels = spec.get("name"), spec.get("image_size"), spec.get("channels")
    inputs = {node.name: node for node in session.get_inputs()}
    if len(inputs) != 1 or name not in inputs:
        raise refuse(f"metadata input name {name!r} is not the graph's single input {sorted(inputs)}")
    if type(size) is not int or not 1 <= size <= 4096:
        raise refuse(f"metadata image_size must be a whole number of pixels from 1 to 4096, not {size!r}")
    if type(channels) is not int or channels not in (1, 3):
        raise refuse(f"metadata channels must be 1 or 3, not {channels!r}")
    if spec.get("dtype") != "uint8":
        raise refuse(f"metadata dtype must be 'uint8' (raw pixels), not {spec.get('dtype')!r}")
    node = inputs[name]
    if node.type != "tensor(uint8)":
        raise refuse(f"the graph takes {node.type}, not the uint8 pixels the metadata describes")
    if len(node.shape) != 4 or node.shape[3] != channels:
        raise refuse(
            f"the graph's input shape {node.shape} is not NHWC with {channels} channel(s) as the metadata says"
        )
    fixed = [side for side in node.shape[1:3] if isinstance(side, int)]
    if any(side != size for side in fixed):
        raise refuse(f"the graph's input is {node.shape[1]}x{node.shape[2]}, the metadata's image_size is {size}")
    # One real call on a blank image: what the graph answers must be one probability per label.
    try:
        output = onnx_runtime.run(session, np.zeros((1, size, size, channels), dtype=np.uint8))
    except Exception as error:  # onnxruntime's run errors share no useful base class
        raise refuse(
            f"the graph fails on a {size}x{size}x{channels} image as the metadata describes ({error})"
        ) from None
    if output.shape != (1, len(labels)):
        raise refuse(
            f"the graph answers shape {list(output.shape)} per image, the metadata names {len(labels)} labels"
        )
    return name, size, channels


def top_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most probable classes, best first; ties keep label order."""
    return np.argsort(-probabilities, kind="stable")[:k]


def predict_files(model_path: Path, images: list[Path], top_k: int = 1) -> list[dict[str, Any]]:
    """Per image, best first: {"image": path, "top_k": [{"label", "probability"}, ...]} (the server's shape)."""
    if top_k < 1:
        raise PipelineError(f"--top-k must be at least 1, got {top_k}")
    model = OnnxModel(model_path)
    k = min(top_k, len(model.labels))
    answers = []
    for path in map(Path, images):
        probabilities = model.probabilities(model.pixels(path))[0]
        ranked = [{"label": model.labels[i], "probability": float(probabilities[i])}
                  for i in top_indices(probabilities, k)]
        answers.append({"image": str(path), "top_k": ranked})
    return answers


def as_line(answer: dict[str, Any]) -> str:
    """One answer for people and shell tools: `path<TAB>label:prob<TAB>label:prob...`, whatever k is."""
    pairs = "\t".join(f"{pair['label']}:{pair['probability']:.4f}" for pair in answer["top_k"])
    return f"{answer['image']}\t{pairs}"
