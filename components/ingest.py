"""Stage ingest: put the source and target image folders under paths.raw, rewriting only when inputs change."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, read_json, write_json
from components.config import Params
from components.errors import PipelineError
from components.csv_manifest import is_csv_manifest, read_csv_manifest
from components.images import TASKS, class_folders, list_class_images, sha256_file

log = logging.getLogger(__name__)

# Bump when the way ingest writes data/raw changes, so existing trees are rebuilt once.
INGEST_VERSION = 1
FINGERPRINT_FILE = ".ingest.json"
DIGIT_CLASSES = range(10)


@dataclass(frozen=True)
class IngestResult:
    rewritten: bool
    images: dict[str, int]
    classes: dict[str, int]

    def __str__(self) -> str:
        tasks = ", ".join(f"{task}: {self.images[task]} files in {self.classes[task]} classes" for task in self.images)
        return f"{tasks}; {'rewritten' if self.rewritten else 'inputs unchanged, nothing rewritten'}"


def _user_dir(setting: str, value: str) -> Path:
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"data.{setting} '{value}' does not exist or is not a folder; fix the path in "
                            "params.yaml, or leave it empty to use the embedded digits")
    if not class_folders(folder):
        raise PipelineError(f"data.{setting} '{value}' has no class subfolders; put each class's images in its own "
                            f"subfolder (e.g. {value}/cat/1.png)")
    return folder


def _digit_classes(setting: str, classes: tuple[int, ...]) -> list[int]:
    if not classes:
        raise PipelineError(f"data.{setting} is empty; list the digits (0-9) for this task")
    bad = [c for c in classes if c not in DIGIT_CLASSES]
    if bad:
        raise PipelineError(f"data.{setting} has {bad}; the embedded digits are 0 to 9")
    return sorted(set(classes))


def _stat(path: Path) -> tuple[int, int]:
    """Size and mtime, of the link itself when its target is missing (a broken link must not crash ingest)."""
    try:
        info = path.stat()
    except OSError:
        try:
            info = path.lstat()
        except OSError:
            return -1, -1  # a CSV manifest row naming a missing file: ingest records it
    return info.st_size, info.st_mtime_ns


def _plan(params: Params) -> dict[str, dict[str, Any]]:
    """Per task, where its images come from, described cheaply enough to fingerprint on every run."""
    data = params.data
    plan: dict[str, dict[str, Any]] = {}
    for task, folder, digits in (
        ("source", data.source_dir, data.embedded_source_classes),
        ("target", data.target_dir, data.embedded_target_classes),
    ):
        if folder and is_csv_manifest(folder):
            csv_path = Path(folder).expanduser()
            entries = read_csv_manifest(csv_path)
            listing = [(rel, label, *_stat(csv_path.parent / rel)) for rel, label in entries]
            digest = hashlib.sha256(json.dumps([sha256_file(csv_path), listing]).encode()).hexdigest()
            plan[task] = {"csv": str(csv_path.resolve()), "files": len(entries), "listing_sha256": digest}
        elif folder:
            root = _user_dir(f"{task}_dir", folder)
            files = list_class_images(root, every_file=True)
            # Paths, sizes and mtimes: a changed, added or removed file changes the fingerprint.
            listing = [(rel, *_stat(root / rel)) for rel, _ in files]
            digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
            plan[task] = {"dir": str(root.resolve()), "files": len(files), "listing_sha256": digest}
        else:
            plan[task] = {"embedded": "sklearn-digits", "classes": _digit_classes(f"embedded_{task}_classes", digits)}
    return plan


def _fingerprint(plan: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps({"version": INGEST_VERSION, "plan": plan}, sort_keys=True).encode()).hexdigest()


def _unchanged(raw: Path, fingerprint: str) -> bool:
    """The recorded fingerprint matches and the files it recorded are all still there."""
    record_path = raw / FINGERPRINT_FILE
    if not record_path.is_file():
        return False
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return False
    if not isinstance(record.get("images"), dict):
        return False
    # A file deleted from data/raw by hand must not go unnoticed behind a matching fingerprint.
    return all(
        (raw / task).is_dir() and len(list_class_images(raw / task, every_file=True)) == record["images"].get(task)
        for task in TASKS
    )


def _write_digits(out: Path, classes: list[int]) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    for label in classes:
        (out / str(label)).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        if int(label) in classes:
            # The index in the sklearn dataset keeps names stable across runs and versions.
            Image.fromarray(image, mode="L").save(out / str(int(label)) / f"digit_{index:05d}.png")


def _rejection(source: Path, path: Path) -> str:
    """Why `path` (under the user's folder `source`) cannot be copied, or "" when it can."""
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(Path(os.path.realpath(source))):
            return f"symlink escapes the data root (points outside {source.name}/)"
        if not target.exists():
            return "unreadable: broken symlink"
        if target.is_dir():
            return "symlink to a folder: not followed; copy the folder or link its files"
    if not path.is_file():
        return "unreadable: not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return "unreadable: permission denied"
    return ""


def _copy_tree(source: Path, out: Path) -> list[dict[str, str]]:
    """Copy every class folder; return the files that could not be copied, each with its reason."""
    rejected: list[dict[str, str]] = []
    for label in class_folders(source):
        (out / label).mkdir(parents=True)  # empty class folders too: validate reports them
    for rel, label in list_class_images(source, every_file=True):
        reason = _rejection(source, source / rel)
        if not reason:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source / rel, out / rel)  # every file, even bad ones: clean decides
            except OSError as error:
                reason = f"unreadable: {error.strerror or error}"
        if reason:
            rejected.append({"path": rel, "label": label, "reason": reason})
            log.warning("%s: not copied: %s", source / rel, reason)
    strays = sorted(p.name for p in source.iterdir() if p.is_file())
    if strays:
        log.warning("%s: %d file(s) outside class folders not copied (they have no class): %s",
                    source, len(strays), ", ".join(strays[:5]) + (" ..." if len(strays) > 5 else ""))
    return rejected


