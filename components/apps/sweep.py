"""The label-budget sweep: transfer vs training from scratch at several labels per class, drawn and tabled.

    python -m components.apps.sweep --budgets 5 10 25 50 --seeds 42 43 --out reports/sweep

Runs the real stages (ingest ... evaluate, with the scratch stage on) in a temporary workspace,
so the repository's data, models and DVC state are untouched. The source model is trained once
(the target's label budget does not change it); clean, scratch, transfer, finetune and evaluate
run per budget and seed. Writes sweep.csv, sweep.json and sweep.png under --out.

Not `dvc exp run --queue -S ...`: experiments run in the user's repository (its workspace, cache and
git refs) and rerun the source stage per budget, as clean's output changes; this grid touches
nothing of the user's and trains the source model once.
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


def run_sweep(params: Params, budgets: list[int], seeds: list[int]) -> list[dict]:
    """One row per (budget, seed): test accuracy of transfer and of scratch, epochs and seconds of each."""
    from components import clean, evaluate, finetune, ingest, scratch, source, transfer, validate

    rows = []
    for stage in (ingest, validate, clean, source):
        stage.run(params)
    for budget in budgets:
        for seed in seeds:
            run = with_overrides(params, {**NO_GATES, "clean.target_train_per_class": budget, "seed": seed})
            for stage in (clean, scratch, transfer, finetune, evaluate):
                stage.run(run)
            gain = read_json(run.paths.transfer_gain)
            rows.append({
                "labels_per_class": budget, "seed": seed,
                "transfer_accuracy": gain["transfer_accuracy"], "scratch_accuracy": gain["scratch_accuracy"],
                "gain": gain["accuracy_gain"],
                "transfer_epochs": gain["transfer"]["epochs"], "scratch_epochs": gain["scratch"]["epochs"],
                "transfer_seconds": gain["transfer"]["seconds"], "scratch_seconds": gain["scratch"]["seconds"],
            })
            log.info("sweep: %d labels/class, seed %d: transfer %.4f, scratch %.4f", budget, seed,
                     gain["transfer_accuracy"], gain["scratch_accuracy"])
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over seeds per budget."""
    table = []
    for budget in sorted({row["labels_per_class"] for row in rows}):
        group = [row for row in rows if row["labels_per_class"] == budget]
        mean = {key: round(statistics.fmean(row[key] for row in group), 4)
                for key in ("transfer_accuracy", "scratch_accuracy", "gain", "transfer_seconds", "scratch_seconds")}
        table.append({"labels_per_class": budget, "seeds": len(group), **mean})
    return table


def plot(rows: list[dict], table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label, color in (("transfer_accuracy", "transfer", "tab:blue"), ("scratch_accuracy", "from scratch",
                                                                            "tab:orange")):
        axes.plot([r["labels_per_class"] for r in table], [r[key] for r in table], "o-", color=color,
                  label=f"{label} (mean)")
        axes.scatter([r["labels_per_class"] for r in rows], [r[key] for r in rows], color=color, alpha=0.3, s=12)
    axes.set(xscale="log", xlabel="labelled images per class (target train split)", ylabel="test accuracy",
             title="Does transfer help? (target task)")
    axes.minorticks_off()  # the log axis would label 6x10^0 ... between the budgets
    axes.set_xticks([r["labels_per_class"] for r in table], [str(r["labels_per_class"]) for r in table])
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)


def write_outputs(rows: list[dict], out: Path) -> list[dict]:
    table = summarize(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "sweep.csv", buffer.getvalue())
    write_json(out / "sweep.json", {"runs": rows, "mean_by_budget": table})
    plot(rows, table, out / "sweep.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.apps.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 25, 50], help="labels per class")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds per budget (default: params.yaml seed)")
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
        rows = run_sweep(params, args.budgets, args.seeds or [params.seed])
    for row in write_outputs(rows, args.out):
        print(f"{row['labels_per_class']:>4} labels/class: transfer {row['transfer_accuracy']:.4f}  "
              f"scratch {row['scratch_accuracy']:.4f}  gain {row['gain']:+.4f}  ({row['seeds']} seed(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
