"""Stage clean: quarantine bad files and duplicates, normalize the rest, split by content hash, cap target labels."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, write_json, write_text
from components.config import Params
from components.errors import PipelineError
from components.images import MANIFEST_COLUMNS, TASKS, class_folders, list_class_images, load_normalized

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_KEPT_PER_CLASS = len(SPLITS)  # one image in each split


@dataclass(frozen=True)
class CleanResult:
    kept: dict[str, int]
    quarantined: int
    held_back: int

    def __str__(self) -> str:
        kept = ", ".join(f"{task} {n}" for task, n in self.kept.items())
        return f"kept {kept}; quarantined {self.quarantined}; held back by the label budget {self.held_back}"


@dataclass
class _Task:
    """What clean decided for one task; every manifest row ends up in exactly one of these lists."""
    classes: list[str]
    rows: list[dict[str, str]]
    quarantined: list[tuple[dict[str, str], str]]
    splits: dict[str, list[dict[str, str]]]
    held_back: list[dict[str, str]]


def _read_manifest(params: Params) -> list[dict[str, str]]:
    path = params.paths.manifest
    if not path.is_file():
        raise PipelineError(f"{path} not found; run `tlpipe stage validate` first")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise PipelineError(f"{path} lacks columns {sorted(missing)}; rerun `tlpipe stage validate`")
        rows = list(reader)
    for task in TASKS:
        on_disk = {f"{task}/{rel}" for rel, _ in list_class_images(params.paths.raw / task, every_file=True)}
        listed = {r["path"] for r in rows if r["task"] == task}
        if on_disk != listed:
            raise PipelineError(f"{path} does not match {params.paths.raw / task} ({len(on_disk ^ listed)} files "
                                "differ); rerun `tlpipe stage validate`")
    return rows


def _bucket(sha256: str) -> float:
    """A uniform number in [0, 1) fixed by the image's bytes: the split never depends on what else is there."""
    return int(sha256[:16], 16) / 16**16


def _quarantine(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[tuple[dict[str, str], str]]]:
    """Kept rows and (row, reason) for undecodable files and exact duplicates, within one task."""
    quarantined: list[tuple[dict[str, str], str]] = []
    by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["path"]):
        if row["decodable"] != "True":
            quarantined.append((row, f"undecodable: {row['error'] or 'unknown error'}"))
        else:
            by_hash[row["sha256"]].append(row)
    kept = []
    for copies in by_hash.values():
        labels = sorted({r["label"] for r in copies})
        if len(labels) > 1:
            # Which label is right is a question for a person; training on either would teach noise.
            quarantined += [(r, f"label conflict: same image under labels {', '.join(labels)}") for r in copies]
        else:
            kept.append(copies[0])
            quarantined += [(r, f"duplicate of {copies[0]['path']}") for r in copies[1:]]
    return kept, quarantined


def _split(task: str, label: str, rows: list[dict[str, str]], params: Params) -> dict[str, list[dict[str, str]]]:
    test, val = params.clean.test_fraction, params.clean.val_fraction
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for row in sorted(rows, key=lambda r: r["sha256"]):
        bucket = _bucket(row["sha256"])
        splits["test" if bucket < test else "val" if bucket < test + val else "train"].append(row)
    # Small classes can hash into no val or test image; borrow one so every split sees every class.
    for empty in ("test", "val", "train"):
        if not splits[empty]:
            donor = max(SPLITS, key=lambda name: (len(splits[name]), name == "train"))
            moved = splits[donor].pop(0)  # lowest sha256: deterministic
            splits[empty].append(moved)
            log.info("%s class '%s' had no %s image; moved %s there from %s", task, label, empty, moved["path"], donor)
    return {name: sorted(rows, key=lambda r: r["sha256"]) for name, rows in splits.items()}


def _plan(params: Params, task: str, rows: list[dict[str, str]]) -> _Task:
    kept, quarantined = _quarantine(rows)
    classes = sorted(set(class_folders(params.paths.raw / task)) | {r["label"] for r in rows})
    plan = _Task(classes, rows, quarantined, {name: [] for name in SPLITS}, [])
    cap = params.clean.target_train_per_class if task == "target" else None
    for label in classes:
        mine = [r for r in kept if r["label"] == label]
        if len(mine) < MIN_KEPT_PER_CLASS:
            raise PipelineError(f"class '{label}' of {task} has {len(mine)} usable image(s) after quarantine; it needs "
                                f"at least {MIN_KEPT_PER_CLASS} (one per split): add images or remove the class folder "
                                f"(see {params.paths.quarantine})")
        splits = _split(task, label, mine, params)
        if cap is not None:
            # The label budget: a fixed, content-chosen subset; the rest stays labelled but unused.
            plan.held_back += splits["train"][cap:]
            splits["train"] = splits["train"][:cap]
        for name in SPLITS:
            plan.splits[name] += splits[name]
    return plan


