"""A short human summary of the last run, read from the reports the stages wrote (`tlpipe summary`)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from components.apps.init import MIN_SPLIT_IMAGES
from components.core.config import Params
from components.core.console import warnings_file
from components.core.errors import PipelineError
from components.core.graph import stage_names
from components.data.images import TASKS, is_image_name


def _show(path: Path) -> str:
    """The path relative to the working directory when it lies below it (what a user would type)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read(path: Path, stage: str) -> tuple[Any, str | None]:
    """(report, None), or (None, a line saying why it is missing or unreadable)."""
    if not Path(path).is_file():
        return None, f"{_show(path)} missing: the {stage} stage has not run yet (dvc repro {stage})"
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        return None, f"{_show(path)} unreadable ({error}): rerun the {stage} stage (dvc repro --force {stage})"
    if not isinstance(report, dict):
        return None, f"{_show(path)} holds no JSON object: rerun the {stage} stage (dvc repro --force {stage})"
    return report, None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics(params: Params) -> list[str]:
    metrics, problem = _read(params.paths.metrics, "evaluate")
    if problem:
        return [problem]
    return [
        f"target test accuracy {_number(metrics.get('accuracy', '?'))}, "
        f"macro F1 {_number(metrics.get('macro_f1', '?'))}"
    ]


def _gates(params: Params) -> list[str]:
    gates, problem = _read(params.paths.gates, "evaluate")
    if problem:
        return [problem]
    lines = [f"gates: {'PASSED' if gates.get('passed') else 'FAILED'}"]
    for gate in gates.get("gates", []):
        verdict = "pass" if gate.get("passed") else "FAIL"
        lines.append(
            f"  {verdict}  {gate.get('name', '?')}: {_number(gate.get('value', '?'))} "
            f"(threshold {_number(gate.get('threshold', '?'))})"
        )
    return lines


def _transfer(params: Params) -> list[str]:
    report, _ = _read(params.paths.transfer_report, "transfer")
    if report is None:
        return []
    counts = ", ".join(f"{len(report.get(key) or [])} {key}" for key in ("transferred", "skipped", "reinitialized"))
    lines = [f"transfer: {counts} layers"]
    found = report.get("probe")
    if isinstance(found, dict) and {"linear_probe_accuracy", "knn_accuracy", "chance"} <= found.keys():
        lines.append(f"probes of the transferred features (target val): linear {_number(found['linear_probe_accuracy'])}, "
                     f"k-NN {_number(found['knn_accuracy'])} (chance {_number(found['chance'])})")
    return lines


def _quarantine(params: Params) -> list[str]:
    report, _ = _read(params.paths.quarantine, "clean")
    if report is None or "counts" not in report:
        return []
    counts = report["counts"]
    if not isinstance(counts, dict):
        return [f"quarantine: {counts}"]
    if counts and all(isinstance(value, dict) for value in counts.values()):  # per task, as clean writes it
        return [f"quarantine: {'; '.join(f'{task}: {_totals(value)}' for task, value in counts.items())}"]
    return [f"quarantine: {_totals(counts)}"]


def _totals(counts: dict[str, Any]) -> str:
    """The top-level numbers of a counts mapping ("input 250, kept 200, ..."), leaving out nested detail."""
    return ", ".join(f"{key} {value}" for key, value in counts.items() if isinstance(value, (int, float)))


def _export(params: Params) -> list[str]:
    report, problem = _read(params.paths.export_report, "export")
    if problem:
        return [problem]
    if not Path(params.paths.onnx_model).is_file():
        return [f"{_show(params.paths.onnx_model)} missing: rerun the export stage (dvc repro export)"]
    return [
        f"ONNX model: {_show(params.paths.onnx_model)} (opset {report.get('opset', '?')}, "
        f"max |onnx - keras| {_number(report.get('max_abs_diff', '?'))})"
    ]


def _example_image(params: Params) -> str:
    """A real target image to try the model on, or a placeholder when there is none."""
    root = Path(params.paths.raw) / "target"
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for file in sorted(folder.iterdir()):
                if file.is_file() and is_image_name(file):
                    return shlex.quote(_show(file))
    return "IMAGE.png"


def _small_splits(params: Params) -> list[str]:
    report, _ = _read(params.paths.quarantine, "clean")
    counts = (report or {}).get("counts")
    if not isinstance(counts, dict):
        return []
    found = []
    for task in TASKS:
        for label, split_counts in (counts.get(task, {}).get("per_class") or {}).items():
            small = [f"{split_counts.get(split, 0)} {split}" for split in ("val", "test")
                     if split_counts.get(split, 0) < MIN_SPLIT_IMAGES]
            if small:
                found.append(f"{task} class '{label}' has {' and '.join(small)} images: early stopping and gates on "
                             "so few are chance; add images, or raise clean.val_fraction / clean.test_fraction")
    return found


def _weak_source(params: Params) -> list[str]:
    report, _ = _read(params.paths.source_report, "source")
    accuracy = (report or {}).get("test_accuracy")
    if isinstance(accuracy, (int, float)) and accuracy < params.evaluate.min_accuracy:
        return [f"the source model reached test accuracy {accuracy:.4f}, below evaluate.min_accuracy "
                f"{params.evaluate.min_accuracy:g}: transfer starts from weak features (more source epochs or data, "
                "or a pretrained backbone: tlpipe init)"]
    return []


# A probe is "near chance" below a quarter of the way from chance to perfect (0.4 for 5 classes).
PROBE_NEAR_CHANCE = 0.25


def _weak_probe(params: Params) -> list[str]:
    report, _ = _read(params.paths.transfer_report, "transfer")
    found = (report or {}).get("probe")
    if not isinstance(found, dict):
        return []
    linear, knn, chance = (found.get(key) for key in ("linear_probe_accuracy", "knn_accuracy", "chance"))
    if not all(isinstance(value, (int, float)) for value in (linear, knn, chance)):
        return []
    if max(linear, knn) < chance + PROBE_NEAR_CHANCE * (1 - chance):
        return [f"the transferred features are near chance on the target: linear probe "
                f"{linear:.4f}, k-NN {knn:.4f}, chance {chance:.4f}; "
                "the source may not be worth transferring (another source.mode, or compare evaluate.compare_scratch)"]
    return []


def _stage_warnings(params: Params) -> list[str]:
    """Every warning the stages logged in their last run, in graph order."""
    try:
        stages = stage_names()
    except PipelineError:  # run outside the repository: whatever files there are
        stages = sorted(path.stem for path in Path(params.paths.warnings).glob("*.json"))
    found = []
    for stage in stages:
        report, _ = _read(warnings_file(params.paths.warnings, stage), stage)
        found += [f"{stage}: {message}" for message in (report or {}).get("warnings", [])]
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
        lines.append(f"  tlpipe predict {shlex.quote(_show(params.paths.onnx_model))} {_example_image(params)}")
    lines.append("  dvc plots show")
    lines.append("  dvc metrics show")
    return "\n".join(lines)
