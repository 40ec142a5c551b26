"""Stage `report`: reports/report.html, the run on one self-contained page, its errors explained by Grad-CAM.

Reads the artifacts of the stages before it (the mistakes on the target test split with their
Grad-CAM maps come from evaluate, which has the model loaded: this stage needs no Keras) and a few
training images per class; the page itself is built by components.deploy.report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from components.core.artifacts import write_text
from components.core.config import Params
from components.core.errors import PipelineError
from components.core.reports import ErrorsReport, require_report
from components.data.dataset import Split, class_names, load_split
from components.core.graph import stage_names
from components.deploy.errors import ERRORS_FILE
from components.deploy.report import SAMPLES_PER_CLASS, ErrorCase, render, thumbnail

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
        # Only the few sample images are read from the shards, never the split.
        samples[task] = {name: list(train.images(np.flatnonzero(train.y == index)[:SAMPLES_PER_CLASS]))
                         for index, name in enumerate(train.classes)}
    return samples


def _errors(params: Params) -> tuple[list[ErrorCase], int, str | None]:
    """The misclassified test images evaluate explained (Grad-CAM needs the model; it had it loaded)."""
    from PIL import Image

    folder = params.paths.explained_errors
    errors = require_report(folder / ERRORS_FILE, ErrorsReport)
    cases = []
    for case in errors.cases:
        with Image.open(folder / case.image) as image:
            pixels = np.asarray(image)
        cases.append(ErrorCase(case.path, case.true, case.predicted, case.probability,
                               thumbnail(pixels, 128), (folder / case.overlay).read_bytes()))
    return cases, errors.misclassified, errors.layer


def run(params: Params) -> ReportResult:
    cases, total, layer = _errors(params)
    names = stage_names()
    upstream = names[: names.index("report")] if "report" in names else names
    page = render(params, _samples(params), cases, total, layer, upstream)
    write_text(params.paths.report, page)
    log.info("report: %s", params.paths.report)
    return ReportResult(total, len(cases), len(page.encode()))
