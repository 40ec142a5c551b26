"""What the first GPU run would meet, reproduced on CPU: BatchNorm in inference mode while fine-tuning,
loss scaling under mixed_float16, checkpoints tied to their precision and backend, one model behind the
reported validation figures, steady-state throughput, and the settings for repeatable GPU runs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from components import finetune
from components.core.config import Params, with_overrides
from components.data.dataset import load_split
from components.training.models import BACKBONE_NAME, build_model, load_model_dir, save_model_dir
from components.training.trainer import (
    Augment, Throughput, compile_model, evaluate, prepare_backend, with_augmentation, with_precision,
)
from tests.conftest import REPO
from tests.test_resume import NO_AUGMENT, TEXTURES, finetune_workspace

# One unfrozen phase over every layer (the default recipe's shape), short.
UNFROZEN = {"finetune.head_epochs": 0, "finetune.epochs": 2, "finetune.unfreeze_top": -1,
            "finetune.batch_size": 8, **NO_AUGMENT}


def _batchnorms(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    backbone = model.get_layer(BACKBONE_NAME)
    return {layer.name: layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}


def _with_source_statistics(params: Params) -> dict[str, list[np.ndarray]]:
    """Give the transferred model's BatchNorm layers moving statistics of their own (as a trained source
    leaves them, not the initial 0 and 1); returns each layer's weights as saved."""
    model, classes = load_model_dir(params.paths.transferred_model)
    rng = np.random.default_rng(3)
    for layer in _batchnorms(model).values():
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([gamma, beta, rng.normal(0, 0.3, mean.shape).astype("float32"),
                           rng.uniform(0.5, 2.0, variance.shape).astype("float32")])
    save_model_dir(model, classes, params.paths.transferred_model)
    return {name: layer.get_weights() for name, layer in _batchnorms(model).items()}


def test_finetuning_every_layer_keeps_batchnorm_in_inference_mode(tmp_path: Path) -> None:
    params, _ = finetune_workspace(tmp_path, UNFROZEN)
    source = _with_source_statistics(params)
    transferred, _ = load_model_dir(params.paths.transferred_model)

    finetune.run(params)

    report = json.loads(params.paths.finetune_report.read_text())
    assert report["kept_phase"] == "unfrozen"
    finetuned, classes = load_model_dir(params.paths.finetuned_model)
    assert classes == TEXTURES
    for name, layer in _batchnorms(finetuned).items():
        _, _, mean, variance = layer.get_weights()
        np.testing.assert_array_equal(mean, source[name][2], err_msg=f"{name} moving mean changed")
        np.testing.assert_array_equal(variance, source[name][3], err_msg=f"{name} moving variance changed")
    # The convolutions did train: the statistics held because BatchNorm was frozen, not because nothing moved.
    conv = transferred.get_layer(BACKBONE_NAME).get_layer("block1_conv1").get_weights()[0]
    assert np.abs(finetuned.get_layer(BACKBONE_NAME).get_layer("block1_conv1").get_weights()[0] - conv).max() > 1e-4


def _conv_kernel_steps(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[float]:
    """The largest change of each backbone convolution kernel in one training step."""
    convs = [layer for layer in model.get_layer(BACKBONE_NAME).layers if isinstance(layer, keras.layers.Conv2D)]
    before = [layer.get_weights()[0] for layer in convs]
    model.train_on_batch(x, y)
    return [float(np.abs(layer.get_weights()[0] - old).max()) for layer, old in zip(convs, before)]


def test_mixed_float16_training_scales_the_loss_so_tiny_gradients_survive(params: Params) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, params.data.image_size, params.data.image_size, 1), dtype=np.uint8)
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]

    def trainee() -> keras.Model:
        # A near-zero head makes the gradients reaching the float16 backbone fall below
        # float16's smallest subnormal (6e-8): unscaled, they round to zero.
        keras.utils.set_random_seed(params.seed)
        model = build_model(params.model, params.data, 3, bn_inference=True)
        kernel, bias = model.get_layer("head").get_weights()
        model.get_layer("head").set_weights([kernel * 1e-6, bias])
        return with_precision(model, "mixed_float16")

    unscaled = trainee()
    unscaled.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                     jit_compile=False)  # XLA adds only compile time here
    assert max(_conv_kernel_steps(unscaled, x, y)) == 0.0  # the underflow this guards against

    scaled = trainee()
    compile_model(scaled, 1e-3, jit_compile=False)
    assert isinstance(scaled.optimizer, keras.optimizers.LossScaleOptimizer)
    assert min(_conv_kernel_steps(scaled, x, y)) > 0.0


