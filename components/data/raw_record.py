"""The record ingest keeps inside paths.raw (what it copied, what it could not, the splits a CSV assigned):
ingest writes it; validate and clean read it from here, so no stage imports another."""

from __future__ import annotations

from pathlib import Path

from components.core.artifacts import read_json
from components.data.images import TASKS

FINGERPRINT_FILE = ".ingest.json"


def rejected_files(raw: Path) -> dict[str, list[dict[str, str]]]:
    """Per task, the user's files ingest could not copy into `raw` ({path, label, reason}), as it recorded them."""
    record = read_json(raw / FINGERPRINT_FILE) if (raw / FINGERPRINT_FILE).is_file() else {}
    rejected = record.get("rejected") if isinstance(record, dict) else None
    return {task: list((rejected or {}).get(task, [])) for task in TASKS}


def assigned_splits(raw: Path) -> dict[str, str]:
    """{manifest path ("<task>/<label>/..."): split} for the files a CSV manifest assigned a split to."""
    record = read_json(raw / FINGERPRINT_FILE) if (raw / FINGERPRINT_FILE).is_file() else {}
    splits = record.get("splits") if isinstance(record, dict) else None
    return {f"{task}/{rel}": split for task in TASKS for rel, split in ((splits or {}).get(task) or {}).items()}
