"""Stage `transfer`: build the target model and copy the source model's weights into it, shape-checked."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import keras

from components.artifacts import write_json
from components.config import Params
from components.dataset import class_names
from components.models import BACKBONE_NAME, build_model, load_model_dir, save_model_dir, weighted_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferResult:
    transferred: int
    skipped: int
    reinitialized: int

    def __str__(self) -> str:
        return f"{self.transferred} layers transferred, {self.skipped} skipped, {self.reinitialized} reinitialized"


def _shapes(layer: keras.layers.Layer) -> list[tuple[int, ...]]:
    return [tuple(weight.shape) for weight in layer.weights]


def transfer_weights(source: keras.Model, target: keras.Model, patterns: tuple[str, ...]) -> dict[str, list]:
    """Copy weights layer by layer where the path matches a pattern and every weight's shape agrees."""
    source_layers = dict(weighted_layers(source))
    report: dict[str, list] = {"transferred": [], "skipped": [], "reinitialized": []}
    for path, layer in weighted_layers(target):
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns):
            report["reinitialized"].append({"layer": path, "reason": "not selected by transfer.layers"})
            continue
        donor = source_layers.get(path)
        if donor is None:
            report["skipped"].append({"layer": path, "reason": "no layer of this name in the source model"})
            report["reinitialized"].append({"layer": path, "reason": "skipped"})
            continue
        if _shapes(donor) != _shapes(layer):
            reason = f"shape mismatch: source {_shapes(donor)} vs target {_shapes(layer)}"
            report["skipped"].append({"layer": path, "reason": reason})
            report["reinitialized"].append({"layer": path, "reason": "skipped"})
            continue
        layer.set_weights(donor.get_weights())
        report["transferred"].append({"layer": path, "weights": sum(int(w.size) for w in donor.get_weights())})
    return report


def run(params: Params) -> TransferResult:
    source, _ = load_model_dir(params.paths.source_model)
    classes = class_names(params.paths.clean, "target")
    keras.utils.set_random_seed(params.seed)
    target = build_model(params.model, params.data, len(classes), bn_inference=True)
    report = transfer_weights(source, target, params.transfer.layers)
    if not report["transferred"]:
        log.warning("no layer was transferred: the target model starts from scratch (check transfer.layers)")
    frozen = params.transfer.freeze == "backbone"
    target.get_layer(BACKBONE_NAME).trainable = not frozen
    report["frozen"] = [path for path, _ in weighted_layers(target) if path.startswith(f"{BACKBONE_NAME}.")] if frozen else []
    report["freeze"] = params.transfer.freeze
    report["patterns"] = list(params.transfer.layers)
    save_model_dir(target, classes, params.paths.transferred_model)
    write_json(params.paths.transfer_report, report)
    for item in report["skipped"]:
        log.info("skipped %s: %s", item["layer"], item["reason"])
    return TransferResult(len(report["transferred"]), len(report["skipped"]), len(report["reinitialized"]))
