"""Orchestration overhead: a no-op `dvc repro` against DVC's own floor, and the Prefect flow against `dvc repro`.

    .venv/bin/python bench/bench_orchestration.py [--runs 3] [--quick] [--prefect] [--upto STAGE] [--ref HEAD]

No-op: a temporary repository where the whole pipeline has run once (shrunk by --quick), then
`dvc repro` with everything up to date, against a trivial two-stage DVC pipeline (`echo` into a
file, `cat` it into another) in its own temporary repository: DVC's floor. Both alternate,
--runs times each. Also timed alone: `tlpipe stage ingest` with its inputs unchanged (the stage is
always_changed, so it runs in every no-op repro) and `dvc status`.

--prefect: from a clean state each time (a fresh repository per run), `dvc repro STAGE` against
`tlpipe run --stages <ingest .. STAGE>` (the Prefect flow, the same stages in one process),
alternating. Prefect gets a private PREFECT_HOME whose database one untimed flow run creates
first, as it would exist on a user's machine after their first run; no server is configured, so
each flow run starts Prefect's temporary local server, the README's default.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import harness

QUICK = {"source.epochs": 1, "finetune.head_epochs": 1, "finetune.epochs": 1, "clean.target_train_per_class": 20,
         "evaluate.min_accuracy": 0.0, "evaluate.min_macro_f1": 0.0}
FLOOR_DVC_YAML = """stages:
  first:
    cmd: echo hello > a.txt
    outs: [a.txt]
  second:
    cmd: cat a.txt > b.txt
    deps: [a.txt]
    outs: [b.txt]
"""


def floor_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(FLOOR_DVC_YAML)
    harness.init_repo(root)
    harness.timed(["dvc", "repro"], root)
    return root


def noop(temp: Path, runs: int, overrides: dict, ref: str | None, keep: Path | None) -> str:
    pipeline = keep or temp / "pipeline"
    if not (pipeline / "dvc.lock").is_file():
        harness.make_repo(pipeline, overrides, ref)
    # The first repro runs everything (or, in a kept copy, refreshes DVC's file-state cache): untimed.
    first = harness.timed(["dvc", "repro"], pipeline)
    floor = floor_repo(temp / "floor")
    rows, times = [], {"pipeline": [], "floor": [], "ingest": [], "status": []}
    loads = []
    for run in range(runs):
        for name, root in (("pipeline", pipeline), ("floor", floor))[:: 1 if run % 2 == 0 else -1]:
            result = harness.timed(["dvc", "repro"], root)
            if name == "pipeline":
                ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
                if ran - {"ingest"}:
                    raise RuntimeError(f"a no-op repro reran {sorted(ran)}")
            times[name].append(result.seconds)
            loads.append(result.load)
        times["ingest"].append(harness.timed(["tlpipe", "stage", "ingest"], pipeline).seconds)
        times["status"].append(harness.timed(["dvc", "status"], pipeline).seconds)
        rows.append((run + 1, times["pipeline"][-1], times["floor"][-1], times["pipeline"][-1] / times["floor"][-1],
                     times["ingest"][-1], times["status"][-1], f"{loads[-1][0]:.2f}"))
    med = {k: harness.median(v) for k, v in times.items()}
    ratios = [p / f for p, f in zip(times["pipeline"], times["floor"])]
    rows.append(("median", med["pipeline"], med["floor"], harness.median(ratios), med["ingest"], med["status"], ""))
    return "\n".join([
        f"First `dvc repro` (set-up, not a result): {first.seconds:.0f} s.",
        "",
        harness.table(("run", "no-op `dvc repro` s", "DVC floor s", "ratio", "`tlpipe stage ingest` alone s",
                       "`dvc status` s", "load 1 min"), rows),
        "",
        f"Goal: no-op <= 2 s. Median {med['pipeline']:.2f} s, "
        f"{med['pipeline'] - med['floor']:+.2f} s over DVC's floor.",
    ])


def prefect(temp: Path, runs: int, overrides: dict, upto: str, ref: str | None) -> str:
    stages = []
    for name in harness.stage_names():
        stages.append(name)
        if name == upto:
            break
    home = temp / "prefect-home"
    extra = {"PREFECT_HOME": str(home)}
    warm = harness.make_repo(temp / "warm", overrides, ref)
    harness.timed(["tlpipe", "run", "--stages", "ingest"], warm, extra)  # creates Prefect's database, untimed
    rows, dvc_times, flow_times, loads = [], [], [], []
    for run in range(runs):
        for side in ("dvc", "prefect")[:: 1 if run % 2 == 0 else -1]:
            root = harness.make_repo(temp / f"{side}-{run}", overrides, ref)
            if side == "dvc":
                dvc_times.append(harness.timed(["dvc", "repro", upto], root).seconds)
            else:
                flow_times.append(harness.timed(["tlpipe", "run", "--stages", *stages], root, extra).seconds)
            loads.append(os.getloadavg())
        rows.append((run + 1, dvc_times[-1], flow_times[-1], flow_times[-1] - dvc_times[-1],
                     flow_times[-1] / dvc_times[-1], f"{loads[-1][0]:.2f}"))
    added = [f - d for f, d in zip(flow_times, dvc_times)]
    rows.append(("median", harness.median(dvc_times), harness.median(flow_times), harness.median(added),
                 harness.median([f / d for f, d in zip(flow_times, dvc_times)]), ""))
    return "\n".join([
        f"Stages: {' -> '.join(stages)}, from a clean state each run.",
        "",
        harness.table(("run", "`dvc repro` s", "Prefect flow s", "Prefect - DVC s", "ratio", "load 1 min"), rows),
        "",
        f"Goal: Prefect adds <= 10 s. Median difference {harness.median(added):+.1f} s.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="1 training epoch per phase (the no-op and the "
                                                                "orchestration cost do not depend on it)")
    parser.add_argument("--prefect", action="store_true", help="also compare the Prefect flow with dvc repro")
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op comparison")
    parser.add_argument("--upto", default="export", help="the last stage of the Prefect comparison (default: all)")
    parser.add_argument("--keep", type=Path, help="the no-op's pipeline repository: set up here, or reused")
    args = parser.parse_args()
    harness.cache_bytecode(args.pycache)
    overrides = QUICK if args.quick else {}
    with tempfile.TemporaryDirectory(prefix="tlpipe-orchestration-") as temp:
        if not args.no_noop:
            print(harness.header("Orchestration: no-op `dvc repro` vs DVC's floor"))
            print(noop(Path(temp), args.runs, overrides, args.ref, args.keep))
        if args.prefect:
            print()
            print(harness.header("Orchestration: Prefect flow vs `dvc repro`, same stages"))
            print(prefect(Path(temp), args.runs, overrides, args.upto, args.ref))


if __name__ == "__main__":
    main()
