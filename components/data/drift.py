"""Drift: a new dataset's statistics against the last validated batch of the same dataset.

The reference belongs to one dataset: its data source (the embedded digits, a folder or a CSV
manifest, per task) and its class set. A run on another dataset (a user's first run on their own
folders, say) records a new reference and says so; the drift gate guards only new data for the
same dataset. `tlpipe drift accept` adopts the last validated data as the reference when a change
is intended.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from components.core.config import Params
from components.core.errors import PipelineError
from components.core.reports import (Comparison, DriftReference, DriftReport, Gate, build_gates, read_report,
                                     write_report)
from components.data.csv_manifest import is_csv_manifest
from components.data.images import TASKS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

NO_REFERENCE = "no reference, recorded this as the reference"
NEW_DATASET = "another dataset than the reference's, recorded this as its reference"
COMPARED = "compared with the reference"


def dataset_identity(manifest: "pd.DataFrame", params: Params) -> dict[str, Any]:
    """Per task: where its data comes from and its class set. Drift is measured only within one identity."""
    identity: dict[str, Any] = {}
    for task in TASKS:
        folder = getattr(params.data, f"{task}_dir")
        if not folder:
            source = "embedded digits"
        else:
            source = f"{'csv' if is_csv_manifest(folder) else 'folders'} {folder}"
        labels = manifest.loc[manifest["task"] == task, "label"].astype(str)
        identity[task] = {"source": source, "classes": sorted(set(labels))}
    return identity


def dataset_stats(manifest: "pd.DataFrame") -> dict[str, Any]:
    """Per task, over usable images: class shares, median and quartile sides, per-channel mean and std (0..255)."""
    stats: dict[str, Any] = {}
    for task in TASKS:
        rows = manifest[(manifest["task"] == task) & (manifest["error"] == "")]
        if rows.empty:
            stats[task] = {"images": 0}
            continue
        shares = rows["label"].value_counts(normalize=True).sort_index()
        channels: dict[str, dict[str, float]] = {}
        for c in "rgb":
            mean = float(rows[f"mean_{c}"].mean())
            # The whole dataset's std from per-image means and stds (law of total variance).
            second = float((rows[f"std_{c}"] ** 2 + rows[f"mean_{c}"] ** 2).mean())
            channels[c] = {"mean": round(mean, 3), "std": round(math.sqrt(max(second - mean**2, 0.0)), 3)}
        stats[task] = {
            "images": len(rows),
            "class_shares": {str(k): round(float(v), 6) for k, v in shares.items()},
            "width": {q: float(rows["width"].quantile(p)) for q, p in (("q1", 0.25), ("median", 0.5), ("q3", 0.75))},
            "height": {q: float(rows["height"].quantile(p)) for q, p in (("q1", 0.25), ("median", 0.5), ("q3", 0.75))},
            "channels": channels,
        }
    return stats


def compare(current: dict[str, Any], reference: dict[str, Any], params: Params) -> list[Gate]:
    """One gate per task and measure: the change must stay within its bound."""
    limits = params.validation
    checks: list[tuple[str, float, float, Comparison]] = []

    def check(name: str, value: float, bound: float) -> None:
        checks.append((name, round(value, 4), bound, "<="))

    for task in TASKS:
        cur, ref = current.get(task, {}), reference.get(task, {})
        if not cur.get("images") or not ref.get("images"):
            continue
        labels = set(cur["class_shares"]) | set(ref["class_shares"])
        check(f"{task}.class_share_change",
              max(abs(cur["class_shares"].get(k, 0.0) - ref["class_shares"].get(k, 0.0)) for k in labels),
              limits.drift_max_class_share_change)
        for side in ("width", "height"):
            check(f"{task}.median_{side}_change", abs(cur[side]["median"] / ref[side]["median"] - 1),
                  limits.drift_max_size_change)
        for c in "rgb":
            for stat in ("mean", "std"):
                check(f"{task}.{c}_{stat}_change", abs(cur["channels"][c][stat] - ref["channels"][c][stat]),
                      limits.drift_max_channel_change)
    return build_gates(checks)


def _differences(current: dict[str, Any], reference: dict[str, Any]) -> str:
    """What makes two identities different datasets, in a few words ("target classes changed", ...)."""
    changed = [f"{task} {field}" for task in TASKS for field in ("source", "classes")
               if current.get(task, {}).get(field) != reference.get(task, {}).get(field)]
    return ", ".join(changed) or "no dataset recorded in the reference"


def check_drift(manifest: "pd.DataFrame", params: Params) -> DriftReport:
    """Compare with paths.drift_reference when it belongs to the same dataset, write paths.drift_report, and
    adopt this batch as the reference when it passes (or when the reference is absent or another dataset's).
    Returns the report; `passed` False means a bound was exceeded."""
    identity, current = dataset_identity(manifest, params), dataset_stats(manifest)
    stored = read_report(params.paths.drift_reference, DriftReference)
    if stored is None:
        report = DriftReport(passed=True, status=NO_REFERENCE, checks=[], dataset=identity, current=current)
    elif stored.dataset != identity:
        report = DriftReport(passed=True, status=NEW_DATASET, checks=[], changed=_differences(identity, stored.dataset),
                             dataset=identity, current=current)
        log.warning("drift: new dataset (%s): recorded it as the drift reference; the drift gate guards "
                    "new data for this dataset from now on", report.changed)
    else:
        checks = compare(current, stored.stats, params)
        report = DriftReport(passed=all(c.passed for c in checks), status=COMPARED, checks=checks,
                             reference=stored.stats, dataset=identity, current=current)
    write_report(params.paths.drift_report, report)
    if report.passed:
        record_reference(report, params)
    log.info("drift: %s (%s)", report.status, "passed" if report.passed else "BOUNDS EXCEEDED")
    return report


def record_reference(report: DriftReport, params: Params) -> None:
    """The batch a drift report describes becomes the next run's reference."""
    write_report(params.paths.drift_reference, DriftReference(dataset=report.dataset, stats=report.current))


def accept(params: Params) -> str:
    """`tlpipe drift accept`: adopt the last validated batch (paths.drift_report) as the reference."""
    path = params.paths.drift_report
    report = read_report(path, DriftReport)
    if report is None:
        raise PipelineError(f"{path} not found: run `dvc repro validate` first, then accept its data")
    record_reference(report, params)
    return (f"accepted the data of the last validate run as the drift reference ({params.paths.drift_reference}); "
            "`dvc repro` now continues from validate")
