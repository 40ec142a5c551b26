"""What the run report costs: `dvc repro` of the default pipeline with the report stage against without it.

    .venv/bin/python bench/bench_report.py [--runs 2] [--ref HEAD]

Each run: two fresh temporary repositories (no data, no models, no DVC cache) with the same code
and params.yaml; one has dvc.yaml as committed, the other the same graph without the `report`
stage (and without export's dependency on its page, so export skips the bundle's copy). Both run
a full `dvc repro`, alternating which goes first; the table gives each wall time, their ratio, the
report stage's own seconds from the stage log (`HH:MM:SS tlpipe: report: done`) and its share of its
run, and the evaluate and export stages of both sides (evaluate writes the explained errors, export
the bundle's copy). On a shared machine the totals swing by more than the report costs; the share
of the stage in its own run is the steadier figure.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import harness
import yaml

from bench_end_to_end import stage_seconds


def without_report(repo: Path) -> None:
    """Drop the report stage from the repository's dvc.yaml and commit."""
    graph = yaml.safe_load((repo / "dvc.yaml").read_text())
    graph["stages"].pop("report")
    export = graph["stages"]["export"]
    export["deps"] = [dep for dep in export["deps"] if dep != "${paths.report}"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    for command in (["git", "add", "-A"], ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "x"]):
        harness.subprocess.run(command, cwd=repo, env=harness.env(), check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, pycache_help="cache compiled bytecode here")
    args = parser.parse_args()
    harness.cache_bytecode(args.pycache)
    rows, loads = [], []
    with tempfile.TemporaryDirectory(prefix="bench-report-") as temp:
        for run in range(args.runs):
            seconds, stages = {}, {}
            sides = ["with", "without"] if run % 2 == 0 else ["without", "with"]
            for side in sides:
                repo = harness.make_repo(Path(temp) / side, ref=args.ref)
                if side == "without":
                    without_report(repo)
                started = datetime.datetime.now()
                result = harness.timed(["dvc", "repro"], repo)
                loads.append(result.load)
                seconds[side] = result.seconds
                stages[side] = stage_seconds(result.stdout, started)
                if side == "with":
                    assert (repo / "reports" / "report.html").is_file() and (repo / "models/bundle/report.html").is_file()
            report_stage = stages["with"].get("report", float("nan"))
            rows.append([run + 1, " then ".join(sides), seconds["with"], seconds["without"],
                         seconds["with"] / seconds["without"], report_stage, report_stage / seconds["with"],
                         *(f"{stages['with'].get(n, 0):.0f} / {stages['without'].get(n, 0):.0f}"
                           for n in ("evaluate", "export"))])
            print(f"run {run + 1}: with {seconds['with']:.1f} s, without {seconds['without']:.1f} s", file=sys.stderr)
    ratios, shares = [row[4] for row in rows], [row[6] for row in rows]
    print(harness.header("The report stage's cost in a full dvc repro of the default pipeline"))
    print(harness.table(["run", "order", "with report (s)", "without (s)", "ratio", "report stage (s, log)",
                         "report stage / with", "evaluate s (with / without)", "export s (with / without)"], rows))
    print(f"\nmedian ratio {harness.median(ratios):.3f}; median share of the report stage in its run "
          f"{harness.median(shares):.3f}; 1-minute load during the runs {harness.load_text(loads)}")


if __name__ == "__main__":
    main()
