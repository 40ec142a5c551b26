"""Drift: a new dataset's statistics against the last validated one (class shares, image sizes, channel colour)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from components.core.artifacts import read_json, write_json
from components.core.config import Params
from components.data.images import TASKS

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

NO_REFERENCE = "no reference, recorded this as the reference"


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


def compare(current: dict[str, Any], reference: dict[str, Any], params: Params) -> list[dict[str, Any]]:
    """One check per task and measure: {name, value, threshold, passed}, the same shape evaluate's gates use."""
    limits = params.validation
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, threshold: float) -> None:
        checks.append({"name": name, "value": round(value, 4), "threshold": threshold, "passed": value <= threshold})

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
    return checks


def check_drift(manifest: "pd.DataFrame", params: Params) -> dict[str, Any]:
    """Compare with paths.drift_reference, write paths.drift_report, and adopt this dataset as the reference
    when it passes (or when there is none yet). Returns the report; `passed` False means a bound was exceeded."""
    reference_path, report_path = params.paths.drift_reference, params.paths.drift_report
    current = dataset_stats(manifest)
    if not reference_path.is_file():
        report: dict[str, Any] = {"passed": True, "status": NO_REFERENCE, "checks": [], "current": current}
    else:
        reference = read_json(reference_path)
        checks = compare(current, reference, params)
        passed = all(c["passed"] for c in checks)
        report = {"passed": passed, "status": "compared with the reference", "checks": checks,
                  "current": current, "reference": reference}
    write_json(report_path, report)
    if report["passed"]:
        write_json(reference_path, current)  # the last validated dataset is the next run's reference
    log.info("drift: %s (%s)", report["status"], "passed" if report["passed"] else "BOUNDS EXCEEDED")
    return report
