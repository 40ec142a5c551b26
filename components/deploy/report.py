"""The run report: one self-contained HTML page a person reads (data, training, transfer, evaluation,
errors with their Grad-CAM explanations, export and lineage), built from the run's artifacts. The
misclassified test images and their Grad-CAM maps are written by evaluate (components.deploy.errors),
which has the model loaded, so the report stage itself needs no Keras.

Self-contained: the CSS is inline, plots (matplotlib) and thumbnails are PNG data URIs, there is
no script and no link that loads anything, so the page renders the same offline, from a bundle
copied to another machine, or attached to an e-mail. The export section sits between markers so
that the export stage can fill it in the bundle's copy (`refresh_export`) without redrawing the rest.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from components.core.config import Params
from components.core.errors import PipelineError
from components.core.metrics import confusion_figure
from components.core.reports import (ClassMetrics, DriftReport, ExportReport, FinetuneReport, Gate, GatesReport,
                                     MetricsReport, QuarantineReport, SourceReport, TransferGainReport, TransferReport,
                                     ValidationReport, gate_rows, number, read_report)
from components.data import raw_pack
from components.data.images import TASKS

log = logging.getLogger(__name__)

SECTIONS = ("data", "training", "transfer", "evaluation", "errors", "export")
SAMPLES_PER_CLASS = 8
MAX_QUARANTINE_THUMBNAILS = 60
THUMB_SIDE = 64
EXPORT_START, EXPORT_END = "<!-- export:start -->", "<!-- export:end -->"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
nav{background:#fff;border-bottom:1px solid #dde1e6;padding:8px 32px;position:sticky;top:0}
nav a{margin-right:18px;color:#1d3557;text-decoration:none;font-weight:600}
section{background:#fff;margin:18px 32px;padding:6px 22px 18px;border:1px solid #dde1e6;border-radius:6px}
h2{border-bottom:2px solid #e63946;display:inline-block;padding-bottom:2px}h3{margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #dde1e6;padding:3px 8px;text-align:left}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:700}.fail{color:#cf222e;font-weight:700}.muted{color:#6b7480}
.strip{display:flex;flex-wrap:wrap;gap:4px;align-items:center;margin:2px 0 8px}
.strip img,.card img{image-rendering:pixelated;border:1px solid #ccd}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{width:150px;font-size:12px}
.card img{width:140px;height:auto}.card.wide{width:300px}.card code{word-break:break-all}.plot{max-width:100%}
code{background:#eef1f5;padding:0 3px;border-radius:3px}pre{background:#eef1f5;padding:8px;overflow:auto;max-height:320px}
"""


@dataclass(frozen=True)
class ErrorCase:
    """One misclassified test image, its explanation drawn over it."""

    path: str
    true: str
    predicted: str
    probability: float  # of the predicted (wrong) class
    image_png: bytes
    overlay_png: bytes


# ---------- small HTML helpers ----------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return number(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f"<td class=num>{esc(fmt(c))}</td>" if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{c if isinstance(c, Raw) else esc(fmt(c))}</td>" for c in row
        ) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class Raw(str):
    """HTML already escaped (a verdict span, an image), put in a table cell as is."""


def gate_html(gates: list[Gate], kind: str) -> str:
    """A table of gates (evaluate's, or drift's checks): the rows every gate table shows."""
    return table([kind, "value", "threshold", "result"],
                 [[name, value, bound, verdict(passed)] for name, value, bound, passed in gate_rows(gates)])


def verdict(passed: bool | None) -> Raw:
    if passed is None:
        return Raw("<span class=muted>n/a</span>")
    return Raw('<span class=pass>pass</span>' if passed else '<span class=fail>FAIL</span>')


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, css: str = "") -> str:
    return f'<img src="{png_uri(data)}" alt="{esc(alt)}" title="{esc(alt)}"{f" class={css}" if css else ""}>'


