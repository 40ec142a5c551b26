"""The label-budget sweep and the transfer-gain report it is built on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from components.apps import sweep
from tests.conftest import write_shrunk_params_yaml


@pytest.mark.slow
def test_the_sweep_runs_the_real_stages_per_budget_and_draws_both_curves(tmp_path: Path) -> None:
    params_yaml = write_shrunk_params_yaml(tmp_path / "params.yaml", {"finetune.head_epochs": 2})
    out = tmp_path / "sweep"
    assert sweep.main(["--params", str(params_yaml), "--budgets", "3", "6", "--out", str(out)]) == 0

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [int(row["labels_per_class"]) for row in rows] == [3, 6]
    for row in rows:
        assert 0 <= float(row["transfer_accuracy"]) <= 1 and 0 <= float(row["scratch_accuracy"]) <= 1
        assert float(row["gain"]) == pytest.approx(float(row["transfer_accuracy"]) - float(row["scratch_accuracy"]),
                                                   abs=1e-5)
    summary = json.loads((out / "sweep.json").read_text())["mean_by_budget"]
    assert [row["labels_per_class"] for row in summary] == [3, 6]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "data").exists(), "the sweep wrote outside its temporary workspace"
