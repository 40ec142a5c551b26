"""Stage validate: a manifest of every raw file, checked by a Great Expectations suite, with HTML data docs."""

from __future__ import annotations

import html
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.artifacts import atomic_dir, atomic_path, write_text
from components.core.config import Params
from components.data.drift import check_drift
from components.core.errors import PipelineError
from components.core.reports import Gate, ValidationReport, write_report
from components.data.expectations import run_suites, summarize
from components.data import raw_pack
from components.data.images import MANIFEST_COLUMNS, STAT_COLUMNS, TASKS, inspect_files, workers_for
from components.data.raw_record import rejected_files

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Suites whose failure fails the stage; the "informational" suite only reports what clean will quarantine.
CRITICAL_SUITES = ("manifest", "class_counts")


@dataclass(frozen=True)
class ValidateResult:
    success: bool
    images: int
    unusable: int
    duplicates: int
    data_docs: Path

    def __str__(self) -> str:
        verdict = "passed" if self.success else "FAILED"
        return (f"validation {verdict}: {self.images} files, {self.unusable} unusable files and {self.duplicates} "
                f"duplicate copies (clean quarantines them); report {self.data_docs / 'index.html'}")


def _manifest(params: Params) -> tuple["pd.DataFrame", dict[str, list[str]]]:
    """One row per input file: those in paths.raw, and those ingest could not copy (with its reason)."""
    import pandas as pd

    raw, limits = params.paths.raw, params.validation
    rows: list[dict[str, Any]] = []
    classes: dict[str, list[str]] = {}
    rejected = rejected_files(raw)
    for task in TASKS:
        classes[task] = raw_pack.classes(raw / task)
        files = [(m.path, m.label) for m in raw_pack.members(raw / task)]
        workers = workers_for(limits.workers, len(files))
        log.info("%s: inspecting %d files in %d process(es)", task, len(files), workers)
        jobs = ((str(raw / task / raw_pack.pack_name(m.pack)), m.offset, m.size, m.path)
                for m in raw_pack.members(raw / task))
        inspected = inspect_files(jobs, limits.max_pixels, limits.min_side, limits.max_side, workers)
        for (path, label), facts in zip(files, inspected, strict=True):
            rows.append({"task": task, "path": f"{task}/{path}", "label": label, **facts})
        # Never copied, so never hashed: sha256 "" marks a row with no content in paths.raw.
        rows += [{"task": task, "path": f"{task}/{r['path']}", "label": r["label"], "bytes": 0, "sha256": "",
                  "decodable": False, "error": r["reason"], "dhash": ""} for r in rejected[task]]
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).sort_values("path", ignore_index=True)
    frame = frame.astype({"width": "Int64", "height": "Int64", "bytes": "int64", "decodable": "bool",
                          **{c: "float64" for c in STAT_COLUMNS}})
    return frame, classes


def _class_counts(manifest: "pd.DataFrame", classes: dict[str, list[str]]) -> "pd.DataFrame":
    """One row per class folder, empty ones included (an empty folder is a class with 0 images)."""
    import pandas as pd

    files = Counter(zip(manifest["task"], manifest["label"]))
    ok = manifest[manifest["error"] == ""]
    usable = Counter(zip(ok["task"], ok["label"]))
    rows = [{"task": t, "label": c, "images": files[(t, c)], "usable": usable[(t, c)]}
            for t in TASKS for c in classes[t]]
    frame = pd.DataFrame(rows, columns=["task", "label", "images", "usable"])
    # Each class's size relative to its task's largest class: the imbalance bound reads this.
    largest = frame.groupby("task")["usable"].transform("max").clip(lower=1)
    frame["share_of_largest"] = frame["usable"] / largest
    return frame


def _duplicates(manifest: "pd.DataFrame") -> int:
    """Redundant copies: files whose exact bytes already appear earlier in the same task."""
    stored = manifest[manifest["sha256"] != ""]
    return int(stored.duplicated(subset=["task", "sha256"]).sum())