def thumbnail(pixels: np.ndarray, side: int = THUMB_SIDE) -> bytes:
    """uint8 (H, W, 1|3) or (H, W) scaled up by whole steps (sharp pixels), as PNG bytes."""
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    image = Image.fromarray(pixels.astype(np.uint8))
    scale = max(1, side // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    if max(image.size) > side:
        image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def missing(what: Path) -> str:
    return f"<p class=muted>{esc(what)} is not written yet: run the stage that writes it (dvc repro).</p>"


# ---------- data ----------

def data_section(params: Params, samples: dict[str, dict[str, list[np.ndarray]]]) -> str:
    paths = params.paths
    quarantine = read_report(paths.quarantine, QuarantineReport)
    parts = []
    if quarantine is None:
        parts.append(missing(paths.quarantine))
    else:
        for task, counts in quarantine.counts.items():
            rows = []
            for name, c in counts.per_class.items():
                strip = "".join(img(thumbnail(p), f"{task}/{name}") for p in samples.get(task, {}).get(name, []))
                rows.append([name, c.get("input"), c.get("kept"), c.get("quarantined"), c.get("held_back"),
                             c.get("train"), c.get("val"), c.get("test"), Raw(f"<div class=strip>{strip}</div>")])
            rows.append([Raw("<b>all</b>"), counts.input, counts.kept, counts.quarantined,
                         counts.held_back, *(counts.splits.get(s) for s in ("train", "val", "test")), ""])
            parts.append(f"<h3>{esc(task)} task</h3>" + table(
                ["class", "in", "kept", "quarantined", "held back", "train", "val", "test", "training samples"], rows))
        parts.append(_quarantined_files(params, quarantine.quarantined))
        checks = [[e.get("description") or e.get("expectation"), e.get("severity"), verdict(e.get("success")),
                   e.get("unexpected_count")] for e in quarantine.expectations]
        if checks:
            parts.append("<h3>Split checks</h3>" + table(["check", "severity", "result", "unexpected"], checks))
    parts.append(_validation(params))
    parts.append(_drift(params))
    return "".join(parts)


def _raw_bytes(params: Params, paths: list[str]) -> dict[str, bytes]:
    """{manifest path ("<task>/<class>/..."): bytes} of those files ingest packed (a missing pack: none)."""
    found: dict[str, bytes] = {}
    for task in TASKS:
        wanted = [path.removeprefix(f"{task}/") for path in paths if path.startswith(f"{task}/")]
        try:
            found |= {f"{task}/{rel}": data for rel, data in raw_pack.read_paths(params.paths.raw / task, wanted).items()}
        except PipelineError as error:
            log.warning("quarantined files shown without pictures: %s", error)
    return found


def _quarantined_files(params: Params, files: list[dict[str, str]]) -> str:
    from components.data.images import load_normalized

    if not files:
        return "<h3>Quarantined files</h3><p>None: every input file was usable and unique.</p>"
    cards = []
    shown = files[:MAX_QUARANTINE_THUMBNAILS]
    contents = _raw_bytes(params, [entry["path"] for entry in shown])
    for entry in shown:
        try:  # a quarantined file often does not decode (that is why it is here), or was never copied
            data = contents[entry["path"]]
            pixels = np.asarray(load_normalized(io.BytesIO(data), THUMB_SIDE, "RGB"))
            picture = img(thumbnail(pixels), entry["path"])
        except Exception:  # Pillow raises many types for a bad file; each means "no picture"
            picture = "<div class=muted>(does not decode)</div>"
        cards.append(f"<div class=card>{picture}<div><code>{esc(entry.get('path'))}</code><br>"
                     f"{esc(entry.get('reason'))}</div></div>")
    more = len(files) - MAX_QUARANTINE_THUMBNAILS
    note = f"<p class=muted>and {more} more in {esc(params.paths.quarantine)}</p>" if more > 0 else ""
    return f"<h3>Quarantined files ({len(files)})</h3><div class=cards>{''.join(cards)}</div>{note}"


def _validation(params: Params) -> str:
    validation = read_report(params.paths.validation, ValidationReport)
    link = f'raw Great Expectations results: <code>{esc(params.paths.validation)}</code>'
    if validation is None:
        return "<h3>Validation</h3>" + missing(params.paths.validation)
    rows = [[e.get("description") or e.get("expectation"), e.get("suite"), e.get("severity"),
             verdict(e.get("success")), e.get("unexpected_count")] for e in validation.expectations]
    failed = sum(1 for e in validation.expectations if not e.get("success"))
    return (f"<h3>Validation: {verdict(validation.success)}</h3><p>{len(rows)} expectations of the validate "
            f"stage, {failed} unmet ({link}, kept beside this page).</p><details{' open' if failed else ''}>"
            "<summary>every expectation</summary>"
            + table(["expectation", "suite", "severity", "result", "unexpected"], rows) + "</details>")


def _drift(params: Params) -> str:
    drift = read_report(params.paths.drift_report, DriftReport)
    if drift is None:
        return "<h3>Drift</h3>" + missing(params.paths.drift_report)
    body = gate_html(drift.checks, "check") if drift.checks else ""
    return f"<h3>Drift against the reference: {verdict(drift.passed)}</h3><p>{esc(drift.status)}</p>{body}"


# ---------- training ----------

def read_curves(folder: Path) -> dict[str, list[float]]:
    """metric -> values by step, from the TSV files the trainer writes (dvclive's layout)."""
    curves = {}
    for file in sorted((Path(folder) / "plots" / "metrics").glob("*.tsv")):
        lines = file.read_text().splitlines()[1:]
        curves[file.stem] = [float(line.split("\t")[1]) for line in lines if "\t" in line]
    return curves


def curve_figure(title: str, curves: dict[str, list[float]], phases: list[dict[str, Any]]) -> bytes:
    """Train and validation overlaid per metric; phase boundaries, best epochs and early stops marked.

    phases: [{"name", "epochs_run", "best_epoch" (1-based), "planned"}] in order.
    """
    plt = _pyplot()
    metrics = [m for m in curves if not m.startswith("val_")]
    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5.2 * max(1, len(metrics)), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in curves:
                axis.plot(range(1, len(curves[key]) + 1), curves[key], style, label="validation" if key != metric else "train")
        start = 0
        for phase in phases:
            if start:
                axis.axvline(start + 0.5, color="grey", linestyle=":")
            axis.text(start + 1, 0.98, phase["name"], transform=axis.get_xaxis_transform(), va="top", fontsize=8)
            if phase.get("best_epoch"):
                axis.axvline(start + phase["best_epoch"], color="green", alpha=0.6, label="best epoch (kept)")
            if phase.get("planned") and phase["epochs_run"] < phase["planned"]:
                axis.axvline(start + phase["epochs_run"], color="red", alpha=0.6, label="early stop")
            start += phase["epochs_run"]
        axis.set(title=f"{title}: {metric}", xlabel="epoch", ylabel=metric)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=8)
    return figure_png(figure)


