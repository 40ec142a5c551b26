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

from components.core.artifacts import atomic_dir, read_json, write_json
from components.core.config import Params
from components.core.errors import PipelineError
from components.core.graph import check_outputs
from components.data.raw_record import FINGERPRINT_FILE
from components.data.csv_manifest import is_csv_manifest, read_csv_manifest
from components.data.images import TASKS, class_folders, list_class_images, sha256_file

log = logging.getLogger(__name__)

# Bump when the way ingest writes data/raw changes, so existing trees are rebuilt once.
INGEST_VERSION = 2
# Inside paths.raw, versioned with it: what ingest wrote (counts, rejected files, CSV splits, a
# content digest), never where from or when, so the same images give the same DVC hash anywhere.
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
            listing = [(rel, label, *_stat(csv_path.parent / rel)) for rel, label, _ in entries]
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


def _state_path(raw: Path) -> Path:
    """Beside paths.raw, not in it: this machine's fingerprint of the inputs (absolute paths, mtimes).

    Kept out of the DVC-tracked folder on purpose: after `dvc pull`, a fresh clone or a `touch`,
    the fingerprint differs while the images do not, and data/raw must keep its hash then.
    """
    return raw.parent / f".ingest-state-{raw.name}.json"


def _tree_digest(root: Path) -> str:
    """sha256 over every folder and file below `root` (path and bytes), the record file excepted."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == FINGERPRINT_FILE:
            continue
        digest.update(f"{rel}\0{'d' if path.is_dir() else sha256_file(path)}\0".encode())
    return digest.hexdigest()


def _unchanged(raw: Path, fingerprint: str) -> bool:
    """The inputs' fingerprint matches the one recorded here, for the very tree now in `raw`."""
    try:
        state, record = read_json(_state_path(raw)), read_json(raw / FINGERPRINT_FILE)
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or not isinstance(record, dict) or state.get("fingerprint") != fingerprint:
        return False
    # `dvc checkout` of another version swaps data/raw under an unchanged fingerprint: the digest notices.
    if record.get("version") != INGEST_VERSION or state.get("content_sha256") != record.get("content_sha256"):
        return False
    if not isinstance(record.get("images"), dict):
        return False
    # A file deleted from data/raw by hand must not go unnoticed behind a matching fingerprint.
    return all(
        (raw / task).is_dir() and len(list_class_images(raw / task, every_file=True)) == record["images"].get(task)
        for task in TASKS
    )


class _SameContent(Exception):
    """The rebuilt tree equals the one in place: keep that one, so DVC sees nothing new."""


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
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            return "unreadable: folder cannot be listed (permission denied); its files were not copied"
        return "unreadable: folder cannot be listed; its files were not copied"
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


def _copy_csv(csv_path: Path, out: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Copy each listed file to out/<label>/<its path under the CSV's folder>.

    Returns the rejected rows and, for copied rows whose split column is filled in, {path: split}.
    """
    root = csv_path.parent
    rejected: list[dict[str, str]] = []
    splits: dict[str, str] = {}
    seen: set[str] = set()
    for listed, label, split in read_csv_manifest(csv_path):
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
        elif split:
            splits[rel] = split
    return rejected, splits


def run(params: Params) -> IngestResult:
    """Write paths.raw/{source,target}/<class>/* from the user's folders or the embedded digits."""
    raw = params.paths.raw
    check_outputs(params)  # first in the graph: before `dvc repro` deletes any later stage's outputs
    plan = _plan(params)
    fingerprint = _fingerprint(plan)
    if _unchanged(raw, fingerprint):
        log.info("inputs unchanged, nothing rewritten (%s)", raw)
        record = read_json(raw / FINGERPRINT_FILE)
        return IngestResult(False, record["images"], record["classes"])

    try:
        with atomic_dir(raw) as temp:
            rejected: dict[str, list[dict[str, str]]] = {task: [] for task in TASKS}
            splits: dict[str, dict[str, str]] = {task: {} for task in TASKS}
            for task in TASKS:
                if "csv" in plan[task]:
                    log.info("%s: copying the files listed in %s", task, plan[task]["csv"])
                    rejected[task], splits[task] = _copy_csv(Path(plan[task]["csv"]), temp / task)
                elif "dir" in plan[task]:
                    log.info("%s: copying %s", task, plan[task]["dir"])
                    rejected[task] = _copy_tree(Path(plan[task]["dir"]), temp / task)
                else:
                    log.info("%s: writing scikit-learn digits %s", task, plan[task]["classes"])
                    _write_digits(temp / task, plan[task]["classes"])
            images = {task: len(list_class_images(temp / task, every_file=True)) for task in TASKS}
            classes = {task: len(class_folders(temp / task)) for task in TASKS}
            record = {"version": INGEST_VERSION, "images": images, "classes": classes, "rejected": rejected,
                      "splits": splits, "content_sha256": _tree_digest(temp)}
            write_json(temp / FINGERPRINT_FILE, record)
            if raw.is_dir() and (raw / FINGERPRINT_FILE).is_file() and read_json(raw / FINGERPRINT_FILE) == record \
                    and _tree_digest(raw) == record["content_sha256"]:
                raise _SameContent
        rewritten = True
    except _SameContent:
        rewritten = False
    write_json(_state_path(raw), {"fingerprint": fingerprint, "content_sha256": record["content_sha256"]})
    result = IngestResult(rewritten, images, classes)
    log.info("%s: %s%s", raw, result, "" if rewritten else " (checked file by file: the same images)")
    return result
