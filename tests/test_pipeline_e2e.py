"""The whole graph through `dvc repro`, in a temporary copy of the repository, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_shrunk_params_yaml

BIN = Path(sys.executable).parent


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository holding the project's code, dvc.yaml and a shrunk params.yaml."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("components", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    write_shrunk_params_yaml(root / "params.yaml")
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


def test_dvc_repro_runs_every_stage_for_real(repo: Path) -> None:
    output = _run(["dvc", "repro"], repo).stdout
    assert _ran(output) == {"ingest", "validate", "clean", "source", "transfer", "finetune", "evaluate", "export"}

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]) == {"5", "6", "7", "8", "9"}
    assert json.loads((repo / "reports/gates.json").read_text())["passed"] is True
    export = json.loads((repo / "reports/export.json").read_text())
    assert export["max_abs_diff"] <= 1e-4
    quarantine = json.loads((repo / "reports/quarantine.json").read_text())
    assert quarantine["reconciled"] is True

    image = next((repo / "data/raw/target/7").glob("*.png"))
    predicted = _run([str(BIN / "tlpipe"), "predict", "models/model.onnx", str(image)], repo).stdout
    assert predicted.split("\t")[1] in {"5", "6", "7", "8", "9"}


def test_second_repro_reruns_nothing_and_a_gate_change_reruns_only_evaluation(repo: Path) -> None:
    again = _run(["dvc", "repro"], repo)
    assert _ran(again.stdout) <= {"ingest"}, "ingest only checks its inputs; nothing else may rerun"
    assert "nothing rewritten" in again.stderr + again.stdout

    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("min_accuracy: 0.0", "min_accuracy: 0.01"))
    changed = _run(["dvc", "repro"], repo).stdout
    assert _ran(changed) - {"ingest"} <= {"evaluate", "export"}
    assert "evaluate" in _ran(changed)