def training_section(params: Params) -> str:
    parts = []
    source_report = read_report(params.paths.source_report, SourceReport)
    source_curves = read_curves(params.paths.training_curves / "source")
    if source_report and source_curves:
        phase = {"name": "source", "epochs_run": source_report.epochs_run or 0,
                 "best_epoch": source_report.best_epoch, "planned": params.source.epochs}
        parts.append(f"<h3>Source model</h3><p>{esc(source_report.train_images)} training images, "
                     f"test accuracy {fmt(source_report.test_accuracy)}.</p>"
                     + img(curve_figure("source", source_curves, [phase]), "source training curves", "plot"))
    elif source_report:
        parts.append(f"<h3>Source model</h3><p>Mode <code>{esc(source_report.mode)}</code>: no training curves "
                     f"(weights from <code>{esc(source_report.file or params.source.weights)}</code>).</p>")
    finetune = read_report(params.paths.finetune_report, FinetuneReport)
    if finetune is None:
        parts.append(missing(params.paths.finetune_report))
        return "".join(parts)
    planned = {"head": params.finetune.head_epochs, "unfrozen": params.finetune.epochs}
    phases = [{"name": name, "epochs_run": p.get("epochs_run", 0), "best_epoch": p.get("best_epoch"),
               "planned": planned.get(name)} for name, p in finetune.phases.items()]
    rows = [[p["name"], p["epochs_run"], p["planned"], p["best_epoch"],
             finetune.phases[p["name"]].get("best_val_accuracy"),
             "yes" if p["planned"] and p["epochs_run"] < p["planned"] else "no"] for p in phases]
    parts.append(f"<h3>Fine-tuning</h3><p>Backend {esc(finetune.backend)}, precision "
                 f"{esc(finetune.precision)}, {esc(finetune.train_images)} training and "
                 f"{esc(finetune.val_images)} validation images; kept phase "
                 f"<b>{esc(finetune.kept_phase)}</b>.</p>"
                 + table(["phase", "epochs run", "planned", "best epoch", "best val accuracy", "early stop"], rows)
                 + img(curve_figure("fine-tune", read_curves(params.paths.training_curves / "finetune"), phases),
                       "fine-tune training curves", "plot"))
    return "".join(parts)


