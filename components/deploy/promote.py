"""Champion and challenger: score both ONNX models on the current test split, gate, and promote atomically.

    <releases>/<version>/   model.onnx, labels.txt, MODEL_CARD.md, lineage.json   (complete, fsynced)
    <production> -> releases/<version>                                            (a symlink)

A release folder is written under a temporary name, fsynced and renamed into place; production then
moves to it by renaming a new symlink over the old one (os.replace, atomic on POSIX). So production
always names one complete release, whatever kills the process, and a rejected challenger touches
nothing in production or releases. Rollback: point the link at an earlier release. Every decision,
with its gates and reasons, goes to paths.promotion_report (JSON) and paths.promotion_summary (markdown).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from components.core.artifacts import sweep_temporaries, temp_dir, write_json, write_text
from components.core.config import Params
from components.data.dataset import PREDICT_BATCH, Split, load_split
from components.core.errors import PipelineError
from components.core.metrics import compute_metrics
from components.data.images import sha256_file
from components.deploy.predict import OnnxModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
LINEAGE_FILE = "lineage.json"
CARD_FILE = "MODEL_CARD.md"
_VERSION = re.compile(r"^v(\d+)$")
EXPORT_STAGE = "export"  # the dvc.yaml stage that writes the challenger, paths.onnx_model


@dataclass(frozen=True)
class PromotionResult:
    decision: str  # promoted | rejected | kept
    version: str | None  # the production version after this decision (None: still no champion)
    reasons: tuple[str, ...]

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    def __str__(self) -> str:
        where = f"production is {self.version}" if self.version else "no champion yet"
        return f"challenger {self.decision} ({where}): {'; '.join(self.reasons)}"


def score(model_path: Path, test: Split) -> dict[str, Any]:
    """The model's metrics on the split through onnxruntime (what serving runs), plus its sha256 and labels."""
    model = OnnxModel(model_path)
    probabilities = np.concatenate([model.session.run(None, {model.input_name: x})[0] for x, _ in test.batches(PREDICT_BATCH)])
    metrics = compute_metrics(test.y, probabilities.argmax(axis=1), test.classes)
    return {
        "path": str(model_path),
        "sha256": sha256_file(model_path),
        "labels": model.labels,
        "metrics": metrics,
    }


def current_champion(params: Params) -> tuple[str, Path] | None:
    """(version, release folder) production points at, or None before the first promotion."""
    production = params.paths.production
    if not production.is_symlink():
        if production.exists():
            raise PipelineError(
                f"{production} is a real folder, not the link tlpipe manages: move it to "
                f"{params.paths.releases}/<name> and link it (ln -sfn releases/<name> {production}), or remove it"
            )
        return None
    release = production.resolve()
    if not (release / MODEL_FILE).is_file():
        raise PipelineError(
            f"{production} points at {release}, which holds no {MODEL_FILE}: relink it to a release in "
            f"{params.paths.releases} (ln -sfn releases/<version> {production})"
        )
    return release.name, release


def gates(challenger: dict[str, Any], champion: dict[str, Any] | None, params: Params) -> list[dict[str, Any]]:
    """Absolute thresholds (evaluate's), then the largest allowed regression against a comparable champion."""
    metrics = challenger["metrics"]
    result = [
        {"name": f"min_{name}", "value": metrics[name], "threshold": threshold, "passed": metrics[name] >= threshold}
        for name, threshold in (("accuracy", params.evaluate.min_accuracy), ("macro_f1", params.evaluate.min_macro_f1))
    ]
    if champion is not None:
        for name in ("accuracy", "macro_f1"):
            drop = round(champion["metrics"][name] - metrics[name], 6)
            limit = params.promote.max_regression
            result.append({"name": f"max_{name}_regression", "value": drop, "threshold": limit, "passed": drop <= limit})
    return result


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_release(releases: Path, version: str, files: dict[str, bytes]) -> Path:
    """The complete release folder under a temporary name, fsynced, then renamed to releases/<version>."""
    final = releases / version
    if final.exists():
        raise PipelineError(f"{final} already exists: releases are never overwritten; remove it if it is a leftover")
    releases.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(releases)  # a killed promotion's half-written release, whatever its version
    temp = temp_dir(final)
    try:
        for name, data in files.items():
            with open(temp / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(temp, 0o755)
        _fsync(temp)
        os.rename(temp, final)
        _fsync(releases)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def _point_production(production: Path, release: Path) -> None:
    """Swap the production link to `release` in one rename: readers see the old or the new, never neither."""
    production.parent.mkdir(parents=True, exist_ok=True)
    link = production.parent / f".{production.name}.{uuid.uuid4().hex}.tmp"
    os.symlink(os.path.relpath(release, production.parent), link)
    try:
        os.replace(link, production)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    _fsync(production.parent)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(root: Path) -> dict[str, Any]:
    """The git commit the code came from and whether the tree held uncommitted changes (None outside git)."""
    commit = _git(["rev-parse", "HEAD"], root)
    if commit is None:
        return {"commit": None, "dirty": None, "note": f"{root} is not in a git repository (or git is missing)"}
    return {"commit": commit, "dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"], root))}


