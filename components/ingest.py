"""Stage ingest: pack the source and target image folders into paths.raw, rewriting only when inputs change.

Each task becomes paths.raw/<task>/: tar packs of the files, byte for byte, and their index
(components/data/raw_pack.py says why packs, not a file per image).
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.artifacts import atomic_dir, read_json, write_json
from components.core.config import Params
from components.core.errors import PipelineError
from components.core.graph import check_outputs
from components.data.raw_record import FINGERPRINT_FILE
from components.data.csv_manifest import is_csv_manifest, read_csv_manifest
from components.data import raw_pack
from components.data.images import TASKS, class_folders, list_class_images, sha256_file

log = logging.getLogger(__name__)

# Bump when the way ingest writes data/raw changes, so existing trees are rebuilt once.
INGEST_VERSION = 3  # 3: packs and an index per task, not a file per image
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


def _stat(path: str) -> tuple[int, int]:
    """Size and mtime, of the link itself when its target is missing (a broken link must not crash ingest)."""
    try:
        info = os.stat(path)
    except OSError:
        try:
            info = os.lstat(path)
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
            listing = [(rel, label, *_stat(os.path.join(csv_path.parent, rel))) for rel, label, _ in entries]
            digest = hashlib.sha256(json.dumps([sha256_file(csv_path), listing]).encode()).hexdigest()
            plan[task] = {"csv": str(csv_path.resolve()), "files": len(entries), "listing_sha256": digest}
        elif folder:
            root = _user_dir(f"{task}_dir", folder)
            files = list_class_images(root, every_file=True)
            # Paths, sizes and mtimes: a changed, added or removed file changes the fingerprint.
            listing = [(rel, *_stat(os.path.join(root, rel))) for rel, _ in files]
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


def _content_digest(root: Path) -> str:
    """sha256 over each task's index and class list, which name every file and its content hash."""
    return hashlib.sha256("".join(raw_pack.digest(root / task) for task in TASKS).encode()).hexdigest()


def _pack_sizes(root: Path, task: str) -> list[int]:
    return [p.stat().st_size for p in sorted((root / task).glob("pack-*.tar"))]


def _same_files(old: Path, new: Path) -> bool:
    """Every file of the two trees has the same name and bytes (packs are reproducible: same images, same bytes)."""
    names = sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(old / name, new / name, shallow=False) for name in names)


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
    if not isinstance(record.get("packs"), dict):
        return False
    # A pack deleted or cut short by hand must not go unnoticed behind a matching fingerprint
    # (a changed one DVC notices, and `dvc checkout` puts back).
    return all(
        raw_pack.is_packed(raw / task) and _pack_sizes(raw, task) == record["packs"].get(task) for task in TASKS
    )


class _SameContent(Exception):
    """The rebuilt tree equals the one in place: keep that one, so DVC sees nothing new."""


def _write_digits(out: raw_pack.PackWriter, classes: list[int]) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    for index, (image, label) in sorted(enumerate(zip(pixels, digits.target)), key=lambda item: int(item[1][1])):
        if int(label) in classes:
            png = io.BytesIO()
            Image.fromarray(image, mode="L").save(png, format="PNG")
            # The index in the sklearn dataset keeps names stable across runs and versions.
            out.add(f"{int(label)}/digit_{index:05d}.png", str(int(label)), png.getvalue())


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


def _copy_tree(source: Path, out: raw_pack.PackWriter) -> list[dict[str, str]]:
    """Pack every class folder's files; return those that could not be read, each with its reason."""
    rejected: list[dict[str, str]] = []
    for label in class_folders(source):
        out.add_class(label)  # empty class folders too: validate reports them
    for rel, label in list_class_images(source, every_file=True):
        reason = _rejection(source, source / rel)
        if not reason:
            try:
                out.add(rel, label, (source / rel).read_bytes())  # every file, even bad ones: clean decides
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


def _copy_csv(csv_path: Path, out: raw_pack.PackWriter) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Pack each listed file as <label>/<its path under the CSV's folder>.

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
        out.add_class(label)
        if not reason:
            try:
                out.add(rel, label, source.read_bytes())
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
            images: dict[str, int] = {}
            classes: dict[str, int] = {}
            for task in TASKS:
                with raw_pack.PackWriter(temp / task) as out:
                    if "csv" in plan[task]:
                        log.info("%s: packing the files listed in %s", task, plan[task]["csv"])
                        rejected[task], splits[task] = _copy_csv(Path(plan[task]["csv"]), out)
                    elif "dir" in plan[task]:
                        log.info("%s: packing %s (%d files)", task, plan[task]["dir"], plan[task]["files"])
                        rejected[task] = _copy_tree(Path(plan[task]["dir"]), out)
                    else:
                        log.info("%s: writing scikit-learn digits %s", task, plan[task]["classes"])
                        _write_digits(out, plan[task]["classes"])
                images[task], classes[task] = out.count, len(out.classes)
            record = {"version": INGEST_VERSION, "images": images, "classes": classes, "rejected": rejected,
                      "splits": splits, "packs": {task: _pack_sizes(temp, task) for task in TASKS},
                      "content_sha256": _content_digest(temp)}
            write_json(temp / FINGERPRINT_FILE, record)
            if raw.is_dir() and (raw / FINGERPRINT_FILE).is_file() and read_json(raw / FINGERPRINT_FILE) == record \
                    and _same_files(raw, temp):
                raise _SameContent
        rewritten = True
    except _SameContent:
        rewritten = False
    write_json(_state_path(raw), {"fingerprint": fingerprint, "content_sha256": record["content_sha256"]})
    result = IngestResult(rewritten, images, classes)
    log.info("%s: %s%s", raw, result, "" if rewritten else " (checked file by file: the same images)")
    return result