# ---------- transfer ----------

def transfer_section(params: Params) -> str:
    report = read_report(params.paths.transfer_report, TransferReport)
    if report is None:
        return missing(params.paths.transfer_report)
    layers = report.layers
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.get("status", "?")] = counts.get(layer.get("status", "?"), 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    # What trained is fine-tuning's record: the layers each phase trained.
    trainable = finetune.trainable if (finetune := read_report(params.paths.finetune_report, FinetuneReport)) else {}
    phases_of: dict[str, list[str]] = {}
    for phase, paths in trainable.items():
        for path in paths:
            phases_of.setdefault(path, []).append(phase)
    rows = [[layer.get("layer"), layer.get("status"), layer.get("source") or "",
             ", ".join(phases_of.get(layer.get("layer"), [])) or "none (frozen)", layer.get("reason") or ""]
            for layer in layers]
    trained = "; ".join(f"{len(paths)} in the {phase} phase" for phase, paths in trainable.items()) or "none"
    gain = read_report(params.paths.transfer_gain, TransferGainReport)
    if gain is not None and gain.compared:
        gain_html = (f"<p>Transfer gain against training from scratch (same budget and recipe): test accuracy "
                     f"{fmt(gain.transfer_accuracy)} vs {fmt(gain.scratch_accuracy)}, gain "
                     f"<b>{fmt(gain.accuracy_gain)}</b>.</p>")
    else:
        gain_html = ("<p class=muted>Transfer gain not measured (set <code>scratch.enabled: true</code> to "
                     "train a from-scratch baseline and compare).</p>")
    return (f"<p>{len(layers)} weighted layers: {esc(summary)}; trained in fine-tuning: {esc(trained)}.</p>{gain_html}"
            + f"<details{' open' if len(layers) <= 40 else ''}><summary>every layer</summary>"
            + table(["layer", "status", "source layer", "trained in phase", "reason"], rows) + "</details>")


# ---------- evaluation and errors ----------

def per_class_figure(per_class: dict[str, ClassMetrics]) -> bytes:
    plt = _pyplot()
    names = list(per_class)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.0))
    positions = np.arange(len(names))
    for offset, metric in zip((-0.27, 0, 0.27), ("precision", "recall", "f1")):
        axis.bar(positions + offset, [getattr(per_class[n], metric) for n in names], width=0.26, label=metric)
    axis.set(xticks=positions, xticklabels=names, ylim=(0, 1.05), xlabel="class", ylabel="score",
             title="per class, target test split")
    axis.legend(fontsize=8, loc="lower right")
    return figure_png(figure)


