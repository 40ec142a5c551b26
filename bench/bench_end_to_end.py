"""End to end: `dvc repro` of the embedded default from a clean state against bench/plain_keras.py.

    .venv/bin/python bench/bench_end_to_end.py [--runs 3] [--quick] [--ref HEAD]

Each run: a fresh temporary repository (no data, no models, no DVC cache) and `dvc repro` of
the whole graph (ingest .. export: validation, quarantine, checkpoints, curves, gates, ONNX
export and variants), and, alternating which goes first, `python bench/plain_keras.py` on the
same params.yaml in a fresh process: source training, transfer, fine-tuning and test
evaluation of the same digits with the same model, recipe and epochs, nothing else. Wall time
(interpreter start to exit), peak RSS of the largest process, test accuracy and epochs run of
each side, the ratio per run and its median; and, from the stage log's timestamps, how the
pipeline's time splits over its stages (second resolution).
--quick: 3 epochs per training phase on both sides, gates at 0.
--same-epochs: early stopping off on both sides (patience = epochs), so both train exactly the
configured epochs; with it on, each side stops where its own validation split says, and the two
splits hold different images (content hash vs scikit-learn's splitter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import harness

# Gates off: 3 epochs may miss the 0.9 gate, and a failed gate stops the run before export.
QUICK = {"source.epochs": 3, "finetune.head_epochs": 3, "finetune.epochs": 3, "evaluate.min_accuracy": 0.0,
         "evaluate.min_macro_f1": 0.0}
DONE = re.compile(r"^(\d\d:\d\d:\d\d) tlpipe: (\w+): done", re.M)


def stage_seconds(log: str, started: datetime.datetime) -> dict[str, float]:
    """Seconds per stage from the `HH:MM:SS tlpipe: NAME: done` lines (each stage ends where the next begins)."""
    seconds, previous = {}, started.replace(microsecond=0)
    for clock, name in DONE.findall(log):
        done = datetime.datetime.combine(started.date(), datetime.time.fromisoformat(clock))
        seconds[name] = (done - previous).total_seconds()
        previous = done
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="3 epochs per training phase on both sides")
    parser.add_argument("--same-epochs", action="store_true", help="no early stopping on either side")
    args = parser.parse_args()
    harness.cache_bytecode(args.pycache)
    overrides = dict(QUICK) if args.quick else {}
    if args.same_epochs:
        import yaml

        base = yaml.safe_load((harness.REPO / "params.yaml").read_text())
        source_epochs = overrides.get("source.epochs", base["source"]["epochs"])
        finetune_epochs = max(overrides.get("finetune.head_epochs", base["finetune"]["head_epochs"]),
                              overrides.get("finetune.epochs", base["finetune"]["epochs"]))
        overrides.update({"source.patience": source_epochs, "finetune.patience": finetune_epochs})
    print(harness.header("End to end: `dvc repro` from a clean state vs a plain Keras script"))
    rows, ratios, stages = [], [], []
    plain_script = str(Path(__file__).with_name("plain_keras.py"))
    with tempfile.TemporaryDirectory(prefix="tlpipe-e2e-") as temp:
        for run in range(args.runs):
            root = harness.make_repo(Path(temp) / f"repo-{run}", overrides, args.ref)
            result = {}
            for side in ("pipeline", "plain")[:: 1 if run % 2 == 0 else -1]:
                if side == "pipeline":
                    started = datetime.datetime.now()
                    result[side] = harness.timed(["dvc", "repro"], root)
                    stages.append(stage_seconds(result[side].stdout, started))
                else:
                    result[side] = harness.timed([sys.executable, plain_script, "--params", "params.yaml", "--json"],
                                                 root)
            pipe, plain = result["pipeline"], result["plain"]
            report = json.loads(plain.stdout.strip().splitlines()[-1])
            metrics = json.loads((root / "reports/metrics.json").read_text())
            finetune = json.loads((root / "reports/finetune.json").read_text())
            source = json.loads((root / "reports/source.json").read_text())
            epochs_pipe = "+".join(str(n) for n in (source["epochs_run"], *(p["epochs_run"] for p in
                                                                               finetune["phases"].values())))
            epochs_plain = "+".join(str(report[k]["epochs"]) for k in ("source", "head", "unfrozen"))
            ratios.append(pipe.seconds / plain.seconds)
            rows.append((run + 1, pipe.seconds, plain.seconds, f"{ratios[-1]:.2f}", f"{metrics['accuracy']:.3f}",
                         f"{report['test_accuracy']:.3f}", epochs_pipe, epochs_plain, f"{pipe.peak_rss_mib:.0f}",
                         f"{plain.peak_rss_mib:.0f}", f"{pipe.load[0]:.2f}"))
            shutil.rmtree(root, ignore_errors=True)
    rows.append(("median", harness.median([r[1] for r in rows]), harness.median([r[2] for r in rows]),
                 f"{harness.median(ratios):.2f}", "", "", "", "", "", "", ""))
    print(harness.table(("run", "`dvc repro` s", "plain Keras s", "ratio", "pipeline test acc", "plain test acc",
                         "pipeline epochs (src+head+ft)", "plain epochs", "pipeline peak RSS MiB",
                         "plain peak RSS MiB", "load 1 min"), rows))
    names = list(stages[0])
    print()
    print(harness.table(("stage", *(f"run {i + 1} s" for i in range(len(stages))), "median s"),
                        [(name, *(s.get(name, 0.0) for s in stages), harness.median([s.get(name, 0.0) for s in stages]))
                         for name in names]))
    print(f"\nGoal: ratio <= 1.5. Median ratio {harness.median(ratios):.2f}.")


if __name__ == "__main__":
    main()
