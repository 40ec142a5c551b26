"""Stage `evaluate`: metrics on the held-out target test split, a confusion matrix, and the gates.

A failed gate fails the stage (after writing its reports), so export never runs on a worse model.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.artifacts import atomic_path, write_text
from components.core.config import Params
from components.data.dataset import load_split
from components.core.errors import PipelineError
from components.core.metrics import compute_metrics, confusion_figure
from components.core.reports import (FinetuneReport, GatesReport, MetricsReport, ScoresReport, ScratchReport,
                                     TransferGainReport, build_gates, metric_gates, number, read_report,
                                     require_report, write_report)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    accuracy: float
    macro_f1: float
    passed: bool

    def __str__(self) -> str:
        verdict = "gates passed" if self.passed else "gates FAILED"
        return f"test accuracy {number(self.accuracy)}, macro F1 {number(self.macro_f1)}, {verdict}"


def apply_gates(metrics: dict, params: Params, gain: dict | None = None) -> GatesReport:
    gates = metric_gates(metrics, params.evaluate.min_accuracy, params.evaluate.min_macro_f1)
    minimum = params.evaluate.min_transfer_gain
    if minimum is not None and gain is not None and gain.get("compared"):
        gates += build_gates([("min_transfer_gain", gain["accuracy_gain"], minimum, ">=")])
    return GatesReport.of(gates)


def _first_reaching(curve: list[float], elapsed: list[float], target: float) -> dict:
    """Epochs and seconds a validation-accuracy curve took to reach `target` (None: never did)."""
    for index, value in enumerate(curve):
        if value >= target:
            return {"epochs": index + 1, "seconds": elapsed[index]}
    return {"epochs": None, "seconds": None}


def transfer_gain(params: Params, transfer_accuracy: float) -> dict:
    """Compare with the from-scratch baseline (the scratch stage's report): test accuracy, and
    time/epochs to reach each other's best. {"compared": False} when the baseline was not trained."""
    baseline = read_report(params.paths.scratch_report, ScratchReport)
    if baseline is None or not baseline.trained:
        if params.evaluate.min_transfer_gain is not None:
            raise PipelineError(f"evaluate.min_transfer_gain needs the from-scratch baseline, and "
                                f"{params.paths.scratch_report} holds none: run the scratch stage first "
                                "(tlpipe stage scratch, with scratch.enabled: true)")
        return {"compared": False}
    phases = require_report(params.paths.finetune_report, FinetuneReport).phases
    curve: list[float] = []
    elapsed: list[float] = []
    for result in phases.values():  # head, then unfrozen: one curve, time running on
        offset = elapsed[-1] if elapsed else 0.0
        curve += list(result["val_accuracy"])
        elapsed += [offset + seconds for seconds in result["elapsed"]]
    scratch = baseline.fit or {}
    scratch_curve, scratch_elapsed = list(scratch["val_accuracy"]), list(scratch["elapsed"])
    best_transfer, best_scratch = max(curve, default=0.0), max(scratch_curve, default=0.0)
    return {
        "compared": True,
        "transfer_accuracy": round(transfer_accuracy, 6),
        "scratch_accuracy": round(baseline.test_accuracy, 6),
        "accuracy_gain": round(transfer_accuracy - baseline.test_accuracy, 6),
        "transfer": {"epochs": len(curve), "seconds": round(elapsed[-1], 3) if elapsed else 0.0,
                     "best_val_accuracy": best_transfer,
                     "to_reach_scratch_best": _first_reaching(curve, elapsed, best_scratch)},
        "scratch": {"epochs": len(scratch_curve), "seconds": scratch["seconds"], "best_val_accuracy": best_scratch,
                    "to_reach_transfer_best": _first_reaching(scratch_curve, scratch_elapsed, best_transfer)},
    }


def _write_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...], matrix: list, params: Params) -> None:
    # One row per test image: the layout DVC's confusion template reads.
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(y_true, y_pred))
    write_text(params.paths.confusion, rows.getvalue())
    _plot_confusion(np.asarray(matrix), classes, params.paths.confusion_png)


def _plot_confusion(matrix: np.ndarray, classes: tuple[str, ...], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = confusion_figure(matrix, classes, title="target test split")
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)


def run(params: Params) -> EvaluateResult:
    # Imported here: promotion reuses the metrics above without paying for Keras and TensorFlow.
    from components.data.stream import predict
    from components.training.models import load_model_dir

    model, classes = load_model_dir(params.paths.finetuned_model)
    test = load_split(params.paths.clean, "target", "test")
    if classes != test.classes:
        raise PipelineError(f"the model's classes {classes} differ from the test split's {test.classes}: rerun transfer")
    probabilities = predict(model, test)
    y_pred = probabilities.argmax(axis=1)
    metrics = compute_metrics(test.y, y_pred, classes)
    gain = transfer_gain(params, metrics["accuracy"])
    if gain["compared"]:
        log.info("transfer gain: test accuracy %.4f (transfer) vs %.4f (from scratch): %+.4f",
                 gain["transfer_accuracy"], gain["scratch_accuracy"], gain["accuracy_gain"])
        if gain["accuracy_gain"] < 0:
            log.warning("negative transfer: the transferred model scored %+.4f test accuracy against one trained from "
                        "scratch on the same labels; try other transfer.layers / finetune.head_epochs, or skip transfer",
                        gain["accuracy_gain"])
    gates = apply_gates(metrics, params, gain)
    write_report(params.paths.metrics, MetricsReport(**metrics))
    write_report(params.paths.transfer_gain, TransferGainReport(**gain))
    write_report(params.paths.gates, gates)
    # The few numbers `dvc metrics show` and `dvc exp show` print; the details stay in paths.metrics.
    write_report(params.paths.scores, ScoresReport(accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"],
                                                   gates_passed=gates.passed))
    _write_confusion(test.y, y_pred, classes, metrics["confusion_matrix"], params)
    # The run report's error section: the mistakes with their Grad-CAM maps, while the model is loaded.
    from components.deploy.errors import write_explained_errors

    write_explained_errors(model, test, probabilities, params.paths.explained_errors)
    result = EvaluateResult(metrics["accuracy"], metrics["macro_f1"], gates.passed)
    if not gates.passed:
        failed = "; ".join(g.why for g in gates.failed)
        raise PipelineError(
            f"gates failed ({failed}); the model is not exported. See {params.paths.metrics}; improve the model "
            "or data, or change the thresholds in params.yaml evaluate:"
        )
    return result
