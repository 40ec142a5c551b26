"""The misclassified test images with their Grad-CAM maps: written by evaluate, shown by the run report.

Evaluate has the model and the test predictions in memory, so it writes them; the report stage then
reads a folder of PNGs and one JSON, and needs no Keras (which would cost it 5-25 s per run here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.core.artifacts import atomic_dir
from components.core.reports import ErrorsReport, dump

if TYPE_CHECKING:
    import keras

    from components.data.dataset import Split

ERRORS_FILE = "errors.json"
MAX_EXPLAINED_ERRORS = 48  # misclassified test images explained and shown, worst first


def write_explained_errors(model: keras.Model, split: Split, probabilities: np.ndarray, out_dir: Path,
                           cap: int = MAX_EXPLAINED_ERRORS) -> int:
    """The misclassified images, most confident first (up to `cap`), each as the model saw it and with the
    Grad-CAM map of its predicted class, into `out_dir` (NNN.png, NNN.gradcam.png, errors.json), atomically.

    Written where the predictions are made (evaluate), so no later step loads the model again. Returns
    the number of misclassified images.
    """
    from PIL import Image

    from components.training.gradcam import GradCam, overlay

    labels, classes, paths = split.y, split.classes, split.paths
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    shown = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:cap]
    images = split.images(shown) if len(shown) else None  # only the shown mistakes are read from the shards
    cam = GradCam(model)
    explanation = cam.explain(images, predicted[shown]) if len(shown) else None
    cases = []
    with atomic_dir(out_dir) as folder:
        for number, index in enumerate(shown, start=1):
            name = f"{number:03d}"
            pixels = images[number - 1]
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(folder / f"{name}.png")
            Image.fromarray(overlay(pixels, explanation.heatmaps[number - 1])).save(folder / f"{name}.gradcam.png")
            cases.append({"path": paths[index], "true": classes[labels[index]], "predicted": classes[predicted[index]],
                          "probability": round(float(probabilities[index, predicted[index]]), 6),
                          "image": f"{name}.png", "overlay": f"{name}.gradcam.png"})
        report = ErrorsReport(layer=cam.layer, misclassified=int(len(wrong)), shown=len(cases), cases=cases)
        (folder / ERRORS_FILE).write_text(json.dumps(dump(report), indent=2) + "\n")  # the folder is written atomically
    return int(len(wrong))