def dvc_hashes(params: Params) -> dict[str, Any]:
    """md5 of every output dvc.lock records (data, models), as DVC pins them; empty before the first `dvc repro`."""
    lock = params.paths.dvc_lock
    if not lock.is_file():
        return {"lock": None, "note": f"{lock} not found: the pipeline did not run under dvc repro", "outs": {}}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    outs = {out["path"]: out.get("md5") for stage in stages.values() for out in stage.get("outs") or [] if "path" in out}
    data_roots = [os.path.relpath(p, lock.parent) for p in (params.paths.raw, params.paths.clean, params.paths.manifest)]
    data = {path: md5 for path, md5 in outs.items() if any(path == r or path.startswith(r + "/") for r in data_roots)}
    return {"lock": str(lock), "data": data, "outs": outs}


def _next_version(params: Params, root: Path) -> str:
    releases = params.paths.releases
    taken = [int(m.group(1)) for p in (releases.iterdir() if releases.is_dir() else []) if (m := _VERSION.match(p.name))]
    prefix = params.promote.tag_prefix
    if prefix:  # a tag left by a release deleted since must not be reused for another model
        tags = _git(["tag", "--list", f"{prefix}*"], root) or ""
        taken += [int(t[len(prefix):]) for t in tags.split() if t[len(prefix):].isdigit()]
    return f"v{max(taken, default=0) + 1}"


def _ensure_tag(root: Path, lineage: dict[str, Any]) -> tuple[str | None, bool]:
    """The git tag the release's lineage names, on the commit it names: (tag or None, whether created now).

    Idempotent, so a rerun completes a promotion killed between the production link and the tag.
    """
    name, commit = lineage.get("tag"), (lineage.get("code") or {}).get("commit")
    if not name or not commit:
        return None, False
    existing = _git(["rev-parse", "--verify", "--quiet", f"refs/tags/{name}^{{commit}}"], root)
    if existing == commit:
        return name, False
    if existing is not None:
        log.warning("git tag %s names commit %s, not the release's %s: left as it is", name, existing, commit)
        return None, False
    if _git(["tag", name, commit], root) is None:
        log.warning("could not create git tag %s on %s; the release is recorded in lineage.json", name, commit)
        return None, False
    return name, True


def _lineage(release: Path) -> dict[str, Any]:
    path = release / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _release_holding(releases: Path, sha256: str) -> Path | None:
    """A complete release that already holds this exact model (one an interrupted promotion wrote), if any."""
    found = [
        p for p in (releases.iterdir() if releases.is_dir() else [])
        if _VERSION.match(p.name) and (p / MODEL_FILE).is_file() and sha256_file(p / MODEL_FILE) == sha256
    ]
    return max(found, key=lambda p: int(p.name[1:]), default=None)


def _gate_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| gate | value | threshold | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['name']} | {g['value']} | {g['threshold']} | {'pass' if g['passed'] else 'FAIL'} |" for g in rows]
    return lines