def _counts(plan: _Task) -> dict[str, Any]:
    """Per-class and total counts, after checking that every input file is accounted for exactly once."""
    per_class: dict[str, dict[str, int]] = {}
    for label in plan.classes:
        def n(rows: list[dict[str, str]]) -> int:
            return sum(r["label"] == label for r in rows)
        splits = {name: n(plan.splits[name]) for name in SPLITS}
        quarantined = n([r for r, _ in plan.quarantined])
        per_class[label] = {"input": n(plan.rows), "kept": sum(splits.values()), "quarantined": quarantined,
                            "held_back": n(plan.held_back), **splits}
    kept = [r for rows in plan.splits.values() for r in rows]
    accounted = [r["path"] for r in [*(r for r, _ in plan.quarantined), *plan.held_back, *kept]]
    if sorted(accounted) != sorted(r["path"] for r in plan.rows) or any(
        c["input"] != c["kept"] + c["quarantined"] + c["held_back"] for c in per_class.values()
    ):
        raise AssertionError("clean lost or double-counted files; this is a bug in components/clean.py")
    total = {key: sum(c[key] for c in per_class.values()) for key in ("input", "kept", "quarantined", "held_back")}
    return {**total, "splits": {name: len(plan.splits[name]) for name in SPLITS}, "per_class": per_class}


def _output_names(rows: list[dict[str, str]]) -> dict[str, str]:
    """A PNG file name per kept file, unique within its class even when only the suffix or subfolder differs."""
    def within_class(row: dict[str, str]) -> Path:
        return Path(row["path"]).relative_to(f"{row['task']}/{row['label']}")

    names = {r["path"]: within_class(r).with_suffix("").as_posix().replace("/", "__") for r in rows}
    taken: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        taken[(row["label"], names[row["path"]])] += 1
    for row in rows:
        if taken[(row["label"], names[row["path"]])] > 1:
            names[row["path"]] = within_class(row).as_posix().replace("/", "__").replace(".", "_")
    return {path: f"{name}.png" for path, name in names.items()}


def _write(params: Params, plans: dict[str, _Task], out: Path) -> None:
    size, mode = params.data.image_size, params.data.pil_mode
    for task, plan in plans.items():
        (out / task).mkdir(parents=True)
        write_text(out / task / "classes.json", json.dumps(plan.classes) + "\n")
        names = _output_names([r for rows in plan.splits.values() for r in rows])
        for split, rows in plan.splits.items():
            for row in rows:
                data = (params.paths.raw / row["path"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != row["sha256"]:
                    raise PipelineError(f"{row['path']} changed since the manifest was written; "
                                        "rerun `tlpipe stage validate`")
                dest = out / task / split / row["label"] / names[row["path"]]
                dest.parent.mkdir(parents=True, exist_ok=True)
                load_normalized(io.BytesIO(data), size, mode).save(dest)


def run(params: Params) -> CleanResult:
    """Write paths.clean/<task>/<split>/<class>/*.png, <task>/classes.json and paths.quarantine."""
    manifest = _read_manifest(params)
    plans = {task: _plan(params, task, [r for r in manifest if r["task"] == task]) for task in TASKS}
    counts = {task: _counts(plan) for task, plan in plans.items()}
    with atomic_dir(params.paths.clean) as temp:
        _write(params, plans, temp)
    write_json(params.paths.quarantine, {
        "quarantined": [{"task": r["task"], "path": r["path"], "label": r["label"], "reason": reason}
                        for plan in plans.values() for r, reason in plan.quarantined],
        "held_back": [{"task": r["task"], "path": r["path"], "label": r["label"]}
                      for plan in plans.values() for r in plan.held_back],
        "counts": counts,
        "reconciled": True,
    })
    result = CleanResult({t: c["kept"] for t, c in counts.items()}, sum(c["quarantined"] for c in counts.values()),
                         sum(c["held_back"] for c in counts.values()))
    log.info("%s -> %s (details: %s)", result, params.paths.clean, params.paths.quarantine)
    return result