def _suites(params: Params, classes: dict[str, list[str]]) -> dict[str, list[Any]]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    limits = params.validation
    size = {"min_value": limits.min_side, "max_value": limits.max_side}
    usable = Column("error") == ""
    per_task = {t: Column("task") == t for t in TASKS}
    manifest = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=[*MANIFEST_COLUMNS, "aspect"]),
        gxe.ExpectColumnValuesToBeInSet(column="task", value_set=list(TASKS)),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("path", "label", "sha256")),
        # Among files ingest copied: a repeated CSV row shares its path, and clean quarantines it as a repeat.
        gxe.ExpectColumnValuesToBeUnique(column="path", row_condition=Column("sha256") != ""),
        *(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes[t], row_condition=per_task[t])
          for t in TASKS),
        # Images clean keeps must be trainable: extreme strips are almost always scans or banners.
        gxe.ExpectColumnValuesToBeBetween(column="aspect", row_condition=usable, min_value=1,
                                          max_value=limits.max_aspect_ratio),
    ]
    class_counts = [
        gxe.ExpectColumnValuesToBeBetween(column="usable", min_value=limits.min_images_per_class),
        gxe.ExpectColumnValuesToBeBetween(column="share_of_largest", min_value=1 / limits.max_imbalance_ratio,
                                          max_value=1),
        *(gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2, row_condition=per_task[t])
          for t in TASKS),
    ]
    if not limits.allow_class_overlap:
        class_counts.append(gxe.ExpectColumnValuesToNotBeInSet(
            column="label", value_set=classes["source"], row_condition=per_task["target"]))
    report = [
        gxe.ExpectColumnValuesToBeInSet(column="error", value_set=[""], severity="info",
                                        description="Unusable files are quarantined by clean, with this reason."),
        gxe.ExpectColumnValuesToBeBetween(column="width", row_condition=Column("decodable") == True,  # noqa: E712
                                          severity="info", description="Clean quarantines other sizes.", **size),
        gxe.ExpectColumnValuesToBeBetween(column="height", row_condition=Column("decodable") == True,  # noqa: E712
                                          severity="info", description="Clean quarantines other sizes.", **size),
        *(gxe.ExpectColumnValuesToBeUnique(column="sha256", row_condition=per_task[t], severity="info",
                                           description="Exact duplicates are quarantined by clean.") for t in TASKS),
    ]
    return {"manifest": manifest, "class_counts": class_counts, "informational": report}


def _explain(entry: dict[str, Any], manifest: "pd.DataFrame", counts: "pd.DataFrame", params: Params) -> str:
    """One sentence a person can act on, for a failed critical expectation."""
    kwargs, limits = entry["kwargs"], params.validation
    column = kwargs.get("column")
    if column == "usable":
        short = counts[counts["usable"] < limits.min_images_per_class]
        return "; ".join(
            f"class '{row.label}' of {row.task} is an empty folder; add images to it or remove the folder"
            if row.images == 0 else
            f"class '{row.label}' of {row.task} has {row.usable} usable images, fewer than "
            f"validate.min_images_per_class={limits.min_images_per_class}; add images or lower the threshold"
            for row in short.itertuples())
    if column == "share_of_largest":
        small = counts[counts["share_of_largest"] < 1 / limits.max_imbalance_ratio]
        return "; ".join(
            f"class '{row.label}' of {row.task} has {row.usable} usable images, over "
            f"validate.max_imbalance_ratio={limits.max_imbalance_ratio:g} times fewer than its largest class; "
            "add images to it, remove images from the largest classes, or raise the bound"
            for row in small.itertuples())
    if entry["expectation"] == "expect_column_values_to_not_be_in_set":
        shared = sorted(set(counts.loc[counts["task"] == "target", "label"]) & set(kwargs["value_set"]))
        return (f"target classes {shared} are also source classes: the target task should be new classes; "
                "rename or remove them, or set validate.allow_class_overlap: true if this is intended")
    if entry["expectation"] == "expect_column_unique_value_count_to_be_between":
        task = kwargs["row_condition"]["parameter"]
        return (f"{task} has {entry.get('observed_value')} class folder(s); a classifier needs at least 2: "
                "add another class folder")
    if column == "aspect":
        bad = manifest[(manifest["error"] == "") & (manifest["aspect"] > limits.max_aspect_ratio)]
        examples = ", ".join(f"{r.path} ({r.width}x{r.height})" for r in bad.head(3).itertuples())
        return (f"{entry.get('unexpected_count')} images have an aspect ratio over "
                f"validate.max_aspect_ratio={limits.max_aspect_ratio:g}, e.g. {examples}; crop or remove them, "
                "or raise the bound")
    detail = entry.get("exception") or f"{entry.get('unexpected_count', entry.get('observed_value'))} unexpected"
    return f"{entry['expectation']} {kwargs} failed ({detail})"


