"""A CSV manifest (path,label[,split]) as an alternative to class subfolders: read and checked, never trusted blindly."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from components.core.errors import PipelineError

log = logging.getLogger(__name__)


def is_csv_manifest(value: str) -> bool:
    return Path(value).suffix.lower() == ".csv"


# What a user may write in the split column, and the split it names; an empty cell leaves it to clean.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test", "": ""}


def read_csv_manifest(path: Path) -> list[tuple[str, str, str]]:
    """(path as written, label, split or "") per row; paths are relative to the CSV's folder, the data root.

    Whether each path exists or stays inside the data root is ingest's question, answered per
    file with a quarantine reason, so one bad row never hides the rest.
    """
    if not path.is_file():
        raise PipelineError(f"CSV manifest {path} does not exist; fix the path in params.yaml")
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if not {"path", "label"} <= set(columns):
            raise PipelineError(f"CSV manifest {path} needs a header with columns path,label (and optionally split); "
                                f"it has {columns}")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise PipelineError(f"CSV manifest {path} has a header but no rows; add one line per image (path,label)")
    bad = [i + 2 for i, row in enumerate(rows) if not row.get("path") or not row.get("label")]
    if bad:
        raise PipelineError(f"CSV manifest {path}: line(s) {bad[:5]} lack a path or a label; fill them in or remove "
                            "them")
    labels = {row["label"] for row in rows}
    odd = sorted(label for label in labels if label in (".", "..") or "/" in label or "\\" in label)
    if odd:
        raise PipelineError(f"CSV manifest {path}: labels {odd} cannot name a class folder; rename them")
    unknown = [(i + 2, row["split"]) for i, row in enumerate(rows) if row.get("split", "").lower() not in SPLIT_NAMES]
    if unknown:
        raise PipelineError(f"CSV manifest {path}: split values {[s for _, s in unknown[:5]]} on line(s) "
                            f"{[i for i, _ in unknown[:5]]} are not train, val or test; fix them, or leave the cell "
                            "empty to let clean choose from the image's content hash")
    return [(row["path"], row["label"], SPLIT_NAMES[row.get("split", "").lower()]) for row in rows]
