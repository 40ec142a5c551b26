"""The label-budget sweep: transfer (from each source mode) vs training from scratch at several labels per class.

    python -m components.apps.sweep --budgets 5 10 25 50 --seeds 42 43 44 --source-modes train self_supervised

Runs the real stages (ingest ... evaluate, with the scratch stage on) in a temporary workspace,
so the repository's data, models and DVC state are untouched. Each source mode's source model is
made once (the target's label budget does not change it: self-supervised pretraining reads the
target's train images and those the budget holds back, labels ignored, the same images at every
budget); clean and the from-scratch baseline (the scratch stage: it does not depend on the source)
run once per budget and seed, transfer, finetune and evaluate per budget, seed and mode. Writes
sweep.csv (one row per run), sweep.json (mean, spread, min and max per mode and budget; each
source's cost) and sweep.png under --out, after every run, so a stopped sweep keeps what it measured.

Not `dvc exp run --queue -S ...`: experiments run in the user's repository (its workspace, cache and
git refs) and rerun the source stage per budget, as clean's output changes; this grid touches
nothing of the user's and makes each source model once.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import statistics
import tempfile
from pathlib import Path

from components.core.artifacts import atomic_path, read_json, write_json, write_text
from components.core.config import Params, load_params, with_overrides

log = logging.getLogger(__name__)

# Gates off inside the sweep: a small budget is allowed to miss them; the sweep reports, not blocks.
NO_GATES = {"evaluate.min_accuracy": 0.0, "evaluate.min_macro_f1": 0.0, "evaluate.min_transfer_gain": None,
            "scratch.enabled": True}
COLORS = {"train": "tab:blue", "self_supervised": "tab:green", "download": "tab:purple"}


def _source_paths(params: Params, mode: str) -> dict[str, object]:
    """Where one source mode's model and report live, side by side with the others'."""
    return {"source.mode": mode, "paths.source_model": f"{params.paths.source_model}-{mode}",
            "paths.source_report": str(params.paths.source_report.with_name(f"source-{mode}.json"))}


def run_sweep(params: Params, budgets: list[int], seeds: list[int], modes: list[str] | None = None,
              out: Path | None = None) -> tuple[list[dict], dict[str, dict]]:
    """One row per (source mode, budget, seed): test accuracy of transfer and of scratch, epochs, seconds, probes.

    Also each source mode's source report (its seconds: what the mode costs). With `out`, the
    outputs are rewritten after every row.
    """
    from components import clean, evaluate, finetune, ingest, scratch, source, transfer, validate

    modes = modes or [params.source.mode]
    rows: list[dict] = []
    sources: dict[str, dict] = {}
    for stage in (ingest, validate, clean):
        stage.run(params)
    for mode in modes:
        made = with_overrides(params, _source_paths(params, mode))
        source.run(made)
        sources[mode] = read_json(made.paths.source_report)
        log.info("sweep: source mode %s took %.1f s", mode, sources[mode]["total_seconds"])
    for budget in budgets:
        for seed in seeds:
            run = with_overrides(params, {**NO_GATES, "clean.target_train_per_class": budget, "seed": seed})
            for stage in (clean, scratch):
                stage.run(run)
            for mode in modes:
                each = with_overrides(run, _source_paths(params, mode))
                for stage in (transfer, finetune, evaluate):
                    stage.run(each)
                gain = read_json(each.paths.transfer_gain)
                found = read_json(each.paths.transfer_report).get("probe") or {}
                rows.append({
                    "source_mode": mode, "labels_per_class": budget, "seed": seed,
                    "transfer_accuracy": gain["transfer_accuracy"], "scratch_accuracy": gain["scratch_accuracy"],
                    "gain": gain["accuracy_gain"],
                    "transfer_epochs": gain["transfer"]["epochs"], "scratch_epochs": gain["scratch"]["epochs"],
                    "transfer_seconds": gain["transfer"]["seconds"], "scratch_seconds": gain["scratch"]["seconds"],
                    "linear_probe_accuracy": found.get("linear_probe_accuracy"), "knn_accuracy": found.get("knn_accuracy"),
                })
                log.info("sweep: %s, %d labels/class, seed %d: transfer %.4f, scratch %.4f", mode, budget, seed,
                         gain["transfer_accuracy"], gain["scratch_accuracy"])
                if out is not None:
                    write_outputs(rows, out, sources)
    return rows, sources


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per source mode and budget: mean over seeds (with std, min and max of both accuracies)."""
    table = []
    for mode in dict.fromkeys(row["source_mode"] for row in rows):
        for budget in sorted({row["labels_per_class"] for row in rows}):
            group = [row for row in rows if row["source_mode"] == mode and row["labels_per_class"] == budget]
            if not group:
                continue
            transfer, scratch = (_spread([row[key] for row in group]) for key in ("transfer_accuracy", "scratch_accuracy"))
            mean = {key: round(statistics.fmean(row[key] for row in group), 4)
                    for key in ("gain", "transfer_seconds", "scratch_seconds")}
            table.append({"source_mode": mode, "labels_per_class": budget, "seeds": len(group),
                          "transfer_accuracy": transfer["mean"], "scratch_accuracy": scratch["mean"], **mean,
                          **{f"transfer_{k}": v for k, v in transfer.items() if k != "mean"},
                          **{f"scratch_{k}": v for k, v in scratch.items() if k != "mean"}})
    return table