def _drift_problem(drifted: list[Gate], params: Params) -> str:
    shifts = ", ".join(c.why for c in drifted)
    return (f"the data drifted from the last validated dataset ({shifts}; details in {params.paths.drift_report}); "
            "if the change is intended, run `tlpipe drift accept` (this data becomes the reference) and `dvc repro` "
            "again, or raise the validate.drift_max_* bounds")


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tlpipe data validation</title><style>
body {{font-family: sans-serif; margin: 2em}} table {{border-collapse: collapse}}
td, th {{border: 1px solid #ccc; padding: 3px 8px; text-align: left}} tr.bad td {{background: #fdd}}
.verdict {{font-size: 1.4em; font-weight: bold; color: {color}}}</style></head><body>
<h1>Data validation</h1><p class="verdict">{verdict}</p><ul>{problems}</ul>
<p>Info-severity expectations report what clean will quarantine; only critical ones fail the stage.</p>
<h2>Great Expectations validation results</h2>
<ul>{links}<li><a href="gx_index.html">GX index (its table needs internet for its scripts)</a></li></ul>
<h2>Classes</h2><table><tr><th>task</th><th>class</th><th>files</th><th>usable</th></tr>{classes}</table>
<h2>Expectations</h2><table><tr><th>suite</th><th>severity</th><th>expectation</th><th>arguments</th><th>result</th>
<th>observed / unexpected</th></tr>{expectations}</table></body></html>
"""


def _index_html(success: bool, entries: list[dict[str, Any]], counts: "pd.DataFrame", docs: Path,
                problems: list[str]) -> str:
    """A readable page with no external assets: verdict, problems, class counts, every expectation."""
    def row(*values: Any, css: str = "") -> str:
        return f'<tr class="{css}">' + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"

    pages = sorted(docs.glob("validations/*/*/*/*.html"))  # validations/<suite>/<run>/<time>/<batch>.html
    links = "".join(f'<li><a href="{p.relative_to(docs).as_posix()}">{html.escape(p.parents[2].name)}</a></li>'
                    for p in pages)
    expectations = "".join(
        row(e["suite"], e["severity"], e["expectation"], json.dumps(e["kwargs"], default=str),
            "passed" if e["success"] else "FAILED", e.get("observed_value", e.get("unexpected_count", "")),
            css="ok" if e["success"] else "bad")
        for e in entries)
    return _PAGE.format(
        color="#070" if success else "#b00", verdict="PASSED" if success else "FAILED",
        problems="".join(f"<li>{html.escape(p)}</li>" for p in problems), links=links,
        classes="".join(row(r.task, r.label, r.images, r.usable) for r in counts.itertuples()),
        expectations=expectations)


def run(params: Params) -> ValidateResult:
    """Write paths.manifest, paths.validation and paths.data_docs; raise if a critical expectation fails."""
    paths = params.paths
    manifest, classes = _manifest(params)
    with atomic_path(paths.manifest) as temp:
        manifest.to_csv(temp, index=False)
    log.info("manifest: %d files -> %s", len(manifest), paths.manifest)

    counts = _class_counts(manifest, classes)
    # GX's pandas engine wants plain numbers; nullable integers become floats with NaN here only.
    numeric = manifest.astype({"width": "float64", "height": "float64"})
    # Wide over tall or tall over wide, >= 1; NaN for files without a size.
    numeric["aspect"] = numeric[["width", "height"]].max(axis=1) / numeric[["width", "height"]].min(axis=1)
    frames = {"manifest": numeric, "class_counts": counts, "informational": numeric}
    with atomic_dir(paths.data_docs) as docs:
        results = run_suites(frames, _suites(params, classes), docs)
        # GX's own index draws its table with scripts from public CDNs, so offline (and behind
        # firewalls) it shows nothing; index.html becomes a self-contained summary linking GX's pages.
        (docs / "index.html").replace(docs / "gx_index.html")
        entries = [summarize(name, r, "critical" if name in CRITICAL_SUITES else "info")
                   for name, suite_result in results for r in suite_result.results]
        success = all(e["success"] for e in entries if e["severity"] == "critical")
        failed = [e for e in entries if e["severity"] == "critical" and not e["success"]]
        problems = [_explain(e, manifest, counts, params) for e in failed]
        # Only a dataset that passed is compared, and only one that passes becomes the next reference.
        drift = check_drift(manifest, params) if success else None
        drifted = [c for c in (drift.checks if drift else []) if not c.passed]
        if drifted:
            problems.append(_drift_problem(drifted, params))
        gated = success and bool(drifted) and params.validation.drift_gate
        write_text(docs / "index.html", _index_html(success and not gated, entries, counts, docs, problems))

    unusable = int((manifest["error"] != "").sum())
    duplicates = _duplicates(manifest)
    tasks = {
        task: {
            "images": int((manifest["task"] == task).sum()),
            "classes": {row.label: {"images": int(row.images), "usable": int(row.usable)}
                        for row in counts[counts["task"] == task].itertuples()},
        }
        for task in TASKS
    }
    write_report(paths.validation, ValidationReport(success=success, tasks=tasks, expectations=entries,
                                                    unusable=unusable, duplicates=duplicates))
    result = ValidateResult(success, len(manifest), unusable, duplicates, paths.data_docs)
    if not success or gated:
        raise PipelineError(f"validation failed: {'; '.join(problems)}. Report: {paths.data_docs / 'index.html'}")
    if drifted:
        log.warning("%s (validate.drift_gate is false: not failing)", problems[-1])
    log.info("%s", result)
    return result
