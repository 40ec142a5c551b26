"""Drift: the first dataset becomes the reference, a like-for-like batch passes, a shifted one is stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import ingest, validate
from components.data import drift
from components.core.errors import PipelineError
from tests.conftest import shrunk_params, write_class_folders


def test_a_shifted_batch_is_flagged_and_an_unshifted_one_passes(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=10)
    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=12)
    params = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target)})
    ingest.run(params)
    validate.run(params)
    first = json.loads(params.paths.drift_report.read_text())
    assert first["passed"] and first["status"] == drift.NO_REFERENCE
    reference = params.paths.drift_reference.read_text()

    # More images from the same distribution: a retraining batch with no drift.
    more = write_class_folders(tmp_path / "more", ["a", "b"], per_class=6, seed=3)
    for path in more.glob("*/*.png"):
        shutil.copyfile(path, target / path.parent.name / f"new_{path.name}")
    ingest.run(params)
    validate.run(params)
    report = json.loads(params.paths.drift_report.read_text())
    assert report["passed"] and report["checks"] and all(c["passed"] for c in report["checks"])
    accepted = params.paths.drift_reference.read_text()
    assert accepted != reference and json.loads(accepted)["stats"]["target"]["images"] == 36  # the new reference

    # The same folders, 90 levels brighter: a new camera, say.
    for path in target.glob("*/*.png"):
        pixels = np.asarray(Image.open(path), dtype=np.int16)
        Image.fromarray(np.clip(pixels + 90, 0, 255).astype(np.uint8)).save(path)
    ingest.run(params)
    with pytest.raises(PipelineError) as failure:
        validate.run(params)
    message = str(failure.value)
    assert "the data drifted from the last validated dataset (target.r_mean_change: " in message
    assert "source." not in message.split("(details")[0]  # only what drifted is named
    assert "tlpipe drift accept" in message
    report = json.loads(params.paths.drift_report.read_text())
    assert not report["passed"]
    flagged = {c["name"] for c in report["checks"] if not c["passed"]}
    assert {"target.r_mean_change", "target.g_mean_change", "target.b_mean_change"} <= flagged
    assert all(name.startswith("target.") and name.endswith(("_mean_change", "_std_change")) for name in flagged)
    assert params.paths.drift_reference.read_text() == accepted  # a drifted dataset never becomes the reference

    # Not gated: reported, not failed.
    ungated = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target),
                                       "validate.drift_gate": False})
    assert validate.run(ungated).success
    assert not json.loads(params.paths.drift_report.read_text())["passed"]


def test_another_dataset_records_its_own_reference_and_an_intended_change_is_accepted_by_one_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from components.apps.cli import main
    from tests.conftest import write_shrunk_params_yaml

    # The embedded digits first, as after `make run`.
    digits = shrunk_params(tmp_path)
    ingest.run(digits)
    validate.run(digits)
    assert json.loads(digits.paths.drift_report.read_text())["status"] == drift.NO_REFERENCE

    # Then the user's own folders: another dataset, so a new reference, not 12 exceeded bounds.
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=10, size=(40, 30), mode="RGB")
    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=12, size=(40, 30), mode="RGB")
    own = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target)})
    ingest.run(own)
    assert validate.run(own).success
    report = json.loads(own.paths.drift_report.read_text())
    assert report["status"] == drift.NEW_DATASET and report["checks"] == []
    assert "source source" in report["changed"] and "target classes" in report["changed"]
    assert json.loads(own.paths.drift_reference.read_text())["dataset"]["target"]["classes"] == ["a", "b"]

    # An intended change of the same dataset (brighter images) is stopped, then accepted by one command.
    for path in target.glob("*/*.png"):
        pixels = np.asarray(Image.open(path), dtype=np.int16)
        Image.fromarray(np.clip(pixels + 90, 0, 255).astype(np.uint8)).save(path)
    ingest.run(own)
    with pytest.raises(PipelineError, match="tlpipe drift accept"):
        validate.run(own)
    params_file = write_shrunk_params_yaml(tmp_path / "params.yaml", {
        "data.source_dir": str(source), "data.target_dir": str(target)})
    assert main(["drift", "accept", "--params", str(params_file)]) == 0
    assert "accepted" in capsys.readouterr().out
    assert validate.run(own).success
    assert json.loads(own.paths.drift_report.read_text())["passed"]