def evaluation_section(params: Params) -> str:
    metrics = read_report(params.paths.metrics, MetricsReport)
    if metrics is None:
        return missing(params.paths.metrics)
    gates = read_report(params.paths.gates, GatesReport)
    headline = table(["accuracy", "macro precision", "macro recall", "macro F1", "test images"],
                     [[metrics.accuracy, metrics.macro_precision, metrics.macro_recall, metrics.macro_f1,
                       metrics.test_images]])
    per_class = metrics.per_class
    classes = list(per_class)
    matrix = np.asarray(metrics.confusion_matrix)
    plots = img(per_class_figure(per_class), "per-class precision, recall and F1", "plot") if per_class else ""
    if matrix.size:
        plots += img(figure_png(confusion_figure(matrix, classes)), "confusion matrix", "plot")
    return (headline + f"<h3>Gates: {verdict(gates.passed if gates else None)}</h3>"
            + gate_html(gates.gates if gates else [], "gate") + plots)


def confused_pairs(matrix: np.ndarray, classes: list[str], top: int = 5) -> list[tuple[str, str, int]]:
    """(true, predicted, count) of the most frequent mistakes, most first."""
    pairs = [(classes[t], classes[p], int(matrix[t, p])) for t in range(len(classes)) for p in range(len(classes))
             if t != p and matrix[t, p] > 0]
    return sorted(pairs, key=lambda pair: -pair[2])[:top]


def errors_section(params: Params, cases: list[ErrorCase] | None, total_wrong: int, layer: str | None) -> str:
    metrics = read_report(params.paths.metrics, MetricsReport)
    if metrics is None or cases is None:
        return missing(params.paths.metrics)
    pairs = confused_pairs(np.asarray(metrics.confusion_matrix or [[0]]), list(metrics.per_class))
    pair_html = table(["true class", "predicted as", "test images"], [list(p) for p in pairs]) if pairs else ""
    if not cases:
        return "<p>No test image is misclassified.</p>"
    cards = "".join(
        f"<div class=\"card wide\">{img(c.image_png, c.path)} {img(c.overlay_png, f'Grad-CAM of {c.path}: true {c.true}, predicted {c.predicted}')}<div>"
        f"true <b>{esc(c.true)}</b>, predicted <b class=fail>{esc(c.predicted)}</b> ({c.probability:.2f})<br>"
        f"<code>{esc(c.path)}</code></div></div>" for c in cases
    )
    shown = f"the {len(cases)} most confident of {total_wrong}" if total_wrong > len(cases) else f"all {total_wrong}"
    return (f"<h3>Most confused pairs</h3>{pair_html}<h3>Misclassified test images ({shown}, worst first)</h3>"
            f"<p>Each image as the model saw it, then with its Grad-CAM map for the predicted class (layer "
            f"<code>{esc(layer)}</code>): red is where the model found the evidence for its wrong answer.</p><div class=cards>{cards}</div>")


# ---------- export and lineage ----------

def export_body(export: ExportReport | None) -> str:
    """The export facts (parity, variants, latency, sizes); also rendered by the bundle's copy."""
    if not export:
        return ("<p class=muted>The export stage runs after this page is written: the deployment bundle's copy "
                "(<code>report.html</code> beside <code>MODEL_CARD.md</code>) has this section filled in.</p>")
    parity = table(["max |onnx - keras|", "bound", "top-1 agreement", "images", "sizes checked", "opset"],
                   [[export.max_abs_diff, export.max_abs_diff_bound, export.top1_agreement,
                     export.parity_images, ", ".join(f"{h}x{w}" for h, w in export.sizes_checked), export.opset]])
    rows = [["model.onnx", "kept", "", export.size_bytes, export.latency_ms_batch1]]
    rows += [[name, verdict(v.get("accepted")), v.get("reason"), v.get("size_bytes"), v.get("latency_ms_batch1")]
             for name, v in export.variants.items()]
    return (f"<h3>Parity with Keras</h3>{parity}<h3>Models and variants</h3>"
            + table(["model", "verdict", "reason", "bytes", "latency ms (batch 1)"], rows)
            + f"<p>ONNX sha256 <code>{esc(export.onnx_sha256)}</code></p>")