def summary_markdown(report: dict[str, Any]) -> str:
    """The decision for people: verdict, reasons, gates, both models' metrics."""
    champion = report.get("champion")
    lines = [
        f"# Promotion: challenger {report['decision']}",
        "",
        f"- Production: {report.get('version') or 'no champion yet'}"
        + (f" (git tag `{report['tag']}`)" if report.get("tag") else ""),
        f"- Champion before: {report.get('champion_version') or 'none (first promotion: absolute gates only)'}",
        *(f"- {reason}" for reason in report["reasons"]),
        "",
        *_gate_table(report["gates"]),
        "",
        "| model | sha256 | accuracy | macro F1 |",
        "| --- | --- | --- | --- |",
    ]
    for name, side in (("challenger", report["challenger"]), ("champion", champion)):
        if side:
            m = side["metrics"]
            lines.append(f"| {name} | `{side['sha256'][:12]}` | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
    return "\n".join(lines) + "\n"


def _model_card(params: Params, lineage: dict[str, Any]) -> str:
    """The export bundle's card for this exact model (when the bundle holds it), then the lineage."""
    card = "# Model card: tlpipe image classifier\n"
    bundle = params.paths.bundle
    if (bundle / MODEL_FILE).is_file() and sha256_file(bundle / MODEL_FILE) == lineage["onnx_sha256"]:
        card = (bundle / CARD_FILE).read_text()
    code = lineage["code"]
    data = lineage["dvc"].get("data") or {}
    metrics = lineage["metrics"]
    champion = metrics.get("champion")
    lines = [
        card.rstrip(),
        "",
        f"## Lineage: release {lineage['version']}",
        "",
        f"- Promoted {lineage['time']}; ONNX sha256 `{lineage['onnx_sha256']}`",
        f"- Code: commit `{code['commit']}`" + (" with uncommitted changes" if code.get("dirty") else "")
        if code.get("commit") else f"- Code: {code.get('note')}",
        f"- Git tag: `{lineage['tag']}`" if lineage.get("tag") else "- Git tag: none",
        f"- Replaced: {lineage['replaced'] or 'nothing (first champion: absolute gates only)'}",
        "- Data (md5 as dvc.lock pins them):" if data else f"- Data: {lineage['dvc'].get('note', 'no data outputs in dvc.lock')}",
        *(f"  - `{path}`: `{md5}`" for path, md5 in data.items()),
        f"- Test split: {metrics['challenger']['test_images']} images; accuracy "
        f"{metrics['challenger']['accuracy']:.4f}, macro F1 {metrics['challenger']['macro_f1']:.4f}"
        + (f" (champion it replaced: {champion['accuracy']:.4f}, {champion['macro_f1']:.4f})" if champion else ""),
        "",
        "### Promotion gates",
        "",
        *_gate_table(lineage["gates"]),
        "",
        f"Params, every DVC output hash and per-class metrics: `{LINEAGE_FILE}`.",
    ]
    return "\n".join(lines) + "\n"


def _reasons(rows: list[dict[str, Any]], champion_version: str | None, comparable: bool) -> list[str]:
    failed = [g for g in rows if not g["passed"]]
    reasons = []
    if champion_version is None:
        reasons.append("no champion yet: absolute gates only")
    elif not comparable:
        reasons.append(f"champion {champion_version} predicts other classes than the current test split: absolute gates only")
    for g in failed:
        relation = "above" if g["name"].endswith("_regression") else "below"
        reasons.append(f"{g['name']}: {g['value']} {relation} the threshold {g['threshold']}")
    if not failed:
        reasons.append("every gate passed")
    return reasons


def _changes(changes: list[Any]) -> str:
    """DVC's status entries for one stage, in words: `changed deps: components/x.py`, `changed outs: ...`."""
    words = []
    for change in changes:
        if isinstance(change, dict):
            for kind, detail in change.items():
                items = detail.items() if isinstance(detail, dict) else [(detail, None)]
                # A changed params file comes with the keys that changed.
                named = [f"{path} ({', '.join(sorted(inner))})" if isinstance(inner, dict) else str(path) for path, inner in items]
                words.append(f"{kind}: {', '.join(sorted(named))}")
        else:
            words.append(str(change))
    return "; ".join(words)


def stale_stages(root: Path, stage: str | None = EXPORT_STAGE) -> dict[str, str]:
    """The stages up to `stage` (None: the whole graph) whose deps, params, code or outputs differ from
    dvc.lock, as DVC sees them (its repo API, what `dvc status --json` prints), in words; {} outside a
    DVC repository."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return {}
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            targets = [f"{root / 'dvc.yaml'}:{stage}"] if stage else [str(root / "dvc.yaml")]
            status = repo.status(targets=targets, with_deps=True)
    except DvcException as error:
        raise PipelineError(f"dvc status of {root} failed: {error}; fix the repository (dvc doctor), then rerun") from error
    # An always_changed stage (ingest) is always listed; it is out of date only with other changes.
    return {name.split(":")[-1]: _changes(changes) for name, changes in status.items() if changes != ["always changed"]}


def run(params: Params) -> PromotionResult:
    """Score challenger and champion on the same test split, decide, promote atomically, report.

    Rerunnable: whatever step a killed run stopped after, a rerun completes it (the release
    already written is moved to instead of writing another, and a missing tag is created).
    """
    paths = params.paths
    root = paths.dvc_lock.parent
    if not paths.onnx_model.is_file():
        raise PipelineError(f"{paths.onnx_model} not found: run the pipeline first (dvc repro) to export a challenger")
    stale = stale_stages(root)
    if stale:
        raise PipelineError(
            f"{paths.onnx_model} is not what the current graph produces: DVC reports "
            + "; ".join(f"stage {name} out of date ({why})" for name, why in stale.items())
            + ". The last dvc repro failed or has not run since a change: run dvc repro (or dvc commit, "
            "if you ran the stages another way), then tlpipe promote"
        )
    test = load_split(paths.clean, "target", "test")
    challenger = score(paths.onnx_model, test)
    if tuple(challenger["labels"]) != test.classes:
        raise PipelineError(
            f"{paths.onnx_model} predicts {challenger['labels']} but the test split holds {list(test.classes)}: "
            "the export is stale; rerun the pipeline (dvc repro)"
        )
    found = current_champion(params)
    champion_version, champion = (found[0], score(found[1] / MODEL_FILE, test)) if found else (None, None)
    comparable = champion is not None and tuple(champion["labels"]) == test.classes
    rows = gates(challenger, champion if comparable else None, params)
    reasons = _reasons(rows, champion_version, comparable)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report: dict[str, Any] = {
        "time": now, "champion_version": champion_version, "first_champion": champion_version is None,
        "gates": rows, "challenger": challenger, "champion": champion, "production": str(paths.production),
        "tag": None,
    }
    completed: list[str] = []
    if found is not None:  # a run killed after moving production but before tagging left the tag out
        report["tag"], created = _ensure_tag(root, _lineage(found[1]))
        if created:
            completed.append(f"created the git tag {report['tag']} of production {champion_version}, which an interrupted promotion left out")
    if champion is not None and champion["sha256"] == challenger["sha256"]:
        decision, version, reasons = "kept", champion_version, [f"the challenger is the champion {champion_version} (same ONNX sha256)"]
    elif not all(g["passed"] for g in rows):
        decision, version = "rejected", champion_version
    else:
        decision = "promoted"
        release = _release_holding(paths.releases, challenger["sha256"])
        if release is not None:
            completed.append(f"moved production to {release.name}, which holds this model already (an interrupted promotion's release)")
        else:
            release = _write_release(paths.releases, *_release_files(params, root, challenger, champion if comparable else None,
                                                                     champion_version, rows, now))
        version = release.name
        _point_production(paths.production, release)
        # Tagged only once production holds the version, so a tag never names a model that was not served.
        report["tag"], _ = _ensure_tag(root, _lineage(release))
        log.info("promoted %s to %s", release, paths.production)
    report.update(decision=decision, version=version, reasons=[*reasons, *completed])
    write_json(paths.promotion_report, report)
    write_text(paths.promotion_summary, summary_markdown(report))
    return PromotionResult(decision, version, tuple(report["reasons"]))


def _release_files(
    params: Params, root: Path, challenger: dict[str, Any], champion: dict[str, Any] | None,
    champion_version: str | None, rows: list[dict[str, Any]], now: str,
) -> tuple[str, dict[str, bytes]]:
    """The next version and the files of its release: the model exactly as scored, labels, lineage, card."""
    version = _next_version(params, root)
    data = params.paths.onnx_model.read_bytes()
    if hashlib.sha256(data).hexdigest() != challenger["sha256"]:
        raise PipelineError(f"{params.paths.onnx_model} changed while it was being scored: rerun tlpipe promote")
    code = code_version(root)
    lineage = {
        "version": version, "time": now, "replaced": champion_version, "onnx_sha256": challenger["sha256"],
        "labels": challenger["labels"], "gates": rows,
        "metrics": {"challenger": challenger["metrics"], "champion": champion["metrics"] if champion else None},
        "code": code, "dvc": dvc_hashes(params),
        "params": params.model_dump(by_alias=True, mode="json", exclude={"paths"}),
        "tag": f"{params.promote.tag_prefix}{version[1:]}" if params.promote.tag_prefix and code["commit"] else None,
    }
    return version, {
        MODEL_FILE: data,
        "labels.txt": "".join(f"{label}\n" for label in challenger["labels"]).encode(),
        LINEAGE_FILE: (json.dumps(lineage, indent=2) + "\n").encode(),
        CARD_FILE: _model_card(params, lineage).encode(),
    }