def test_loss_scaling_follows_the_layers_policy_inside_the_augmentation_wrapper(params: Params) -> None:
    model = build_model(params.model, params.data, 3, bn_inference=True)
    for policy, scaled in (("float32", False), ("mixed_bfloat16", False), ("mixed_float16", True)):
        # The wrapper fine-tuning compiles is a float32 model around the float16 one.
        trainer = with_augmentation(with_precision(model, policy), Augment(zoom=0.1), seed=0)
        compile_model(trainer, 1e-3)
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) is scaled, policy


def test_a_checkpoint_resumes_only_under_its_precision_and_bf16_reports_float32_figures(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params, _ = finetune_workspace(tmp_path, {**UNFROZEN, "finetune.precision": "float32"})
    # A float32 run that trains both epochs, then fails to write its model (the models folder's
    # parent is a file): its checkpoint stays, unfinished and resumable.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        finetune.run(with_overrides(params, {"paths.finetuned_model": str(blocker / "finetuned")}))
    state = json.loads((params.paths.finetune_checkpoint / "state.json").read_text())
    assert state["epoch"] == 2 and not state.get("finished")
    assert state["settings"] == {"backend": keras.backend.backend(), "precision": "float32"}

    # `auto` resolves to float32 on this CPU: the same run, so it resumes (and fails to save again).
    with caplog.at_level(logging.INFO, logger="components.training.trainer"), pytest.raises(OSError):
        finetune.run(with_overrides(params, {"finetune.precision": "auto",
                                             "paths.finetuned_model": str(blocker / "finetuned")}))
    assert "unfrozen: resuming after epoch 2 of 2" in caplog.text
    caplog.clear()

    # bf16, what `auto` resolves to on a GPU: the checkpoint is not resumed, and the log says why.
    with caplog.at_level(logging.WARNING, logger="components.training.trainer"):
        finetune.run(with_overrides(params, {"finetune.precision": "mixed_bfloat16"}))
    report = json.loads(params.paths.finetune_report.read_text())
    assert report["resumed"] is False and report["precision"] == "mixed_bfloat16"
    assert report["phases"]["unfrozen"]["resumed_from_epoch"] == 0
    assert "precision float32 there, mixed_bfloat16 now" in caplog.text

    # Both validation figures come from the saved float32 model, not one of them from its bf16 copy.
    saved, _ = load_model_dir(params.paths.finetuned_model)
    expected = evaluate(saved, load_split(params.paths.clean, "target", "val"))
    assert report["val_loss"] == pytest.approx(expected["loss"], abs=2e-6)
    assert report["val_accuracy"] == pytest.approx(expected["accuracy"], abs=2e-6)


def test_throughput_times_training_steps_only_and_leaves_the_first_epoch_out(params: Params) -> None:
    rng = np.random.default_rng(0)
    side = params.data.image_size
    x = rng.integers(0, 256, (40, side, side, 1), dtype=np.uint8)
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 40)]
    model = build_model(params.model, params.data, 3, bn_inference=True)
    compile_model(model, 1e-3)
    throughput = Throughput(len(x))
    epochs_timed_at: dict[str, list[int]] = {"train": [], "validation": []}

    class Watch(keras.callbacks.Callback):
        """How many epochs the clock has recorded when each training and validation batch starts."""

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            epochs_timed_at["train"].append(len(throughput.seconds))

        def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            epochs_timed_at["validation"].append(len(throughput.seconds))

    model.fit(x, y, validation_data=(x[:16], y[:16]), batch_size=16, epochs=3, verbose=0,
              callbacks=[throughput, Watch()])

    # 3 training batches an epoch (16, 16, 8) while the epoch's clock runs; each validation batch only
    # after that epoch's time is recorded.
    assert epochs_timed_at["train"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert epochs_timed_at["validation"] == [1, 2, 3]
    assert len(throughput.seconds) == 3
    assert throughput.images_per_second == pytest.approx(2 * len(x) / sum(throughput.seconds[1:]))


def test_float32_turns_tf32_off_and_jax_asks_xla_for_deterministic_gpu_kernels() -> None:
    import tensorflow as tf

    assert prepare_backend("float32") == "float32"  # this CPU: the tests' backend is TensorFlow
    assert tf.config.experimental.tensor_float_32_execution_enabled() is False
    assert prepare_backend("mixed_bfloat16") == "mixed_bfloat16"
    assert tf.config.experimental.tensor_float_32_execution_enabled() is True

    # JAX reads XLA_FLAGS at start-up: a process of its own, which keeps a flag it was given.
    probe = ("import os, jax\nfrom components.training.trainer import prepare_backend\n"
             "print(prepare_backend('auto'), os.environ['XLA_FLAGS'], jax.config.jax_default_matmul_precision)")
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["float32", "--xla_force_host_platform_device_count=2",
                                   "--xla_gpu_deterministic_ops=true", "highest"]
