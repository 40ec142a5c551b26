"""Resume: a fine-tune run killed with SIGKILL continues from its last completed epoch when rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from components.core.config import Params
from components.training.models import build_model, load_model_dir, save_model_dir
from tests.conftest import REPO, shrunk_params, write_clean_split, write_shrunk_params_yaml


TEXTURES = ("x", "y", "z")


def write_texture_task(clean_dir: Path, per_split: dict[str, int], size: int, seed: int = 7) -> None:
    """A cleaned target task whose classes differ in texture, not position: x horizontal stripes,
    y vertical stripes, z a checkerboard (random phase and noise).

    The backbone ends in global average pooling, which throws position away: classes told apart by
    where a bar is (conftest's images) are near chance for it, texture is learned in a few epochs once
    its layers train. (A head on the untrained, frozen backbone of finetune_workspace stays near chance.)
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.indices((size, size))
    for split, count in per_split.items():
        images, labels = [], []
        for label in TEXTURES:
            for _ in range(count):
                phase = rng.integers(0, 4)
                stripes = {"x": (rows + phase) // 2 % 2, "y": (cols + phase) // 2 % 2,
                           "z": ((rows + phase) // 2 + (cols + phase) // 2) % 2}[label]
                pixels = stripes * rng.integers(150, 256) + rng.integers(0, 60, size=(size, size))
                images.append(np.clip(pixels, 0, 255).astype(np.uint8))
                labels.append(label)
        write_clean_split(clean_dir, "target", split, list(TEXTURES), images, labels)


def finetune_workspace(root: Path, extra: dict[str, object] | None = None) -> tuple[Params, Path]:
    """A cleaned target task and a transferred model under `root`, and its params.yaml.

    The model is built, not trained on a source task: fine-tuning does not care where its
    starting weights came from, and this keeps the subprocess tests short.
    """
    import keras

    params = shrunk_params(root, extra)
    write_texture_task(params.paths.clean, {"train": 24, "val": 8, "test": 16}, params.data.image_size)
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, 3, bn_inference=True)
    save_model_dir(model, TEXTURES, params.paths.transferred_model)
    return params, write_shrunk_params_yaml(root / "params.yaml", extra)


def start_stage(name: str, params_yaml: Path, env: dict[str, str] | None = None,
                command: list[str] | None = None) -> subprocess.Popen:
    """`tlpipe stage NAME` in a process of its own (or `command`, which runs it some other way)."""
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    command = command or [sys.executable, "-m", "components", "stage", name, "--params", str(params_yaml)]
    return subprocess.Popen(command, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def kill_after_epoch(process: subprocess.Popen, state_file: Path, epoch: int, within: float = 240) -> tuple[int, str]:
    """SIGKILL `process` once its checkpoint (state_file) records `epoch`; (the epoch seen, its output)."""
    killed_after = 0
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                killed_after = json.loads(state_file.read_text()).get("epoch", 0)
            except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or replaced under us
                killed_after = 0
            if killed_after >= epoch:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and killed_after < epoch:  # the deadline passed: stop it, the caller fails
            process.kill()
        output, _ = process.communicate(timeout=30)
    return killed_after, output or ""


def run_stage(name: str, params_yaml: Path, env: dict[str, str] | None = None, timeout: float = 300,
              command: list[str] | None = None) -> str:
    process = start_stage(name, params_yaml, env, command)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # timed out: never leave it running
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    return output


HEAD_EPOCHS = 8
# The subprocess tests train without augmentation: they check the training machinery, and a few
# epochs on unaugmented images are enough to learn their task.
NO_AUGMENT = {"finetune.augment_rotation": 0.0, "finetune.augment_zoom": 0.0, "finetune.augment_contrast": 0.0}


@pytest.mark.slow  # two stage subprocesses: over the default suite's time budget on 2 cores
def test_a_killed_finetune_resumes_from_its_last_epoch_and_finishes(tmp_path: Path) -> None:
    # Patience as long as the phase: no early stop, so the epoch count proves nothing was redone or lost.
    extra = {"finetune.head_epochs": HEAD_EPOCHS, "finetune.patience": HEAD_EPOCHS, "finetune.epochs": 2,
             "finetune.batch_size": 8, **NO_AUGMENT}
    params, params_yaml = finetune_workspace(tmp_path, extra)
    state_file = params.paths.finetune_checkpoint / "state.json"
    # JAX for both runs: it starts faster than TensorFlow, and a checkpoint resumes only under its own backend.
    process = start_stage("finetune", params_yaml, {"KERAS_BACKEND": "jax"})
    killed_after, _ = kill_after_epoch(process, state_file, 2)
    assert killed_after >= 2, "no checkpoint of epoch 2 within the deadline"
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert not params.paths.finetuned_model.exists(), "a killed run left a fine-tuned model behind"
    state = json.loads(state_file.read_text())  # the checkpoint is whole, whenever the kill came
    assert state["phase"] == "head" and state["epoch"] >= killed_after

    output = run_stage("finetune", params_yaml, {"KERAS_BACKEND": "jax"})
    assert f"head: resuming after epoch {state['epoch']} of {HEAD_EPOCHS}" in output
    report = json.loads(params.paths.finetune_report.read_text())
    head = report["phases"]["head"]
    assert report["resumed"] is True and head["resumed_from_epoch"] == state["epoch"]
    assert head["epochs_run"] == len(head["val_accuracy"]) == HEAD_EPOCHS
    assert "unfrozen" in report["phases"]
    curves = params.paths.training_curves / "finetune" / "plots" / "metrics" / "val_loss.tsv"
    # Continued, not restarted: one row per epoch of the whole run, an epoch redone after the kill counted once.
    rows = curves.read_text().splitlines()
    assert len(rows) == 1 + sum(p["epochs_run"] for p in report["phases"].values())
    assert [int(row.split("\t")[0]) for row in rows[1:]] == list(range(len(rows) - 1))
    model, classes = load_model_dir(params.paths.finetuned_model)
    assert classes == ("x", "y", "z") and model.output_shape == (None, 3)
    finished = json.loads(state_file.read_text())
    assert (finished["fingerprint"], finished["finished"]) == (state["fingerprint"], True)


@pytest.mark.slow  # ~40 s on 2 cores: keeps make test within its 10-minute budget
def test_a_rerun_with_the_same_seed_is_fresh_not_resumed_and_gives_the_same_numbers(tmp_path: Path) -> None:
    from components import finetune

    params, _ = finetune_workspace(tmp_path)
    finetune.run(params)
    first = json.loads(params.paths.finetune_report.read_text())
    finetune.run(params)  # the checkpoint says finished: a fresh run, not a resume
    second = json.loads(params.paths.finetune_report.read_text())
    assert first["resumed"] is False and second["resumed"] is False
    # Determinism on CPU: same seed and data, same numbers (README: tolerance 1e-6).
    assert second["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)
    for name in ("head", "unfrozen"):
        assert second["phases"][name]["val_accuracy"] == first["phases"][name]["val_accuracy"]


# The default suite's small cases: few steps per epoch (min_steps_per_epoch 0: 72 images, batch 8 or
# the shrunk 32), so a whole run is seconds; the slow tests above run the longer recipes.
FEW_STEPS = {"finetune.min_steps_per_epoch": 0, **NO_AUGMENT}


def test_a_small_finetune_killed_with_sigkill_resumes_in_a_new_process(tmp_path: Path) -> None:
    """kill -9 after the first head epoch's checkpoint; the rerun (this process) goes on from it."""
    import keras

    from components import finetune

    extra = {"finetune.head_epochs": 4, "finetune.patience": 4, "finetune.epochs": 0, "finetune.batch_size": 8, **FEW_STEPS}
    params, params_yaml = finetune_workspace(tmp_path, extra)
    state_file = params.paths.finetune_checkpoint / "state.json"
    # The same backend as this process: a checkpoint resumes only under the backend and precision it was written with.
    process = start_stage("finetune", params_yaml, {"KERAS_BACKEND": keras.backend.backend()})
    killed_after, output = kill_after_epoch(process, state_file, 1)
    assert killed_after >= 1, f"no checkpoint of epoch 1 within the deadline:\n{output[-2000:]}"
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert not params.paths.finetuned_model.exists()
    state = json.loads(state_file.read_text())
    assert state["phase"] == "head" and 1 <= state["epoch"] < 4

    finetune.run(params)

    report = json.loads(params.paths.finetune_report.read_text())
    head = report["phases"]["head"]
    assert report["resumed"] is True and head["resumed_from_epoch"] == state["epoch"]
    assert head["epochs_run"] == len(head["val_accuracy"]) == 4
    assert load_model_dir(params.paths.finetuned_model)[1] == TEXTURES
    finished = json.loads(state_file.read_text())
    assert (finished["fingerprint"], finished["finished"]) == (state["fingerprint"], True)


def test_a_small_rerun_with_the_same_seed_gives_the_same_numbers(tmp_path: Path) -> None:
    from components import finetune

    params, _ = finetune_workspace(tmp_path, FEW_STEPS)  # both phases, one epoch each
    finetune.run(params)
    first = json.loads(params.paths.finetune_report.read_text())
    finetune.run(params)
    second = json.loads(params.paths.finetune_report.read_text())
    assert set(first["phases"]) == {"head", "unfrozen"} and second["resumed"] is False
    assert second["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)
    for name in ("head", "unfrozen"):
        assert second["phases"][name]["val_accuracy"] == first["phases"][name]["val_accuracy"]


def test_a_checkpoint_written_for_other_inputs_is_ignored(tmp_path: Path) -> None:
    from components import finetune
    from components.training.trainer import Checkpoint

    params, _ = finetune_workspace(tmp_path)
    Checkpoint(params.paths.finetune_checkpoint, "another run's fingerprint").save({"phase": "head", "epoch": 1}, {})
    finetune.run(params)
    assert json.loads(params.paths.finetune_report.read_text())["resumed"] is False
