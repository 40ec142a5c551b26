"""Stage `report`: reports/report.html, the run on one self-contained page, its errors explained by Grad-CAM.

Reads the artifacts of the stages before it, a few training images per class, and the fine-tuned
model's mistakes on the target test split; the page itself is built by components.deploy.report.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from components.core.artifacts import write_text
from components.core.config import Params
from components.core.errors import PipelineError
from components.data.dataset import Split, class_names, load_split
from components.core.graph import stage_names
from components.deploy.report import MAX_ERRORS, SAMPLES_PER_CLASS, ErrorCase, render, thumbnail

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    errors: int
    explained: int
    size_bytes: int

    def __str__(self) -> str:
        return f"{self.explained} of {self.errors} misclassified test images explained; {self.size_bytes / 1e6:.2f} MB"


def _split(params: Params, task: str, split: str) -> Split:
    # The one place this stage reads cleaned images: the dataset API's, whatever the storage.
    return load_split(params.paths.clean, task, split)


def _samples(params: Params) -> dict[str, dict[str, list[np.ndarray]]]:
    samples: dict[str, dict[str, list[np.ndarray]]] = {}
    for task in ("source", "target"):
        try:
            class_names(params.paths.clean, task)
        except PipelineError:  # no cleaned images of this task: its strip is left out
            continue
        train = _split(params, task, "train")
        samples[task] = {name: list(train.x[train.y == index][:SAMPLES_PER_CLASS])
                         for index, name in enumerate(train.classes)}
    return samples


def _errors(params: Params) -> tuple[list[ErrorCase], int, str]:
    """The misclassified test images, most confident first, each with its Grad-CAM overlay."""
    from PIL import Image

    from components.training.gradcam import GradCam, overlay
    from components.training.models import load_model_dir

    model, classes = load_model_dir(params.paths.finetuned_model)
    test = _split(params, "target", "test")
    if classes != test.classes:
        raise PipelineError(f"the model's classes {classes} differ from the test split's {test.classes}: rerun transfer")
    probabilities = model.predict(test.x, batch_size=256, verbose=0)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != test.y)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:MAX_ERRORS]
    cam = GradCam(model)
    if not len(wrong):
        return [], 0, cam.layer
    explanation = cam.explain(test.x[wrong], predicted[wrong])
    cases = []
    for index, heatmap in zip(wrong, explanation.heatmaps):
        buffer = io.BytesIO()
        Image.fromarray(overlay(test.x[index], heatmap)).save(buffer, format="PNG")
        cases.append(ErrorCase(test.paths[index], classes[test.y[index]], classes[predicted[index]],
                               float(probabilities[index, predicted[index]]), thumbnail(test.x[index], 128),
                               buffer.getvalue()))
    return cases, int((predicted != test.y).sum()), cam.layer


def run(params: Params) -> ReportResult:
    cases, total, layer = _errors(params)
    names = stage_names()
    upstream = names[: names.index("report")] if "report" in names else names
    page = render(params, _samples(params), cases, total, layer, upstream)
    write_text(params.paths.report, page)
    log.info("report: %s", params.paths.report)
    return ReportResult(total, len(cases), len(page.encode()))