def _copy_csv(csv_path: Path, out: Path) -> list[dict[str, str]]:
    """Copy each listed file to out/<label>/<its path under the CSV's folder>; return the rejected rows."""
    root = csv_path.parent
    rejected: list[dict[str, str]] = []
    seen: set[str] = set()
    for listed, label in read_csv_manifest(csv_path):
        source = Path(os.path.normpath(root / listed))
        inside = source.is_relative_to(root) and Path(os.path.realpath(source)).is_relative_to(os.path.realpath(root))
        rel = f"{label}/{source.relative_to(root).as_posix() if source.is_relative_to(root) else source.name}"
        if not inside:
            reason = f"manifest path escapes the data root (the folder of {csv_path.name})"
        elif rel in seen:
            reason = "listed twice in the CSV manifest under the same label"
        elif not source.exists() and not source.is_symlink():
            reason = "unreadable: listed in the CSV manifest but not found"
        else:
            reason = _rejection(root, source)
        seen.add(rel)
        (out / label).mkdir(parents=True, exist_ok=True)
        if not reason:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, out / rel)
            except OSError as error:
                reason = f"unreadable: {error.strerror or error}"
        if reason:
            rejected.append({"path": rel, "label": label, "reason": reason})
            log.warning("%s: row %s not copied: %s", csv_path, listed, reason)
    return rejected


def rejected_files(raw: Path) -> dict[str, list[dict[str, str]]]:
    """Per task, the user's files ingest could not copy into `raw` ({path, label, reason}), as it recorded them."""
    record = read_json(raw / FINGERPRINT_FILE) if (raw / FINGERPRINT_FILE).is_file() else {}
    rejected = record.get("rejected") if isinstance(record, dict) else None
    return {task: list((rejected or {}).get(task, [])) for task in TASKS}


def run(params: Params) -> IngestResult:
    """Write paths.raw/{source,target}/<class>/* from the user's folders or the embedded digits."""
    raw = params.paths.raw
    plan = _plan(params)
    fingerprint = _fingerprint(plan)
    if _unchanged(raw, fingerprint):
        log.info("inputs unchanged, nothing rewritten (%s)", raw)
        record = read_json(raw / FINGERPRINT_FILE)
        return IngestResult(False, record["images"], record["classes"])

    with atomic_dir(raw) as temp:
        rejected: dict[str, list[dict[str, str]]] = {task: [] for task in TASKS}
        for task in TASKS:
            if "csv" in plan[task]:
                log.info("%s: copying the files listed in %s", task, plan[task]["csv"])
                rejected[task] = _copy_csv(Path(plan[task]["csv"]), temp / task)
            elif "dir" in plan[task]:
                log.info("%s: copying %s", task, plan[task]["dir"])
                rejected[task] = _copy_tree(Path(plan[task]["dir"]), temp / task)
            else:
                log.info("%s: writing scikit-learn digits %s", task, plan[task]["classes"])
                _write_digits(temp / task, plan[task]["classes"])
        images = {task: len(list_class_images(temp / task, every_file=True)) for task in TASKS}
        classes = {task: len(class_folders(temp / task)) for task in TASKS}
        record = {"fingerprint": fingerprint, "plan": plan, "images": images, "classes": classes,
                  "rejected": rejected}
        write_json(temp / FINGERPRINT_FILE, record)
    result = IngestResult(True, images, classes)
    log.info("wrote %s: %s", raw, result)
    return result