def refresh_export(page: str, export: ExportReport) -> str:
    """The page with its export facts replaced by `export` (the export stage's copy in the bundle)."""
    start, end = page.find(EXPORT_START), page.find(EXPORT_END)
    if start < 0 or end < start:
        return page
    return page[: start + len(EXPORT_START)] + export_body(export) + page[end:]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def lineage(params: Params, stages: list[str]) -> str:
    """Commit, params, and the DVC hashes of the outputs of `stages` (those this page was built from)."""
    commit = _git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    rows = []
    try:
        lock = yaml.safe_load(Path(params.paths.dvc_lock).read_text()) or {}
    except (OSError, yaml.YAMLError):
        lock = {}
    for stage, entry in (lock.get("stages") or {}).items():
        if stage not in stages:
            continue
        for out in entry.get("outs", []):
            rows.append([stage, Raw(f"<code>{esc(out.get('path'))}</code>"), out.get("md5") or out.get("hash") or "",
                         out.get("nfiles") or ""])
    hashes = table(["stage", "output", "md5 (DVC)", "files"], rows) if rows else (
        f"<p class=muted>{esc(params.paths.dvc_lock)} not found: run through dvc repro to record data hashes.</p>")
    # The sections the model was made with (dvc.yaml reruns the report when one changes).
    made_with = params.model_dump(mode="json", by_alias=True, exclude={"paths", "export", "promote"})
    dumped = yaml.safe_dump(made_with, sort_keys=False)
    return (f"<h3>Lineage</h3><p>Code: commit <code>{esc(commit)}</code>{esc(dirty)}.</p>{hashes}"
            f"<details><summary>params (as this run read them)</summary><pre>{esc(dumped)}</pre></details>")


# ---------- the page ----------

def render(params: Params, samples: dict[str, dict[str, list[np.ndarray]]], cases: list[ErrorCase] | None,
           total_wrong: int, layer: str | None, upstream: list[str], export: ExportReport | None = None) -> str:
    """The whole page. samples: task -> class -> a few training images; cases: the explained errors;
    upstream: the stages whose outputs the page shows (their hashes are its lineage)."""
    metrics = read_report(params.paths.metrics, MetricsReport)
    gates = read_report(params.paths.gates, GatesReport)
    bodies = {
        "data": data_section(params, samples),
        "training": training_section(params),
        "transfer": transfer_section(params),
        "evaluation": evaluation_section(params),
        "errors": errors_section(params, cases, total_wrong, layer),
        "export": f"{EXPORT_START}{export_body(export)}{EXPORT_END}{lineage(params, upstream)}",
    }
    titles = {"data": "Data", "training": "Training", "transfer": "Transfer", "evaluation": "Evaluation",
              "errors": "Errors, explained", "export": "Export and lineage"}
    nav = "".join(f'<a href="#{name}">{titles[name]}</a>' for name in SECTIONS)
    sections = "".join(f'<section id="{name}"><h2>{titles[name]}</h2>{bodies[name]}</section>' for name in SECTIONS)
    summary = (f"backbone <b>{esc(params.model.backbone)}</b>, "
               f"test accuracy <b>{fmt(metrics.accuracy if metrics else None)}</b>, "
               f"macro F1 <b>{fmt(metrics.macro_f1 if metrics else None)}</b>, "
               f"gates {verdict(gates.passed if gates else None)}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>tlpipe run report</title><style>{CSS}</style></head><body>"
            f"<header><h1>tlpipe run report</h1><div>{summary}</div></header><nav>{nav}</nav>{sections}</body></html>\n")
