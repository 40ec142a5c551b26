"""Stage clean: quarantine bad files and duplicates, normalize the rest, split by content hash, cap target labels."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from multiprocessing.pool import Pool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core.artifacts import atomic_dir, write_text
from components.core.config import Params
from components.core.errors import PipelineError
from components.core.reports import QuarantineReport, write_report
from components.data import raw_pack
from components.data.raw_record import assigned_splits
from components.data.dataset import HELD_BACK, SPLITS, SplitWriter
from components.data.images import MANIFEST_COLUMNS, TASKS, load_normalized, ordered_map, workers_for

log = logging.getLogger(__name__)

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


# The manifest columns clean reads. It holds a row per image for the whole stage, so only these are
# kept, and the values many rows share are one string each (measured at 40,000 images: the rows were
# the stage's growth with the data, docs/benchmarks-real.md).
USED_COLUMNS = ("task", "path", "label", "width", "height", "sha256", "error", "dhash")
_SHARED = ("task", "label", "width", "height")


def _read_manifest(params: Params) -> list[dict[str, Any]]:
    """The manifest's rows (USED_COLUMNS), each with "at": where its bytes are in paths.raw's packs
    ((pack file, offset, length); None for a file ingest could not copy)."""
    path = params.paths.manifest
    if not path.is_file():
        raise PipelineError(f"{path} not found; run `tlpipe stage validate` first")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise PipelineError(f"{path} lacks columns {sorted(missing)}; rerun `tlpipe stage validate`")
        rows = [{name: sys.intern(row[name]) if name in _SHARED else row[name] for name in USED_COLUMNS}
                for row in reader]
    for task in TASKS:
        folder = params.paths.raw / task
        names: dict[int, str] = {}  # one string per pack, shared by its rows
        packed = {f"{task}/{m.path}": (names.setdefault(m.pack, str(folder / raw_pack.pack_name(m.pack))),
                                       m.offset, m.size) for m in raw_pack.members(folder)}
        listed = {r["path"] for r in rows if r["task"] == task and r["sha256"]}  # "": ingest could not copy it
        if packed.keys() != listed:
            raise PipelineError(f"{path} does not match {folder} ({len(packed.keys() ^ listed)} files "
                                "differ); rerun `tlpipe stage validate`")
        for row in rows:
            if row["task"] == task:
                row["at"] = packed.get(row["path"])
    return rows


def _bucket(sha256: str) -> float:
    """A uniform number in [0, 1) fixed by the image's bytes: the split never depends on what else is there."""
    return int(sha256[:16], 16) / 16**16