def plot(rows: list[dict], table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    modes = list(dict.fromkeys(r["source_mode"] for r in table))
    curves = [(mode, "transfer_accuracy", f"transfer from {mode}", COLORS.get(mode, "tab:blue")) for mode in modes]
    curves.append((modes[0], "scratch_accuracy", "from scratch", "tab:orange"))
    for mode, key, label, color in curves:
        mine = [r for r in table if r["source_mode"] == mode]
        prefix = key.split("_")[0]
        budgets = [r["labels_per_class"] for r in mine]
        axes.plot(budgets, [r[key] for r in mine], "o-", color=color, label=f"{label} (mean)")
        axes.fill_between(budgets, [r[f"{prefix}_min"] for r in mine], [r[f"{prefix}_max"] for r in mine],
                          color=color, alpha=0.12, linewidth=0)
        seeds = [r for r in rows if r["source_mode"] == mode]
        axes.scatter([r["labels_per_class"] for r in seeds], [r[key] for r in seeds], color=color, alpha=0.35, s=12)
    budgets = sorted({r["labels_per_class"] for r in table})
    axes.set(xscale="log", xlabel="labelled images per class (target train split)", ylabel="test accuracy",
             title="Does transfer help? (target task; band: min-max over seeds)")
    axes.minorticks_off()  # the log axis would label 6x10^0 ... between the budgets
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)


def write_outputs(rows: list[dict], out: Path, sources: dict[str, dict] | None = None) -> list[dict]:
    table = summarize(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "sweep.csv", buffer.getvalue())
    costs = {mode: {key: report.get(key) for key in ("total_seconds", "seconds", "epochs_run", "images")}
             for mode, report in (sources or {}).items()}
    write_json(out / "sweep.json", {"runs": rows, "mean_by_budget": table, "sources": costs})
    plot(rows, table, out / "sweep.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.apps.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 25, 50], help="labels per class")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds per budget (default: params.yaml seed)")
    parser.add_argument("--source-modes", nargs="+", choices=["train", "self_supervised", "download"],
                        help="source modes to compare, each against the same from-scratch baseline "
                             "(default: params.yaml source.mode)")
    parser.add_argument("--out", type=Path, default=Path("reports/sweep"), help="folder for sweep.csv/json/png")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params overrides for every run, e.g. finetune.head_epochs=10 (YAML values)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import yaml

    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory(prefix="tlpipe-sweep-") as workspace:
        params = with_overrides(load_params(args.params, root=Path(workspace)), overrides)
        # Your own data folders stay where params.yaml says (resolved from the params file's folder).
        folders = {f"data.{key}": str((args.params.parent / value).resolve())
                   for key in ("source_dir", "target_dir") if (value := getattr(load_params(args.params).data, key))}
        params = with_overrides(params, folders) if folders else params
        rows, sources = run_sweep(params, args.budgets, args.seeds or [params.seed], args.source_modes, args.out)
    for row in write_outputs(rows, args.out, sources):
        print(f"{row['source_mode']:>16} {row['labels_per_class']:>4} labels/class: transfer {row['transfer_accuracy']:.4f} "
              f"(min {row['transfer_min']:.4f})  scratch {row['scratch_accuracy']:.4f} (max {row['scratch_max']:.4f})  "
              f"gain {row['gain']:+.4f}  ({row['seeds']} seed(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
