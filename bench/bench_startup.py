"""Start-up cost of each stage's entry point, and which heavy libraries a stage really loads.

    .venv/bin/python bench/bench_startup.py [--runs 3] [--run] [--ref HEAD]

Import: for each stage module (and the CLI, the flow, and the bare libraries for scale), a fresh
`python -c 'import components.X'` per run: wall time of the whole process (interpreter start
included) and the import alone, median of --runs, and the heavy libraries in sys.modules after it.
--run: also runs every stage once through the CLI in a temporary repository (a shrunk
params.yaml: 1 epoch each, since only imports matter here) and lists what each stage had loaded
when it finished; a stage that does not train must not have loaded TensorFlow.
Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

HEAVY = ("tensorflow", "keras", "jax", "great_expectations", "pandas", "sklearn", "scipy", "matplotlib",
         "prefect", "dvc", "dvclive", "onnx", "onnxruntime", "tf2onnx")
TARGETS = ("components.apps.cli", "components.ingest", "components.validate", "components.clean", "components.source",
           "components.transfer", "components.finetune", "components.evaluate", "components.export",
           "flows.pipeline")
BASELINES = ("keras", "tensorflow", "great_expectations", "prefect")
# What the measured process prints: its own import time and the heavy modules it holds.
PROBE = ("import sys, time, json; t = time.perf_counter(); import {module}; "
         "print(json.dumps([time.perf_counter() - t, sorted(m for m in {heavy!r} if m in sys.modules)]))")
# Runs one stage through the CLI, in process, then reports the same.
RUN_PROBE = ("import sys, json; from components.apps.cli import main; code = main(['stage', {stage!r}]); "
             "print('@@' + json.dumps([code, sorted(m for m in {heavy!r} if m in sys.modules)]))")
SHRINK = {"source.epochs": 1, "finetune.head_epochs": 1, "finetune.epochs": 1, "clean.target_train_per_class": 20,
          "evaluate.min_accuracy": 0.0, "evaluate.min_macro_f1": 0.0, "export.variants": []}


def probe(module: str, cwd: Path, runs: int) -> tuple[float, float, list[str]]:
    walls, imports, loaded = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)], cwd=cwd,
                             env=harness.env(PYTHONPATH=str(cwd)), capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - start)
        seconds, loaded = json.loads(out.stdout.strip().splitlines()[-1])
        imports.append(seconds)
    return harness.median(walls), harness.median(imports), loaded


def import_table(cwd: Path, runs: int) -> str:
    rows = []
    for module in ("pass", *BASELINES, *TARGETS):
        if module == "pass":
            wall, alone, loaded = probe("sys", cwd, runs)
            module = "(interpreter only)"
        else:
            wall, alone, loaded = probe(module, cwd, runs)
        rows.append((f"`{module}`", f"{wall:.2f}", f"{alone:.2f}", "yes" if "tensorflow" in loaded else "no",
                     ", ".join(m for m in loaded if m != "tensorflow") or "-"))
    return harness.table(("import", "process wall s", "import s", "TensorFlow", "other heavy modules"), rows)


def run_table(ref: str | None) -> str:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlpipe-startup-") as temp:
        root = harness.make_repo(Path(temp) / "repo", SHRINK, ref)
        for stage in ("ingest", "validate", "clean", "source", "transfer", "finetune", "evaluate", "export"):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", RUN_PROBE.format(stage=stage, heavy=HEAVY)], cwd=root,
                                 env=harness.env(PYTHONPATH=str(root)), capture_output=True, text=True)
            seconds = time.perf_counter() - start
            line = next((s for s in out.stdout.splitlines() if s.startswith("@@")), None)
            if line is None:
                raise RuntimeError(f"stage {stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            code, loaded = json.loads(line[2:])
            if code:
                raise RuntimeError(f"stage {stage} exited {code}:\n{out.stderr[-3000:]}")
            rows.append((stage, f"{seconds:.1f}", "yes" if "tensorflow" in loaded else "no",
                         ", ".join(m for m in loaded if m != "tensorflow") or "-"))
    return harness.table(("stage (run through the CLI)", "process wall s", "TensorFlow loaded", "other heavy modules"),
                         rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, pycache_help="also measure with compiled bytecode cached here")
    parser.add_argument("--run", action="store_true", help="also run each stage once and list what it loaded")
    args = parser.parse_args()
    print(harness.header("Start-up: import time per entry point"))
    with tempfile.TemporaryDirectory(prefix="tlpipe-startup-") as temp:
        root = harness.make_repo(Path(temp) / "repo", ref=args.ref) if args.ref else harness.REPO
        print(import_table(root, args.runs))
        if args.pycache:
            harness.cache_bytecode(args.pycache)
            print(f"\nThe same with {harness.bytecode_note()}:\n")
            print(import_table(root, args.runs))
            harness.cache_bytecode(None)
    print(f"\nload average at end: {'/'.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.run:
        print()
        print(run_table(args.ref))
        print(f"\nload average at end: {'/'.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
