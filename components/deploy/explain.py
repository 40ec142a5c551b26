"""`tlpipe explain`: Grad-CAM overlays for image files, beside a JSON of the model's predictions.

The model is a Keras `.keras` file (or a pipeline model folder holding model.keras and
labels.json: the exported ONNX model's Keras twin is models/finetuned). Each file is decoded and
resized as the clean stage stored the training images (images.load_normalized), as `tlpipe
predict` does, so the explained input is the one the model was trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from components.core.artifacts import atomic_path, write_json
from components.core.errors import PipelineError
from components.data.images import load_normalized
from components.training.gradcam import GradCam, overlay
from components.training.models import LABELS_FILE, MODEL_FILE, load_keras_file

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"


def load_explained_model(path: Path) -> tuple[keras.Model, tuple[str, ...] | None]:
    """A .keras file, or a folder with model.keras (and labels.json when the pipeline wrote it)."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file() or file.suffix != ".keras":
        raise PipelineError(f"{path}: not a .keras model file or a folder holding {MODEL_FILE} (e.g. models/finetuned)")
    labels_path = file.parent / LABELS_FILE
    labels = json.loads(labels_path.read_text()) if labels_path.is_file() else None
    return load_keras_file(file), tuple(labels) if labels else None


def input_geometry(model: keras.Model) -> tuple[int, str]:
    """(side the model resizes to, Pillow mode of its input) to decode files as training saw them."""
    channels = model.inputs[0].shape[-1]
    if channels not in (1, 3):
        raise PipelineError(f"model {model.name!r} takes {channels} channels; explain reads gray (1) or RGB (3) images")
    for layer in model.layers:
        if isinstance(layer, keras.layers.Resizing) and layer.height == layer.width:
            return int(layer.height), "L" if channels == 1 else "RGB"
    height, width = model.inputs[0].shape[1:3]
    if height is None or height != width:
        raise PipelineError(f"model {model.name!r} has no square Resizing layer or fixed square input: cannot size images")
    return int(height), "L" if channels == 1 else "RGB"


def read_image(path: Path, side: int, pil_mode: str) -> np.ndarray:
    if not Path(path).is_file():
        raise PipelineError(f"{path}: image not found")
    try:
        image = load_normalized(Path(path), side, pil_mode)
    except Exception as error:  # Pillow raises many types for a bad file; each means "cannot decode"
        raise PipelineError(f"{path}: cannot decode image ({type(error).__name__}: {error})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def explain_files(model_path: Path, images: list[Path], out_dir: Path, layer: str | None = None) -> list[dict[str, Any]]:
    """Write <out_dir>/<n>_<stem>.gradcam.png per image and <out_dir>/predictions.json; return its rows."""
    model, labels = load_explained_model(model_path)
    side, pil_mode = input_geometry(model)
    pixels = np.stack([read_image(path, side, pil_mode) for path in images])
    cam = GradCam(model, layer)
    explanation = cam.explain(pixels)
    names = labels or tuple(str(i) for i in range(explanation.probabilities.shape[1]))
    if len(names) != explanation.probabilities.shape[1]:
        raise PipelineError(f"{model_path}: {len(names)} labels for {explanation.probabilities.shape[1]} outputs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, (path, image, heatmap, probabilities, chosen) in enumerate(
        zip(images, pixels, explanation.heatmaps, explanation.probabilities, explanation.class_index), start=1
    ):
        name = f"{number:03d}_{Path(path).stem}.gradcam.png"  # numbered: two inputs may share a stem
        with atomic_path(out_dir / name) as temp:
            Image.fromarray(overlay(image, heatmap)).save(temp, format="PNG")
        rows.append({
            "image": str(path),
            "overlay": name,
            "predicted": names[int(chosen)],
            "probability": round(float(probabilities[chosen]), 6),
            "probabilities": {label: round(float(p), 6) for label, p in zip(names, probabilities)},
        })
    write_json(out_dir / PREDICTIONS_FILE, {"model": str(model_path), "layer": cam.layer, "images": rows})
    log.info("explained %d image(s) at layer %s: %s", len(rows), cam.layer, out_dir / PREDICTIONS_FILE)
    return rows
