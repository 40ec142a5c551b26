"""Start-up cost: stages that do not train never pay for TensorFlow, and the CLI imports nothing heavy.

Importing TensorFlow takes 5 to 25 s on 2 cores, and every `dvc repro` stage is its own process,
so a stray top-level import shows up in every run. Each check is a fresh interpreter: in this
process pytest and other tests may already have imported anything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("tensorflow", "keras", "jax", "torch", "great_expectations", "prefect", "dvc", "tf2onnx", "pandas")


def loaded_after(code: str) -> set[str]:
    """The HEAVY top-level packages in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


# evaluate loads the Keras model inside run() (it must predict), so only its import is free.
@pytest.mark.parametrize("stage", ["ingest", "validate", "clean", "evaluate"])
def test_a_stage_that_does_not_train_imports_no_tensorflow(stage: str) -> None:
    loaded = loaded_after(f"import components.{stage}")
    assert not loaded & {"tensorflow", "keras", "jax", "torch"}, f"components.{stage} imports {sorted(loaded)}"


def test_the_cli_imports_nothing_heavy_before_it_dispatches() -> None:
    loaded = loaded_after("from components.apps.cli import build_parser\nbuild_parser().parse_args(['stage', 'ingest'])")
    assert not loaded, f"the tlpipe CLI imports {sorted(loaded)} before choosing a command"


def test_listing_the_stages_imports_no_stage() -> None:
    loaded = loaded_after("from components.apps.cli import main\nmain(['stages'])")
    assert not loaded, f"`tlpipe stages` imports {sorted(loaded)}"


def test_the_tlpipe_command_ends_a_stage_early_with_its_outputs_and_log_complete(tmp_path) -> None:
    """`tlpipe stage` skips Python's teardown (components.apps.cli._exit_now); nothing it wrote may be lost."""
    from pathlib import Path

    from components.apps.cli import main
    import shutil

    from tests.conftest import raw_files, write_shrunk_params_yaml

    shutil.copy(REPO / "dvc.yaml", tmp_path)  # the CLI finds its stages there
    params_yaml = write_shrunk_params_yaml(tmp_path / "params.yaml")
    tlpipe = Path(sys.executable).parent / "tlpipe"
    result = subprocess.run([str(tlpipe), "stage", "ingest", "--params", str(params_yaml)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tlpipe: ingest: done" in result.stderr.splitlines()[-1]  # the last log line, flushed before the exit
    raw = tmp_path / "data" / "raw"
    record = json.loads((raw / ".ingest.json").read_text())
    for task, count in record["images"].items():  # every file in its pack, the index complete
        assert len(raw_files(raw / task)) == count > 0

    # An error still exits 1 with its message, the normal way.
    failed = subprocess.run([str(tlpipe), "stage", "ingest", "--params", str(tmp_path / "missing.yaml")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "missing.yaml not found" in failed.stderr

    # Called as a function, main() returns: only the tlpipe command ends its own process early.
    assert main(["stage", "ingest", "--params", str(params_yaml)]) == 0
