"""Stage `transfer`: build the target model and copy the source model's weights into it.

Weights move layer by layer (matched by path or by position), only where every shape agrees; the
one exception is the first convolution when the channel counts differ (gray <-> RGB), whose
kernel is adapted so a gray image gives the same response. Everything else is skipped with a
reason and keeps its fresh initialization; reports/transfer.json and a markdown table say which.
Which layers then train, in which phase, is fine-tuning's choice (components.training.trainability).
The report's `probe` says, in seconds, how well the transferred features separate the target's
classes before any fine-tuning: a linear and a k-NN probe fitted on the train split, scored on val.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import keras
import numpy as np

from components.core.artifacts import write_text
from components.core.reports import TransferReport, write_report
from components.core.config import Params
from components.core.errors import PipelineError
from components.data.dataset import class_names, load_split
from components.training.models import build_model, load_model_dir, save_model_dir, weighted_layers
from components.training.probe import probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferResult:
    transferred: int
    skipped: int
    reinitialized: int

    def __str__(self) -> str:
        return f"{self.transferred} layers transferred, {self.skipped} skipped, {self.reinitialized} reinitialized"


def _shapes(weights: list[np.ndarray]) -> list[tuple[int, ...]]:
    return [tuple(weight.shape) for weight in weights]


def _adapt_channels(donor: list[np.ndarray], target_shapes: list[tuple[int, ...]]) -> tuple[list[np.ndarray], str] | None:
    """A conv kernel for 1 input channel made to take 3 (replicated / 3) or 3 made to take 1 (summed).

    Either way the response to a gray image (R = G = B) is unchanged. None when the mismatch is
    anything else.
    """
    kernel, *rest = donor
    wanted = target_shapes[0]
    if kernel.ndim != 4 or len(wanted) != 4 or _shapes(rest) != target_shapes[1:]:
        return None
    if kernel.shape[:2] != wanted[:2] or kernel.shape[3] != wanted[3]:
        return None
    if (kernel.shape[2], wanted[2]) == (1, 3):
        return [np.repeat(kernel, 3, axis=2) / 3.0, *rest], "gray to RGB: kernel replicated over 3 channels / 3"
    if (kernel.shape[2], wanted[2]) == (3, 1):
        return [kernel.sum(axis=2, keepdims=True), *rest], "RGB to gray: kernel summed over channels"
    return None


def transfer_weights(
    source: keras.Model,
    target: keras.Model,
    patterns: tuple[str, ...],
    match: str = "name",
    adapt_channels: bool = True,
) -> dict[str, list]:
    """Copy weights into `target` where its layer path matches a pattern; returns the per-layer report.

    match="name": the source layer with the same path; match="position": the n-th weighted layer
    of the source for the n-th weighted layer of the target (different layer names, same design).
    """
    source_list = list(weighted_layers(source))
    source_by_path = dict(source_list)
    target_list = list(weighted_layers(target))
    first_conv = next((path for path, layer in target_list if isinstance(layer, keras.layers.Conv2D)), None)
    report: dict[str, list] = {"layers": [], "transferred": [], "skipped": [], "reinitialized": []}

    def record(path: str, status: str, source_path: str | None, reason: str) -> None:
        report["layers"].append({"layer": path, "status": status, "source": source_path, "reason": reason})
        if status == "skipped":
            report["skipped"].append({"layer": path, "reason": reason})
        if status in ("skipped", "reinitialized"):
            report["reinitialized"].append({"layer": path, "reason": "skipped" if status == "skipped" else reason})

    for index, (path, layer) in enumerate(target_list):
        if not any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns):
            record(path, "reinitialized", None, "not selected by transfer.layers")
            continue
        if match == "position":
            donor_path, donor = source_list[index] if index < len(source_list) else (None, None)
            missing = f"the source model has only {len(source_list)} weighted layers"
        else:
            donor_path, donor = path, source_by_path.get(path)
            missing = "no layer of this name in the source model"
        if donor is None:
            record(path, "skipped", None, missing)
            continue
        weights, wanted = donor.get_weights(), _shapes(layer.get_weights())
        note = ""
        if _shapes(weights) != wanted:
            adapted = _adapt_channels(weights, wanted) if adapt_channels and path == first_conv else None
            if adapted is None:
                record(path, "skipped", donor_path, f"shape mismatch: source {_shapes(weights)} vs target {wanted}")
                continue
            weights, note = adapted
        layer.set_weights(weights)
        report["transferred"].append({"layer": path, "source": donor_path,
                                      "weights": sum(int(w.size) for w in weights), **({"adapted": note} if note else {})})
        record(path, "adapted" if note else "transferred", donor_path, note)
    return report


def _table(report: dict, params: Params) -> str:
    """The per-layer report as a markdown table a person can read."""
    counts = {status: sum(item["status"] == status for item in report["layers"])
              for status in ("transferred", "adapted", "skipped", "reinitialized")}
    lines = [
        "# Weight transfer",
        "",
        f"match: `{params.transfer.match}`, layers: `{', '.join(params.transfer.layers)}`",
        "",
        ", ".join(f"{count} {status}" for status, count in counts.items()),
        "",
        "Which layers train, in which phase, is fine-tuning's choice (finetune.head_epochs, finetune.unfreeze_top): "
        "see the `trainable` lists of the fine-tune report.",
        "",
        "| # | layer | status | from | why |",
        "| --- | --- | --- | --- | --- |",
    ]
    for number, item in enumerate(report["layers"], start=1):
        why = item["reason"].replace("|", "\\|")
        lines.append(f"| {number} | `{item['layer']}` | {item['status']} | {item['source'] or ''} | {why} |")
    return "\n".join(lines) + "\n"


def run(params: Params) -> TransferResult:
    source, _ = load_model_dir(params.paths.source_model)
    classes = class_names(params.paths.clean, "target")
    keras.utils.set_random_seed(params.seed)
    target = build_model(params.model, params.data, len(classes), bn_inference=True)
    cfg = params.transfer
    report = transfer_weights(source, target, cfg.layers, cfg.match, cfg.adapt_channels)
    if not report["transferred"]:
        log.warning("no layer was transferred: the target model starts from scratch (check transfer.layers)")
    report.update(match=cfg.match, patterns=list(cfg.layers), head_init=cfg.head_init)
    train, val = (load_split(params.paths.clean, "target", name) for name in ("train", "val"))
    if train.shape[-1] == params.data.channels:
        report["probe"] = probe(target, train, val, cfg.probe_images, set_head=cfg.head_init == "probe")
        log.info("probes of the transferred features on target val: linear %.4f, %d-NN %.4f (chance %.4f)",
                 report["probe"]["linear_probe_accuracy"], report["probe"]["knn_k"], report["probe"]["knn_accuracy"],
                 report["probe"]["chance"])
    elif cfg.head_init == "probe":
        raise PipelineError("transfer.head_init: probe needs the probe, which cannot run on these images "
                            "(their channels differ from data.color_mode): rerun clean")
    else:  # clean ran with another data.color_mode; fine-tuning will say so, the probe just cannot run
        report["probe"] = None
        log.warning("no probe: the cleaned target images have %d channel(s), data.color_mode needs %d (rerun clean)",
                    train.shape[-1], params.data.channels)
    save_model_dir(target, classes, params.paths.transferred_model)
    write_report(params.paths.transfer_report, TransferReport(**report))
    write_text(params.paths.transfer_table, _table(report, params))
    for item in report["skipped"]:
        log.info("skipped %s: %s", item["layer"], item["reason"])
    return TransferResult(len(report["transferred"]), len(report["skipped"]), len(report["reinitialized"]))
