"""The console a person reads: no library noise, each stage's warnings at its end, all of them in the summary."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from components.apps.summary import summary
from components.core.artifacts import write_json
from components.core.console import stage_warnings
from tests.conftest import REPO, shrunk_params


def test_importing_tensorflow_and_great_expectations_prints_nothing() -> None:
    code = ("from components.core.console import setup\nsetup()\n"
            "import great_expectations, tensorflow, keras\nimport logging\n"
            "logging.getLogger('components.x').info('own line')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].endswith("components.x: own line"), lines  # absl, oneDNN, GX: silent


def test_a_stage_ends_with_its_warnings_and_the_summary_repeats_every_warning_of_the_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = shrunk_params(tmp_path, {"evaluate.min_accuracy": 0.9})
    caplog.set_level(logging.INFO)
    with stage_warnings("clean", params.paths.warnings):
        logging.getLogger("components.clean").warning("split shares off their fractions")
        logging.getLogger("great_expectations").warning("a library's warning is not the stage's")
    assert "clean: 1 warning(s)" in caplog.text and "  - split shares off their fractions" in caplog.text
    # What the reports say about the run: a 3-image validation split, a weak source model.
    per_class = {"5": {"train": 20, "val": 3, "test": 9}, "6": {"train": 20, "val": 6, "test": 8}}
    counts = {"input": 66, "kept": 66, "quarantined": 0, "held_back": 0, "splits": {"train": 40, "val": 9, "test": 17},
              "per_class": per_class}
    write_json(params.paths.quarantine, {"quarantined": [], "counts": {"target": counts}})
    write_json(params.paths.source_report, {"mode": "train", "test_accuracy": 0.63, "total_seconds": 1.0})
    text = summary(params)
    block = text[text.index("warnings: 3"):]
    assert "clean: split shares off their fractions" in block
    assert "target class '5' has 3 val images" in block and "'6'" not in block
    assert "source model reached test accuracy 0.6300" in block
    assert json.loads((params.paths.warnings / "clean.json").read_text())["warnings"] == ["split shares off their fractions"]
