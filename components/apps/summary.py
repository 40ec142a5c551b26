"""A short human summary of the last run, read from the reports the stages wrote (`tlpipe summary`)."""

from __future__ import annotations

import shlex
from pathlib import Path

from components.apps.init import MIN_SPLIT_IMAGES
from components.core.config import Params
from components.core.console import warnings_file
from components.core.errors import PipelineError
from components.core.graph import stage_names
from components.core.reports import (ExportReport, GatesReport, MetricsReport, QuarantineReport, SourceReport,
                                     TransferReport, WarningsReport, gate_rows, number, read_report)
from components.data import raw_pack
from components.data.images import TASKS, is_image_name


def _show(path: Path) -> str:
    """The path relative to the working directory when it lies below it (what a user would type)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _missing(path: Path, stage: str) -> str:
    return f"{_show(path)} missing: the {stage} stage has not run yet (dvc repro {stage})"


def _metrics(params: Params) -> list[str]:
    metrics = read_report(params.paths.metrics, MetricsReport)
    if metrics is None:
        return [_missing(params.paths.metrics, MetricsReport.STAGE)]
    return [f"target test accuracy {number(metrics.accuracy)}, macro F1 {number(metrics.macro_f1)}"]


def _gates(params: Params) -> list[str]:
    gates = read_report(params.paths.gates, GatesReport)
    if gates is None:
        return [_missing(params.paths.gates, GatesReport.STAGE)]
    lines = [f"gates: {'PASSED' if gates.passed else 'FAILED'}"]
    lines += [f"  {'pass' if passed else 'FAIL'}  {name}: {value} (threshold {bound})"
              for name, value, bound, passed in gate_rows(gates.gates)]
    return lines


def _transfer(params: Params) -> list[str]:
    report = read_report(params.paths.transfer_report, TransferReport)
    if report is None:
        return []
    counts = ", ".join(f"{len(getattr(report, key))} {key}" for key in ("transferred", "skipped", "reinitialized"))
    lines = [f"transfer: {counts} layers"]
    if (found := report.probe) is not None:
        lines.append(f"probes of the transferred features (target val): linear {number(found.linear_probe_accuracy)}, "
                     f"k-NN {number(found.knn_accuracy)} (chance {number(found.chance)})")
    return lines


def _quarantine(params: Params) -> list[str]:
    report = read_report(params.paths.quarantine, QuarantineReport)
    if report is None:
        return []
    totals = {task: ", ".join(f"{key} {getattr(counts, key)}" for key in ("input", "kept", "quarantined", "held_back",
                                                                               "leaked_across_splits"))
              for task, counts in report.counts.items()}
    return [f"quarantine: {'; '.join(f'{task}: {line}' for task, line in totals.items())}"]


def _export(params: Params) -> list[str]:
    report = read_report(params.paths.export_report, ExportReport)
    if report is None:
        return [_missing(params.paths.export_report, ExportReport.STAGE)]
    if not Path(params.paths.onnx_model).is_file():
        return [f"{_show(params.paths.onnx_model)} missing: rerun the export stage (dvc repro export)"]
    return [
        f"ONNX model: {_show(params.paths.onnx_model)} (opset {report.opset}, "
        f"max |onnx - keras| {number(report.max_abs_diff)})"
    ]


def _example_commands(params: Params) -> list[str]:
    """`tlpipe predict` on a real target image: a file of your target folder, else one taken out of
    data/raw's pack into /tmp (the embedded digits are stored nowhere else); a placeholder when there is none."""
    onnx = shlex.quote(_show(params.paths.onnx_model))
    folder = Path(params.paths.raw) / "target"
    try:
        first = next(m for m in raw_pack.members(folder) if is_image_name(m.path))
    except (PipelineError, OSError, StopIteration):
        return [f"tlpipe predict {onnx} IMAGE.png"]
    mine = Path(params.data.target_dir).expanduser() / first.path if params.data.target_dir else None
    if mine is not None and mine.is_file():
        return [f"tlpipe predict {onnx} {shlex.quote(_show(mine))}"]
    pack = shlex.quote(_show(folder / raw_pack.pack_name(first.pack)))
    return [f"tar -xf {pack} -C /tmp {shlex.quote(first.path)}",
            f"tlpipe predict {onnx} {shlex.quote('/tmp/' + first.path)}"]


def _small_splits(params: Params) -> list[str]:
    report = read_report(params.paths.quarantine, QuarantineReport)
    if report is None:
        return []
    found = []
    for task in TASKS:
        counts = report.counts.get(task)
        for label, split_counts in (counts.per_class if counts else {}).items():
            small = [f"{split_counts.get(split, 0)} {split}" for split in ("val", "test")
                     if split_counts.get(split, 0) < MIN_SPLIT_IMAGES]
            if small:
                found.append(f"{task} class '{label}' has {' and '.join(small)} images: early stopping and gates on "
                             "so few are chance; add images, or raise clean.val_fraction / clean.test_fraction")
    return found


def _weak_source(params: Params) -> list[str]:
    report = read_report(params.paths.source_report, SourceReport)
    accuracy = report.test_accuracy if report else None
    if accuracy is not None and accuracy < params.evaluate.min_accuracy:
        return [f"the source model reached test accuracy {number(accuracy)}, below evaluate.min_accuracy "
                f"{params.evaluate.min_accuracy:g}: transfer starts from weak features (more source epochs or data, "
                "or a pretrained backbone: tlpipe init)"]
    return []


# A probe is "near chance" below a quarter of the way from chance to perfect (0.4 for 5 classes).
PROBE_NEAR_CHANCE = 0.25


def _weak_probe(params: Params) -> list[str]:
    report = read_report(params.paths.transfer_report, TransferReport)
    if report is None or report.probe is None:
        return []
    found = report.probe
    if max(found.linear_probe_accuracy, found.knn_accuracy) < found.chance + PROBE_NEAR_CHANCE * (1 - found.chance):
        return [f"the transferred features are near chance on the target: linear probe "
                f"{number(found.linear_probe_accuracy)}, k-NN {number(found.knn_accuracy)}, chance {number(found.chance)}; "
                "the source may not be worth transferring (another source.mode, or measure it: scratch.enabled)"]
    return []


def _stage_warnings(params: Params) -> list[str]:
    """Every warning the stages logged in their last run, in graph order."""
    try:
        stages = stage_names()
    except PipelineError:  # run outside the repository: whatever files there are
        stages = sorted(path.stem for path in Path(params.paths.warnings).glob("*.json"))
    found = []
    for stage in stages:
        report = read_report(warnings_file(params.paths.warnings, stage), WarningsReport, stage)
        found += [f"{stage}: {message}" for message in (report.warnings if report else [])]
    return found


def warnings(params: Params) -> list[str]:
    """Every warning of the run: those the stages logged, and those read from their reports."""
    return [*_stage_warnings(params), *_small_splits(params), *_weak_source(params), *_weak_probe(params)]


def summary(params: Params) -> str:
    """Metrics, gates, transfer and quarantine counts, the ONNX model, every warning, and the next commands."""
    lines = [*_metrics(params), *_gates(params), *_transfer(params), *_quarantine(params), *_export(params)]
    found = warnings(params)
    lines.append(f"warnings: {len(found)}" if found else "warnings: none")
    lines += [f"  - {line}" for line in found]
    lines.append("next:")
    if Path(params.paths.onnx_model).is_file():
        lines += [f"  {command}" for command in _example_commands(params)]
    lines.append("  dvc plots show")
    lines.append("  dvc metrics show")
    return "\n".join(lines)
