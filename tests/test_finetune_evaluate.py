"""Stages `finetune` and `evaluate`: two-phase training, metrics and the gates that stop a bad model."""

from __future__ import annotations

import json

import pytest

from components import evaluate, finetune, source, transfer
from components.core.config import Params, with_overrides
from components.core.errors import PipelineError
from components.training.models import load_model_dir


@pytest.fixture
def transferred(clean_dataset: Params) -> Params:
    params = with_overrides(clean_dataset, {"source.epochs": 3, "source.batch_size": 16})
    source.run(params)
    transfer.run(params)
    return params


# Three classes (chance 1/3); measured: accuracy 1.0 on the 24 test images (2026-12-01, same seed).
LEARNED = 0.9


def test_finetune_trains_both_phases_and_evaluate_reports_and_passes(transferred: Params) -> None:
    params = with_overrides(transferred, {"finetune.head_epochs": 3, "finetune.epochs": 2,
                                          "finetune.batch_size": 16, "evaluate.min_accuracy": LEARNED})
    finetune.run(params)

    report = json.loads(params.paths.finetune_report.read_text())
    assert set(report["phases"]) == {"head", "unfrozen"}
    assert report["kept_phase"] in ("head", "unfrozen")
    curves = params.paths.training_curves / "finetune" / "plots" / "metrics" / "val_loss.tsv"
    assert len(curves.read_text().splitlines()) == 1 + sum(p["epochs_run"] for p in report["phases"].values())

    result = evaluate.run(params)
    metrics = json.loads(params.paths.metrics.read_text())
    assert metrics["accuracy"] == result.accuracy >= LEARNED
    assert set(metrics["per_class"]) == {"x", "y", "z"}
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["test_images"] == 24
    gates = json.loads(params.paths.gates.read_text())
    assert gates["passed"] is True
    assert [g["name"] for g in gates["gates"]] == ["min_accuracy", "min_macro_f1"]
    assert params.paths.confusion.read_text().splitlines()[0] == "actual,predicted"
    assert params.paths.confusion_png.read_bytes()[:4] == b"\x89PNG"


def test_a_failed_gate_fails_evaluate_with_the_reason_and_keeps_the_reports(transferred: Params) -> None:
    # No training at all: the head is random, far below a 0.99 accuracy gate.
    params = with_overrides(transferred, {"finetune.head_epochs": 0, "finetune.epochs": 0,
                                          "evaluate.min_accuracy": 0.99})
    finetune.run(params)
    with pytest.raises(PipelineError, match=r"gates failed \(min_accuracy: 0\.\d+ < 0\.99"):
        evaluate.run(params)
    gates = json.loads(params.paths.gates.read_text())
    assert gates["passed"] is False
    assert next(g for g in gates["gates"] if g["name"] == "min_accuracy")["passed"] is False


def test_unfreeze_top_n_leaves_lower_layers_frozen(transferred: Params) -> None:
    params = with_overrides(transferred, {"finetune.unfreeze_top": 2, "finetune.head_epochs": 0})
    model, _ = load_model_dir(params.paths.transferred_model)
    names = finetune.unfreeze_top(model, 2)
    assert names == ["block3_conv2"]  # the top two weighted layers, less block3_bn2: BatchNorm stays frozen
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("block3_conv2").trainable and not backbone.get_layer("block1_conv1").trainable
    assert not backbone.get_layer("block3_bn2").trainable
    assert len(model.trainable_weights) == 1 + 2  # conv kernel, head kernel and bias


@pytest.mark.slow  # ~40 s on 2 cores: keeps make test within its 10-minute budget
def test_compare_scratch_reports_the_transfer_gain_and_its_gate_fails_on_too_little(transferred: Params) -> None:
    # A gain of 1.0 (transfer right, scratch always wrong) cannot be met: the gate must fail, with the reason.
    params = with_overrides(transferred, {"evaluate.compare_scratch": True, "evaluate.min_transfer_gain": 1.0})
    finetune.run(params)
    with pytest.raises(PipelineError, match=r"min_transfer_gain: -?\d\.\d+ < 1\.0"):
        evaluate.run(params)
    gain = json.loads(params.paths.transfer_gain.read_text())
    metrics = json.loads(params.paths.metrics.read_text())
    assert gain["compared"] is True and gain["transfer_accuracy"] == metrics["accuracy"]
    assert gain["accuracy_gain"] == pytest.approx(gain["transfer_accuracy"] - gain["scratch_accuracy"], abs=1e-5)
    assert gain["scratch"]["epochs"] >= 1 and gain["transfer"]["epochs"] == 2  # shrunk: 1 head + 1 unfrozen
    for side, other in (("transfer", "scratch_best"), ("scratch", "transfer_best")):
        reached = gain[side][f"to_reach_{other}"]
        assert reached["epochs"] is None or 1 <= reached["epochs"] <= gain[side]["epochs"]
    gate = next(g for g in json.loads(params.paths.gates.read_text())["gates"] if g["name"] == "min_transfer_gain")
    assert gate["passed"] is False and gate["threshold"] == 1.0
