"""Label image files with an exported ONNX model, using only onnxruntime, numpy and Pillow.

Everything the model needs comes from the .onnx file's metadata (labels, input_spec), so serving
needs neither TensorFlow nor Keras nor params.yaml. Each file is decoded and resized exactly as the
clean stage stored the training images (components.data.images.load_normalized: EXIF orientation,
alpha on white, 16-bit scaled, Pillow's area-like downscaling); the model's own resize layer
then has nothing left to do, so a large photo is not aliased by a resize training never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from components.core.errors import PipelineError
from components.data.images import load_normalized


class OnnxModel:
    """An exported .onnx file, its session and the tlpipe metadata it carries (shared with the server)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: model not found; export one with `tlpipe stage export` (models/model.onnx)")
        options = ort.SessionOptions()
        # Idle intra-op threads would otherwise spin for a while after each call, taking the CPU
        # from image decoding and, in the server, from the event loop between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's load errors share no useful base class
            raise PipelineError(
                f"{path}: not a readable ONNX model ({error}); pass the .onnx file the export stage wrote"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.preprocessing: str = meta.get("preprocessing", "")
        try:
            self.labels: list[str] = json.loads(meta["labels"])
            spec = json.loads(meta["input_spec"])
            self.input_spec: dict[str, object] = spec
            self.input_name: str = spec["name"]
            self.size = int(spec["image_size"])
            self.pil_mode = "L" if int(spec["channels"]) == 1 else "RGB"
        except (KeyError, TypeError, ValueError) as error:
            raise PipelineError(
                f"{path}: ONNX model without tlpipe metadata ({error!r}); export it with `tlpipe stage export`"
            ) from None

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


def top_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most probable classes, best first; ties keep label order."""
    return np.argsort(-probabilities, kind="stable")[:k]


def predict_files(model_path: Path, images: list[Path], top_k: int = 1) -> list[str]:
    """One line per image: `path<TAB>label<TAB>prob`, or with top_k > 1 `path<TAB>label:prob<TAB>...`."""
    if top_k < 1:
        raise PipelineError(f"--top-k must be at least 1, got {top_k}")
    model = OnnxModel(model_path)
    k = min(top_k, len(model.labels))
    lines = []
    for path in map(Path, images):
        probabilities = model.session.run(None, {model.input_name: model.pixels(path)})[0][0]
        best = top_indices(probabilities, k)
        if top_k == 1:
            lines.append(f"{path}\t{model.labels[best[0]]}\t{probabilities[best[0]]:.4f}")
        else:
            pairs = "\t".join(f"{model.labels[i]}:{probabilities[i]:.4f}" for i in best)
            lines.append(f"{path}\t{pairs}")
    return lines
