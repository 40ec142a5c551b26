"""Stages `finetune` and `evaluate`: two-phase training, metrics and the gates that stop a bad model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from components import evaluate, finetune, scratch, source, transfer
from components.core.config import Params, with_overrides
from components.core.errors import PipelineError
from components.training.models import build_model
from components.training.trainability import set_phase
from components.training.trainer import class_weights
from tests.conftest import REPO


@pytest.fixture
def transferred(clean_dataset: Params) -> Params:
    params = with_overrides(clean_dataset, {"source.epochs": 3, "source.batch_size": 16})
    source.run(params)
    transfer.run(params)
    return params


# Three classes (chance 1/3); measured: accuracy 1.0 on the 24 test images (2026-12-01, same seed).
LEARNED = 0.9


CONVS = [f"backbone.block{b}_conv{n}" for b in (1, 2, 3) for n in (1, 2)]


def test_finetune_trains_both_phases_and_evaluate_reports_and_passes(transferred: Params,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    params = with_overrides(transferred, {"finetune.head_epochs": 3, "finetune.epochs": 2,
                                          "finetune.batch_size": 16, "evaluate.min_accuracy": LEARNED})
    with caplog.at_level("INFO", logger="components.finetune"):
        finetune.run(params)

    report = json.loads(params.paths.finetune_report.read_text())
    assert set(report["phases"]) == {"head", "unfrozen"}
    # What each phase trained, said once: the head alone, then every convolution (BatchNorm never).
    assert report["trainable"] == {"head": ["head"], "unfrozen": [*CONVS, "head"]}
    said = [r.getMessage() for r in caplog.records if r.name == "components.finetune" and " phase: " in r.getMessage()]
    assert said == ["head phase: training head only, backbone frozen (12 layers)",
                    "unfrozen phase: training head and 6 backbone layers (6 frozen, BatchNorm included): "
                    + ", ".join(path.split(".")[1] for path in CONVS)]
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


@pytest.mark.parametrize(("phase", "top", "backbone"), [
    ("head", -1, []),  # the head phase ignores unfreeze_top
    ("unfrozen", 2, ["backbone.block3_conv2"]),  # the top two weighted layers, less block3_bn2
    ("unfrozen", -1, CONVS),
    ("unfrozen", 99, CONVS),
    ("unfrozen", 0, []),
])
def test_one_function_decides_what_trains_in_each_phase_and_batchnorm_never_does(
        params: Params, phase: str, top: int, backbone: list[str]) -> None:
    model = build_model(params.model, params.data, 3, bn_inference=True)
    trainable = set_phase(model, phase, top)  # type: ignore[arg-type]

    assert list(trainable.backbone) == backbone and trainable.others == ("head",)
    assert trainable.frozen == 12 - len(backbone)
    layers = model.get_layer("backbone")
    assert sorted(f"backbone.{layer.name}" for layer in layers.layers if layer.trainable_weights) == sorted(backbone)
    assert not any(layer.trainable for layer in layers.layers if "_bn" in layer.name)
    assert len(model.trainable_weights) == len(backbone) + 2  # each conv's kernel (no bias), head kernel and bias


def test_class_weights_are_scikit_learns_balanced_weights_and_zero_for_an_absent_class() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 30 + [1] * 5 + [2] * 12 + [3] * 3)
    ours = class_weights(labels, 4)
    np.testing.assert_allclose([ours[k] for k in range(4)],
                               compute_class_weight("balanced", classes=np.arange(4), y=labels), rtol=1e-12)
    assert class_weights(labels, 5)[4] == 0.0  # scikit-learn refuses a class with no image


@pytest.mark.slow  # ~40 s on 2 cores: keeps make test within its 10-minute budget
def test_the_scratch_stage_feeds_the_transfer_gain_and_its_gate_fails_on_too_little(transferred: Params) -> None:
    # A gain of 1.0 (transfer right, scratch always wrong) cannot be met: the gate must fail, with the reason.
    params = with_overrides(transferred, {"scratch.enabled": True, "evaluate.min_transfer_gain": 1.0})
    finetune.run(params)
    with pytest.raises(PipelineError, match="run the scratch stage first"):
        evaluate.run(params)  # no baseline yet: the gate cannot be judged
    assert scratch.run(params).trained
    with pytest.raises(PipelineError, match=r"min_transfer_gain: -?\d\.\d+ < 1\.0"):
        evaluate.run(params)
    gain = json.loads(params.paths.transfer_gain.read_text())
    metrics = json.loads(params.paths.metrics.read_text())
    baseline = json.loads(params.paths.scratch_report.read_text())
    assert gain["compared"] is True and gain["transfer_accuracy"] == metrics["accuracy"]
    assert gain["scratch_accuracy"] == baseline["test_accuracy"]
    assert gain["accuracy_gain"] == pytest.approx(gain["transfer_accuracy"] - gain["scratch_accuracy"], abs=1e-5)
    assert gain["scratch"]["epochs"] >= 1 and gain["transfer"]["epochs"] == 2  # shrunk: 1 head + 1 unfrozen
    for side, other in (("transfer", "scratch_best"), ("scratch", "transfer_best")):
        reached = gain[side][f"to_reach_{other}"]
        assert reached["epochs"] is None or 1 <= reached["epochs"] <= gain[side]["epochs"]
    gate = next(g for g in json.loads(params.paths.gates.read_text())["gates"] if g["name"] == "min_transfer_gain")
    assert gate["passed"] is False and gate["threshold"] == 1.0


def test_the_scratch_stage_switched_off_costs_nothing_and_evaluate_compares_nothing(params: Params) -> None:
    # In a fresh interpreter, as `tlpipe stage scratch` runs it: a skipped report, and Keras never imported.
    code = ("import sys, json; from components import scratch; from components.core.config import Params; "
            f"print(scratch.run(Params.model_validate_json({params.model_dump_json(by_alias=True)!r}))); "
            "assert 'keras' not in sys.modules, 'the skipped stage imported Keras'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout
    assert json.loads(params.paths.scratch_report.read_text()) == {"trained": False,
                                                                  "reason": "scratch.enabled is false"}
    assert evaluate.transfer_gain(params, 0.9) == {"compared": False}