def _hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _near_groups(rows: list[dict[str, str]], distance: int) -> list[list[dict[str, str]]]:
    """Groups of rows whose dHashes chain within `distance` bits (singletons included), in path order.

    Pigeonhole: two 64-bit hashes within `distance` bits agree exactly on at least one of
    `distance + 1` bands, so only rows sharing a band value are compared (not all pairs).
    """
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands = distance + 1
    edges = [64 * k // bands for k in range(bands + 1)]
    for band in range(bands):
        buckets: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(rows):
            bits = f"{int(row['dhash'], 16):064b}"
            buckets[bits[edges[band]:edges[band + 1]]].append(index)
        for members in buckets.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if root(a) != root(b) and _hamming(rows[a]["dhash"], rows[b]["dhash"]) <= distance:
                        parent[root(b)] = root(a)
    groups: dict[int, list[dict[str, str]]] = defaultdict(list)
    for index, row in enumerate(rows):
        groups[root(index)].append(row)
    return list(groups.values())


def _dedupe(groups: list[list[dict[str, str]]], kind: str) -> tuple[list[dict[str, str]], list[tuple[dict[str, str], str]]]:
    """One kept row per same-label group; every row of a group spanning labels is a conflict."""
    kept: list[dict[str, str]] = []
    quarantined: list[tuple[dict[str, str], str]] = []
    for copies in groups:
        labels = sorted({r["label"] for r in copies})
        if len(labels) > 1:
            # Which label is right is a question for a person; training on either would teach noise.
            quarantined += [(r, f"label conflict: same {kind} under labels {', '.join(labels)}") for r in copies]
            continue
        first = min(copies, key=lambda r: r["path"])
        kept.append(first)
        for row in copies:
            if row is not first:
                reason = (f"duplicate of {first['path']}" if kind == "image" else
                          f"near-duplicate of {first['path']} (dHash distance {_hamming(row['dhash'], first['dhash'])})")
                quarantined.append((row, reason))
    return kept, quarantined


def _quarantine(rows: list[dict[str, str]], params: Params) -> tuple[list[dict[str, str]], list[tuple[dict[str, str], str]]]:
    """Kept rows and (row, reason) for unusable files, exact and near-duplicates and label conflicts, in one task.

    Near-duplicates are resolved before splitting, so no two of them can straddle train and test.
    """
    rows = sorted(rows, key=lambda r: r["path"])
    quarantined = [(r, r["error"]) for r in rows if r["error"]]
    by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if not row["error"]:
            by_hash[row["sha256"]].append(row)
    kept, dropped = _dedupe(list(by_hash.values()), "image")
    quarantined += dropped
    distance = params.clean.near_duplicate_distance
    if distance >= 0:
        hashable, others = _by_hashability(kept, params)
        near_kept, dropped = _dedupe(_near_groups(hashable, distance), "near-duplicate image")
        kept, quarantined = others + near_kept, quarantined + dropped
    return sorted(kept, key=lambda r: r["path"]), quarantined


def _split(task: str, label: str, rows: list[dict[str, str]], params: Params,
           assigned: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """Each row's split: the one a CSV manifest assigned it, else the one its content hash falls in."""
    test, val = params.clean.test_fraction, params.clean.val_fraction
    splits: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for row in sorted(rows, key=lambda r: r["sha256"]):
        bucket = _bucket(row["sha256"])
        chosen = assigned.get(row["path"]) or ("test" if bucket < test else "val" if bucket < test + val else "train")
        splits[chosen].append(row)
    # Small classes can hash into no val or test image; borrow one so every split sees every class.
    # A split the user assigned is never overridden.
    for empty in ("test", "val", "train"):
        if splits[empty]:
            continue
        donors = [name for name in SPLITS if len(splits[name]) > 1
                  and any(r["path"] not in assigned for r in splits[name])]
        if not donors:
            raise PipelineError(f"class '{label}' of {task} has no {empty} image: the split column of your CSV manifest "
                                f"puts all its images in other splits; assign at least one to {empty}, or leave some "
                                "split cells empty for clean to choose")
        donor = max(donors, key=lambda name: (len(splits[name]), name == "train"))
        moved = next(r for r in splits[donor] if r["path"] not in assigned)  # lowest sha256: deterministic
        splits[donor].remove(moved)
        splits[empty].append(moved)
        log.info("%s class '%s' had no %s image; moved %s there from %s", task, label, empty, moved["path"], donor)
    return {name: sorted(rows, key=lambda r: r["sha256"]) for name, rows in splits.items()}


def _plan(params: Params, task: str, rows: list[dict[str, str]], assigned: dict[str, str]) -> _Task:
    kept, quarantined = _quarantine(rows, params)
    classes = sorted(set(raw_pack.classes(params.paths.raw / task)) | {r["label"] for r in rows})
    plan = _Task(classes, rows, quarantined, {name: [] for name in SPLITS}, [])
    cap = params.clean.target_train_per_class if task == "target" else None
    for label in classes:
        mine = [r for r in kept if r["label"] == label]
        if len(mine) < MIN_KEPT_PER_CLASS:
            raise PipelineError(f"class '{label}' of {task} has {len(mine)} usable image(s) after quarantine; it needs "
                                f"at least {MIN_KEPT_PER_CLASS} (one per split): add images or remove the class folder "
                                f"(see {params.paths.quarantine})")
        splits = _split(task, label, mine, params, assigned)
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
    # Leakage guard: the same content (or a near-duplicate, resolved earlier) in two splits would
    # let the test split grade memorization. Quarantine makes this 0; the count proves it.
    owner: dict[str, set[str]] = defaultdict(set)
    for name in SPLITS:
        for row in plan.splits[name]:
            owner[row["sha256"]].add(name)
    leaked = sum(len(splits) > 1 for splits in owner.values())
    if leaked:
        raise AssertionError(f"{leaked} images are in more than one split; this is a bug in components/clean.py")
    # Split shares before the label budget, so they compare with clean.val_fraction / test_fraction.
    before_cap = {"train": len(plan.splits["train"]) + len(plan.held_back),
                  "val": len(plan.splits["val"]), "test": len(plan.splits["test"])}
    shares = {name: round(n / max(1, sum(before_cap.values())), 4) for name, n in before_cap.items()}
    return {**total, "splits": {name: len(plan.splits[name]) for name in SPLITS}, "split_shares": shares,
            "leaked_across_splits": leaked, "per_class": per_class}


def _by_hashability(rows: list[dict[str, str]], params: Params) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Rows compared by dHash (near-duplicates on, image big enough), and rows compared by exact bytes only."""
    if params.clean.near_duplicate_distance < 0:
        return [], rows
    min_side = params.clean.near_duplicate_min_side
    big = [min(int(r["width"]), int(r["height"])) >= min_side for r in rows]
    return [r for r, b in zip(rows, big) if b], [r for r, b in zip(rows, big) if not b]


def _content_groups(plan: _Task, params: Params) -> list[list[dict[str, str]]]:
    """Kept rows grouped by content the way quarantine grouped them: same bytes, or dHashes within the distance."""
    near, exact = _by_hashability([r for rows in plan.splits.values() for r in rows], params)
    by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in exact:
        by_hash[row["sha256"]].append(row)
    near_groups = _near_groups(near, params.clean.near_duplicate_distance) if near else []
    return near_groups + list(by_hash.values())


def _check_splits(plans: dict[str, _Task], counts: dict[str, dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """The split suite, run by Great Expectations: no leakage and no label conflict (critical), split shares (warning)."""
    import great_expectations.expectations as gxe
    import pandas as pd

    from components.data.expectations import run_suites, summarize

    content = []
    for task, plan in plans.items():
        split_of = {r["path"]: name for name, rows in plan.splits.items() for r in rows}
        content += [{"task": task, "images": len(group), "splits": len({split_of[r["path"]] for r in group}),
                     "labels": len({r["label"] for r in group})} for group in _content_groups(plan, params)]
    fractions = {"val": params.clean.val_fraction, "test": params.clean.test_fraction}
    fractions["train"] = 1 - sum(fractions.values())
    shares = [{"task": task, "split": name, "share": share, "expected": fractions[name],
               "share_error": abs(share - fractions[name])}
              for task, count in counts.items() for name, share in count["split_shares"].items()]
    frames = {"content": pd.DataFrame(content, columns=["task", "images", "splits", "labels"]),
              "split_shares": pd.DataFrame(shares)}
    suites = {
        "content": [
            gxe.ExpectColumnValuesToBeBetween(column="splits", min_value=1, max_value=1, description=(
                "No leakage: the copies and near-copies of an image sit in one split only.")),
            gxe.ExpectColumnValuesToBeBetween(column="labels", min_value=1, max_value=1, description=(
                "No label conflict: the copies and near-copies of an image carry one label only.")),
        ],
        "split_shares": [
            gxe.ExpectColumnValuesToBeBetween(
                column="share_error", min_value=0, max_value=params.clean.split_share_tolerance, severity="warning",
                description="Each split's share of its task is within clean.split_share_tolerance of its fraction."),
        ],
    }
    entries = [summarize(name, r, "critical" if name == "content" else "warning")
               for name, suite_result in run_suites(frames, suites) for r in suite_result.results]
    for entry in entries:
        if not entry["success"] and entry["severity"] == "critical":
            raise AssertionError(f"{entry['description']} failed ({entry.get('unexpected_count')} groups); "
                                 "this is a bug in components/clean.py")
        if not entry["success"]:
            off = frames["split_shares"][frames["split_shares"]["share_error"] > params.clean.split_share_tolerance]
            log.warning("split shares off their fractions by more than clean.split_share_tolerance=%g: %s "
                        "(by chance on small data; add images or assign splits in a CSV manifest)",
                        params.clean.split_share_tolerance,
                        ", ".join(f"{r.task} {r.split} {r.share:.3f} (expected {r.expected:.3f})" for r in off.itertuples()))
    return entries


def _reason_kind(reason: str) -> str:
    """The kind of a quarantine reason: its words before the first detail ("duplicate of x.png" -> "duplicate")."""
    return re.split(r":| of | \(", reason, maxsplit=1)[0].strip()


def _summary_markdown(plans: dict[str, _Task], counts: dict[str, dict[str, Any]], checks: list[dict[str, Any]],
                      params: Params, listed: int = 200) -> str:
    """reports/quarantine.md: what a person wants first (counts, reasons, checks), then the files."""
    lines = ["# Clean: what was kept, and what was not and why", "",
             f"Every input file is kept, quarantined (with its reason) or held back by the label budget "
             f"(`clean.target_train_per_class`); the counts below reconcile. Machine-readable: `{params.paths.quarantine}`.",
             "", "| task | class | input | kept | train | val | test | quarantined | held back |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, count in counts.items():
        for label, c in count["per_class"].items():
            lines.append(f"| {task} | {label} | {c['input']} | {c['kept']} | {c['train']} | {c['val']} | {c['test']} | "
                         f"{c['quarantined']} | {c['held_back']} |")
        lines.append(f"| **{task}** | **all** | **{count['input']}** | **{count['kept']}** | {count['splits']['train']} | "
                     f"{count['splits']['val']} | {count['splits']['test']} | **{count['quarantined']}** | "
                     f"**{count['held_back']}** |")
    quarantined = [(task, row, reason) for task, plan in plans.items() for row, reason in plan.quarantined]
    kinds = Counter(_reason_kind(reason) for _, _, reason in quarantined)
    lines += ["", "## Quarantined, by reason", ""]
    lines += ["| reason | files |", "| --- | --- |", *(f"| {k} | {n} |" for k, n in kinds.most_common())] if kinds else [
        "Nothing was quarantined."]
    lines += ["", "## Split checks (Great Expectations)", "", "| check | severity | result | observed |",
              "| --- | --- | --- | --- |"]
    for entry in checks:
        observed = entry.get("unexpected_count", entry.get("observed_value", ""))
        lines.append(f"| {entry.get('description', entry['expectation'])} | {entry['severity']} | "
                     f"{'passed' if entry['success'] else 'FAILED'} | {observed} unexpected of {entry.get('element_count', '?')} |")
    if quarantined:
        lines += ["", "## Quarantined files", "", "| task | file | class | reason |", "| --- | --- | --- | --- |"]
        cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731  (a | in a file name would split the cell)
        lines += [f"| {task} | {cell(row['path'])} | {cell(row['label'])} | {cell(reason)} |"
                  for task, row, reason in quarantined[:listed]]
        if len(quarantined) > listed:
            lines.append(f"\n... and {len(quarantined) - listed} more in `{params.paths.quarantine}`.")
    return "\n".join(lines) + "\n"


# (pack file, offset, length, sha256 the manifest recorded): one image for a decode worker.
Job = tuple[str, int, int, str]


def _pixels(job: Job, size: int, pil_mode: str) -> np.ndarray | None:
    """One normalized image as uint8 (H, W, C); None if the source's bytes no longer match its hash."""
    pack, offset, length, sha256 = job
    data = raw_pack.read_at(pack, offset, length)
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    pixels = np.asarray(load_normalized(io.BytesIO(data), size, pil_mode), dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _normalized(jobs: list[Job], size: int, pil_mode: str, pool: Pool | None,
                chunk: int = 16) -> Iterator[np.ndarray | None]:
    """`_pixels` of each job, in order, decoded in `pool` (None: here) a bounded batch at a time:
    at most `chunk * 8` decoded images wait for the writer (19 MB at 224 px RGB), however many
    images there are."""
    return ordered_map(functools.partial(_pixels, size=size, pil_mode=pil_mode), jobs, pool, chunk)


def _write(params: Params, plans: dict[str, _Task], out: Path) -> None:
    """Each split as uint8 shards plus its index (components.data.dataset), streamed image by image."""
    size, mode = params.data.image_size, params.data.pil_mode
    shape = (size, size, 1 if mode == "L" else 3)
    total = sum(len(rows) for plan in plans.values() for rows in plan.splits.values())
    workers = workers_for(params.clean.workers, total)
    log.info("normalizing %d images in %d process(es) into shards", total, workers)
    # spawn, not fork: forking a process that has loaded TensorFlow or opened threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        changed = _write_splits(params, plans, out, shape, pool)
    if changed:
        raise PipelineError(f"{len(changed)} file(s) changed since the manifest was written, e.g. {changed[0]}; "
                            "rerun `tlpipe stage validate`")


def _write_splits(params: Params, plans: dict[str, _Task], out: Path, shape: tuple[int, int, int],
                  pool: Pool | None) -> list[str]:
    """Write every split; returns the sources whose bytes changed since the manifest."""
    size, mode = params.data.image_size, params.data.pil_mode
    changed: list[str] = []
    for task, plan in plans.items():
        (out / task).mkdir(parents=True)
        write_text(out / task / "classes.json", json.dumps(plan.classes) + "\n")
        # The images the label budget held back are kept too, as unlabelled data (source.mode:
        # self_supervised pretrains on them); no labelled split reads them.
        written = {**plan.splits, **({HELD_BACK: plan.held_back} if plan.held_back else {})}
        for split, rows in written.items():
            rows = sorted(rows, key=lambda r: (r["label"], r["path"]))  # by class: evenly spaced picks see every class
            jobs = [(*r["at"], r["sha256"]) for r in rows]
            with SplitWriter(out / task / split, plan.classes, shape, len(rows)) as writer:
                for row, pixels in zip(rows, _normalized(jobs, size, mode, pool)):
                    if pixels is None:
                        changed.append(row["path"])
                        pixels = np.zeros(shape, dtype=np.uint8)  # the stage fails after; keep the count whole
                    writer.add(pixels, row["label"], row["path"], row["sha256"])
    return changed


def run(params: Params) -> CleanResult:
    """Write paths.clean/<task>/<split>/ (shards and index), <task>/classes.json and paths.quarantine."""
    manifest = _read_manifest(params)
    assigned = assigned_splits(params.paths.raw)
    if assigned:
        log.info("%d image(s) keep the split their CSV manifest assigned", len(assigned))
    plans = {task: _plan(params, task, [r for r in manifest if r["task"] == task], assigned) for task in TASKS}
    counts = {task: _counts(plan) for task, plan in plans.items()}
    checks = _check_splits(plans, counts, params)
    with atomic_dir(params.paths.clean) as temp:
        _write(params, plans, temp)
    write_report(params.paths.quarantine, QuarantineReport(
        quarantined=[{"task": r["task"], "path": r["path"], "label": r["label"], "reason": reason}
                     for plan in plans.values() for r, reason in plan.quarantined],
        held_back=[{"task": r["task"], "path": r["path"], "label": r["label"]}
                   for plan in plans.values() for r in plan.held_back],
        counts=counts,
        reconciled=True,
        expectations=checks,
    ))
    write_text(params.paths.quarantine_summary, _summary_markdown(plans, counts, checks, params))
    result = CleanResult({t: c["kept"] for t, c in counts.items()}, sum(c["quarantined"] for c in counts.values()),
                         sum(c["held_back"] for c in counts.values()))
    log.info("%s -> %s (details: %s)", result, params.paths.clean, params.paths.quarantine)
    return result
