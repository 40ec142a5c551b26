"""The training machinery that source training and fine-tuning share: the recipe, early stopping, checkpoints, curves.

Keras APIs only, fed from the on-disk splits by components.data.stream, so the same code runs on
the TensorFlow, JAX or torch backend and never holds a split in memory.
Training runs one `model.fit` call per phase; a callback checkpoints the whole state after every
epoch (weights, optimizer, early-stopping counters), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from components.core.artifacts import atomic_dir, write_text
from components.core.config import FinetuneParams
from components.data.dataset import PREDICT_BATCH, Split
from components.data.stream import TrainFeed, predict, replicas
from components.training.distributed import process, process_local

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"


@dataclass(frozen=True)
class Augment:
    """Random augmentation applied to training batches only; never part of a saved or exported model."""

    flip: str = "none"  # none | horizontal | vertical | horizontal_and_vertical (digits are not flip-invariant)
    rotation: float = 0.0  # fraction of a full turn
    zoom: float = 0.0
    contrast: float = 0.0

    @property
    def active(self) -> bool:
        return self.flip != "none" or bool(self.rotation or self.zoom or self.contrast)


@dataclass(frozen=True)
class Recipe:
    """How to train; the plain recipe (no schedule, no smoothing) is what source training uses."""

    warmup_epochs: int = 0
    cosine_decay: bool = False
    label_smoothing: float = 0.0
    class_weight: bool = False
    augment: Augment = field(default_factory=Augment)
    jit_compile: bool | str = "auto"
    # A tiny train split (5 labels per class) is one step per epoch, too few for a schedule to mean
    # anything: it is repeated (augmented afresh each time) until an epoch has this many steps.
    min_steps_per_epoch: int = 0


def recipe(cfg: FinetuneParams) -> Recipe:
    """The fine-tuning recipe params.yaml sets (finetune section): shared by the stage and the baseline."""
    return Recipe(
        warmup_epochs=cfg.warmup_epochs,
        cosine_decay=cfg.cosine_decay,
        label_smoothing=cfg.label_smoothing,
        class_weight=cfg.class_weight == "balanced",
        augment=Augment(cfg.augment_flip, cfg.augment_rotation, cfg.augment_zoom, cfg.augment_contrast),
        jit_compile=cfg.jit_compile,
        min_steps_per_epoch=cfg.min_steps_per_epoch,
    )


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    best_epoch: int  # 1-based, within this phase
    best_val_accuracy: float
    seconds: float
    images_per_second: float  # steady state: training steps only, after the first epoch (Throughput)
    resumed_from_epoch: int = 0  # epochs done before this process started (0: a fresh run)
    val_accuracy: tuple[float, ...] = ()  # per epoch, for time-to-accuracy comparisons
    elapsed: tuple[float, ...] = ()  # cumulative training seconds at the end of each epoch


class Checkpoint:
    """The training state after the last completed epoch, in one folder replaced whole (atomic_dir).

    `fingerprint` names the inputs (params, data, starting model): a checkpoint written for other
    inputs is ignored, never resumed. `settings` names how the run computes, as resolved on this
    machine (backend, precision policy): `precision: auto` is float32 on a CPU and bf16 on a GPU, so
    a checkpoint moved between them holds the same params but not the same run; it is ignored too,
    with a warning saying which setting differs. `context`/`context_arrays` carry the caller's own
    state (e.g. the results of phases already finished) through every save. `writer` false (the other
    processes of a multi-worker run): it reads the chief's checkpoint to resume from, and never writes.
    Not keras.callbacks.BackupAndRestore: that restores weights, optimizer and epoch, but neither the
    early-stopping counters and best weights so far nor the inputs a checkpoint was written for.
    """

    def __init__(self, directory: Path, fingerprint: str, settings: dict[str, str] | None = None,
                 writer: bool = True) -> None:
        self.directory, self.fingerprint, self.settings = Path(directory), fingerprint, dict(settings or {})
        self.writer = writer
        self.state: dict | None = None
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.context: dict = {}
        self.context_arrays: dict[str, list[np.ndarray]] = {}

    def load(self) -> bool:
        """Read a matching, unfinished checkpoint; False (and nothing loaded) if there is none."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return False
        state = json.loads(path.read_text())
        if state.get("finished"):
            return False
        written = state.get("settings", {})
        if written != self.settings:
            differ = ", ".join(f"{key} {written.get(key, 'unrecorded')} there, {self.settings.get(key, 'unset')} now"
                               for key in sorted(set(written) | set(self.settings))
                               if written.get(key) != self.settings.get(key))
            log.warning("ignoring the checkpoint in %s, written under other settings (%s): starting fresh",
                        self.directory, differ)
            return False
        if state.get("fingerprint") != self.fingerprint:
            log.info("ignoring the checkpoint in %s: it was written for other inputs", self.directory)
            return False
        with np.load(self.directory / ARRAYS_FILE) as stored:
            groups: dict[str, list[np.ndarray]] = {}
            for key in sorted(stored.files, key=lambda k: (k.rsplit("_", 1)[0], int(k.rsplit("_", 1)[1]))):
                groups.setdefault(key.rsplit("_", 1)[0], []).append(stored[key])
        self.state = state
        self.context = state.get("context", {})
        self.context_arrays = {k[4:]: v for k, v in groups.items() if k.startswith("ctx.")}
        self.arrays = {k: v for k, v in groups.items() if not k.startswith("ctx.")}
        return True

    def save(self, state: dict, arrays: dict[str, list[np.ndarray]]) -> None:
        self.state, self.arrays = state, arrays
        if not self.writer:
            return
        flat = {f"{name}_{i}": array for name, group in arrays.items() for i, array in enumerate(group)}
        flat.update({f"ctx.{name}_{i}": a for name, group in self.context_arrays.items() for i, a in enumerate(group)})
        with atomic_dir(self.directory) as temp:
            np.savez(temp / ARRAYS_FILE, **flat)
            (temp / STATE_FILE).write_text(json.dumps({**state, "fingerprint": self.fingerprint,
                                                       "settings": self.settings, "context": self.context},
                                                      indent=1) + "\n")

    def finish(self) -> None:
        """Mark the run complete: the folder stays (DVC declares it), but holds nothing to resume."""
        if not self.writer:
            return
        with atomic_dir(self.directory) as temp:
            (temp / STATE_FILE).write_text(json.dumps({"fingerprint": self.fingerprint, "settings": self.settings,
                                                       "finished": True}) + "\n")


class Curves:
    """Training curves as TSV files, one per metric (`step<TAB>value`), the layout dvclive writes.

    dvc.yaml's `plots` section points `dvc plots show` at them. Written directly, not through
    dvclive: its `Live()` imports DVC and opens the repository, measured at 1-11 s a stage
    (docs/benchmarks.md). Each file is rewritten whole after an epoch, so a kill never leaves a
    half-written row; a resumed run continues the curves where they stopped.
    """

    KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")

    def __init__(self, directory: Path, resume_at: int = 0) -> None:
        """`resume_at`: the epochs a resumed run's checkpoint holds; their rows are kept, any later
        row (an epoch that ran after the last checkpoint) is dropped, as that epoch runs again."""
        self.folder = Path(directory) / "plots" / "metrics"
        self.rows: dict[str, list[str]] = {key: [] for key in self.KEYS}
        for key in self.KEYS:
            path = self.folder / f"{key}.tsv"
            if resume_at and path.is_file():
                self.rows[key] = path.read_text().splitlines()[1 : resume_at + 1]
            else:  # a fresh run's curves never carry an older run's rows
                path.unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.step = resume_at

    def log(self, logs: dict) -> None:
        for key in self.KEYS:
            if key in logs:
                self.rows[key].append(f"{self.step}\t{float(logs[key])}")
                write_text(self.folder / f"{key}.tsv", "\n".join([f"step\t{key}", *self.rows[key]]) + "\n")
        self.step += 1


class _Epochs(keras.callbacks.Callback):
    """After each epoch: a log line, the curves, early stopping, best weights and the checkpoint.

    One `fit` call runs the whole phase with this callback: a `fit` per epoch would rebuild the
    data pipeline and validation iterator every epoch (measured in docs/benchmarks.md).
    """

    def __init__(self, *, model: keras.Model, optimizer_of: keras.Model, phase: str, epochs: int, patience: int,
                 state: dict, best: list[np.ndarray], curves: Curves | None, checkpoint: Checkpoint | None,
                 feed: TrainFeed, val: Split, label_smoothing: float) -> None:
        super().__init__()
        self.saved, self.optimizer_of, self.phase, self.epochs, self.patience = model, optimizer_of, phase, epochs, patience
        self.feed, self.val, self.label_smoothing = feed, val, label_smoothing
        self.state, self.best, self.curves, self.checkpoint = state, best, curves, checkpoint
        history = state["history"]
        self.offset = history["elapsed"][-1] if history["elapsed"] else 0.0
        self.started, self.first_epoch = time.perf_counter(), state["epoch"]

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.feed.epoch = epoch  # the epoch's order is fixed by (seed, epoch): a resumed run reads the same

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs, state, history = logs if logs is not None else {}, self.state, self.state["history"]
        # Validation here, not fit's validation_data: `predict` pads the last batch for data
        # parallelism and cuts the padding off, so no image is dropped or counted twice.
        scores = evaluate(self.saved, self.val, label_smoothing=self.label_smoothing)
        logs.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
        state["epoch"] = epoch + 1
        shown = "  ".join(f"{key} {value:.4f}" for key, value in sorted(logs.items()) if key != "learning_rate")
        # A plain line per epoch (readable in a log file or CI) with the time left at this epoch's pace.
        per_epoch = (time.perf_counter() - self.started) / max(state["epoch"] - self.first_epoch, 1)
        log.info("%s epoch %d/%d  %s  (ETA %.0f s)", self.phase, state["epoch"], self.epochs, shown,
                 per_epoch * (self.epochs - state["epoch"]))
        if process()[1] > 1:  # every worker logs it: a worker whose weights drifted from the others shows
            digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in self.saved.get_weights()))
            log.info("%s epoch %d weights sha256 %s (process %d)", self.phase, state["epoch"],
                     digest.hexdigest()[:16], process()[0])
        if self.curves is not None:
            self.curves.log(logs)
        for key in ("loss", "val_loss", "val_accuracy"):
            history[key].append(float(logs[key]))
        history["elapsed"].append(round(self.offset + time.perf_counter() - self.started, 3))
        if history["val_loss"][-1] < state["best_loss"]:
            state.update(best_loss=history["val_loss"][-1], best_epoch=state["epoch"], wait=0)
            self.best = self.saved.get_weights()
        else:
            state["wait"] += 1
            if state["wait"] >= self.patience:
                state["stopped"] = self.model.stop_training = True
                log.info("%s: early stop after epoch %d (best: epoch %d)", self.phase, state["epoch"],
                         state["best_epoch"])
        if self.checkpoint is not None:
            self.checkpoint.save(state, {"weights": self.saved.get_weights(), "best": self.best,
                                         "optimizer": _optimizer_values(self.optimizer_of)})


class Throughput(keras.callbacks.Callback):
    """Steady-state training speed of one `fit`: images/second over the training steps of its epochs.

    Each epoch is timed from its start to the end of its last training step, so validation, the
    checkpoint and the curves (all after that) are left out; the first epoch is left out too when
    there are others, as it holds the compilation (XLA, and a second one for a last, smaller batch).
    Steps run asynchronously on an accelerator: the clock stops only once the optimizer's step
    counter, which the last step writes, can be read. Epoch boundaries only, never per batch: a
    batch callback would make Keras wait for every step and slow what it measures.
    """

    def __init__(self, images_per_epoch: int) -> None:
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.seconds: list[float] = []  # training seconds of each epoch, in order
        self._started: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_test_begin(self, logs: dict | None = None) -> None:  # validation starts: training steps are done
        self._stop()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # a fit without validation
        self._stop()

    def _stop(self) -> None:
        if self._started is not None:
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)  # waits for the last step
            self.seconds.append(time.perf_counter() - self._started)
            self._started = None

    @property
    def images_per_second(self) -> float:
        steady = self.seconds[1:] or self.seconds
        return len(steady) * self.images_per_epoch / sum(steady) if sum(steady) > 0 else 0.0


def jit_on_jax(layers: list[keras.layers.Layer]) -> None:
    """Let augmentation layers be jit-compiled on JAX.

    Keras marks RandomRotation/RandomZoom as not jit-compilable (TensorFlow's projective-transform
    op has no XLA kernel), which makes "auto" run the whole JAX train step op by op: measured
    7-25 s an epoch instead of 0.1 s on 2 busy cores. On JAX they are plain jax.numpy ops and jit.
    """
    if keras.backend.backend() == "jax":
        for layer in layers:
            layer.supports_jit = True


class ToPixels(keras.layers.Layer):
    """Back to uint8 after augmentation: the model under training takes raw pixels, like the exported one."""

    def call(self, x: object) -> object:
        return keras.ops.cast(keras.ops.clip(keras.ops.round(x), 0, 255), "uint8")


def with_augmentation(model: keras.Model, augment: Augment, seed: int) -> keras.Model:
    """A training-only wrapper: augmentation layers in front of `model`, sharing its weights.

    `model` itself is what gets saved, so the augmentation never reaches the exported graph.
    """
    if not augment.active:
        return model
    layers: list[keras.layers.Layer] = []
    if augment.flip != "none":
        layers.append(keras.layers.RandomFlip(augment.flip, seed=seed))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation, fill_mode="constant", seed=seed + 1))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom, fill_mode="constant", seed=seed + 2))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 3))
    jit_on_jax(layers)
    inputs = keras.Input(model.inputs[0].shape[1:], dtype="uint8")
    x = keras.layers.Rescaling(1.0)(inputs)  # to float for the augmentation layers
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, model(ToPixels()(x)), name="training_with_augmentation")


def lr_schedule(base: float, recipe: Recipe, epochs: int, steps_per_epoch: int) -> float | object:
    """Linear warmup then cosine decay to zero over the phase, in optimizer steps (resumes with them)."""
    if not recipe.cosine_decay and not recipe.warmup_epochs:
        return base
    warmup = min(recipe.warmup_epochs, epochs) * steps_per_epoch
    total = max(epochs * steps_per_epoch, warmup + 1)
    if not recipe.cosine_decay:  # warmup to `base`, then constant
        return keras.optimizers.schedules.CosineDecay(base, 1, alpha=1.0, warmup_target=base, warmup_steps=warmup) \
            if warmup else base
    if warmup:
        return keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=base, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(base, total)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights (n / (k * count)): a rare class counts as much in the loss as a common one.

    scikit-learn's compute_class_weight("balanced") gives the same numbers (a test compares them); it is
    not called here because the fine-tune stage runs on GPU hosts that carry Keras and a few small
    packages only (scripts/gpu_check.py), and it refuses a class absent from the labels (weight 0 here).
    """
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return {k: float(len(labels) / (num_classes * c)) if c else 0.0 for k, c in enumerate(counts)}


def compile_model(model: keras.Model, rate: float | object, label_smoothing: float = 0.0,
                  jit_compile: bool | str = "auto") -> None:
    """Adam on categorical cross-entropy; with loss scaling when any layer computes in float16.

    Keras wraps the optimizer in a LossScaleOptimizer only when the *outer* model's policy is
    mixed_float16, which a model cloned layer by layer (with_precision) or wrapped for augmentation
    never has: float16 gradients below 6e-8 would silently become zeros. bfloat16 has float32's
    range and needs no scaling.
    """
    optimizer = keras.optimizers.Adam(rate)
    if any(layer.dtype_policy.name == "mixed_float16" for layer in _all_layers(model)):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # One-hot targets: label smoothing needs them, and the same loss serves both cases.
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


def _optimizer_values(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]


def _restore_optimizer(model: keras.Model, values: list[np.ndarray]) -> None:
    model.optimizer.build(model.trainable_variables)
    variables = model.optimizer.variables
    if len(variables) != len(values):
        raise ValueError(f"the checkpoint holds {len(values)} optimizer variables, this model needs {len(variables)}")
    for variable, value in zip(variables, values):
        variable.assign(value)


def fit(
    model: keras.Model,
    train: Split,
    val: Split,
    *,
    phase: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    curves: Curves | None = None,
    recipe: Recipe | None = None,
    checkpoint: Checkpoint | None = None,
    seed: int,
) -> FitResult:
    """Train with Adam and early stopping on validation loss; the model ends at its best epoch.

    Validation loss, not accuracy: on small validation sets accuracy ties early (1.0 for epochs on
    end) while the loss still tells better weights from worse. With a `checkpoint`, every epoch
    ends with a save, and a checkpoint of this phase found at the start is resumed. `seed` (no
    default: every caller passes params.seed) fixes the batch order, augmentation and dropout.
    """
    recipe = recipe or Recipe()
    weights = class_weights(train.y, len(train.classes)) if recipe.class_weight else None
    # Seeded by phase: the head and unfrozen phases do not repeat each other's order.
    feed = TrainFeed(train, batch_size, seed=seed + 1000 * (phase != "head"), min_steps=recipe.min_steps_per_epoch,
                     class_weight=weights, multiple=replicas(), shard=process())
    steps = len(feed)
    trainer = with_augmentation(model, recipe.augment, seed)
    rate = lr_schedule(learning_rate, recipe, epochs, steps)
    compile_model(trainer, rate, recipe.label_smoothing, recipe.jit_compile)

    state = {"phase": phase, "epoch": 0, "best_loss": math.inf, "best_epoch": 0, "wait": 0, "stopped": False,
             "history": {"loss": [], "val_loss": [], "val_accuracy": [], "elapsed": []}}
    best = model.get_weights()
    resumed = 0
    if checkpoint is not None and checkpoint.state and checkpoint.state.get("phase") == phase:
        state = checkpoint.state
        model.set_weights(checkpoint.arrays["weights"])
        best = checkpoint.arrays["best"]
        if "optimizer" in checkpoint.arrays:
            _restore_optimizer(trainer, checkpoint.arrays["optimizer"])
        resumed = state["epoch"]
        log.info("%s: resuming after epoch %d of %d from the checkpoint in %s", phase, resumed, epochs,
                 checkpoint.directory)
    after_epoch = _Epochs(model=model, optimizer_of=trainer, phase=phase, epochs=epochs, patience=patience,
                          state=state, best=best, curves=curves, checkpoint=checkpoint, feed=feed, val=val,
                          label_smoothing=recipe.label_smoothing)
    throughput = Throughput(steps * feed.batch_size)  # the feed wraps to full batches
    if state["epoch"] < epochs and not state["stopped"]:
        # Seeded by phase and starting epoch: the same inputs train the same way (a resumed run is
        # seeded by its own starting epoch, so it is close to, not bit-identical with, an unbroken one).
        keras.utils.set_random_seed(seed + 1000 * (phase != "head") + state["epoch"])
        feed.epoch = state["epoch"]  # in case a backend reads ahead before the first epoch's callback
        # On a terminal, Keras's own bar shows progress within each epoch with its ETA; elsewhere (a log
        # file, CI) only the plain line per epoch, with the phase's ETA, is written.
        trainer.fit(feed, initial_epoch=state["epoch"], epochs=epochs, verbose=int(sys.stdout.isatty()),
                    callbacks=[throughput, after_epoch])
    best, history = after_epoch.best, state["history"]
    model.set_weights(best)
    seconds = history["elapsed"][-1] if history["elapsed"] else 0.0
    epochs_run = len(history["val_loss"])
    best_index = max(state["best_epoch"] - 1, 0)
    return FitResult(
        epochs_run=epochs_run,
        best_epoch=state["best_epoch"],
        best_val_accuracy=float(history["val_accuracy"][best_index]) if epochs_run else 0.0,
        seconds=round(seconds, 3),
        images_per_second=round(throughput.images_per_second, 1),  # this process's epochs; 0.0: none ran
        resumed_from_epoch=resumed,
        val_accuracy=tuple(round(v, 6) for v in history["val_accuracy"]),
        elapsed=tuple(history["elapsed"]),
    )


def evaluate(model: keras.Model, split: Split, batch_size: int = PREDICT_BATCH, label_smoothing: float = 0.0) -> dict[str, float]:
    """Loss and accuracy as training measures them (cross-entropy on one-hot labels, `label_smoothing`
    as the compiled loss has it: validation during `fit` uses the recipe's, comparisons none).

    From `predict`, not `model.evaluate`: evaluate needs a `compile`, which throws away the model's
    traced functions, so each call traced a new one (measured: about 8 s a finetune run on busy cores).
    """
    with process_local(model) as local:  # a multi-worker run: every process evaluates the whole split
        probabilities = predict(local, split, batch_size).astype("float64")
    # Keras normalizes, then clips probabilities to [epsilon, 1 - epsilon] before the log; so does this.
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    logs = np.log(np.clip(probabilities, keras.config.epsilon(), 1 - keras.config.epsilon()))
    classes = probabilities.shape[1]
    chosen = logs[np.arange(len(split)), split.y]
    loss = -((1 - label_smoothing) * chosen + label_smoothing / classes * logs.sum(axis=1))
    return {"loss": float(loss.mean()), "accuracy": float((probabilities.argmax(axis=1) == split.y).mean())}


def accuracy(model: keras.Model, split: Split, batch_size: int = PREDICT_BATCH) -> float:
    return evaluate(model, split, batch_size)["accuracy"]


# Accelerators -----------------------------------------------------------------------------------

def accelerators() -> list[str]:
    """GPU/TPU devices the backend sees (empty on CPU)."""
    return [d for d in keras.distribution.list_devices() if not d.lower().startswith("cpu")] \
        if keras.backend.backend() == "jax" else _tf_gpus()


def _tf_gpus() -> list[str]:
    if keras.backend.backend() != "tensorflow":
        return []
    import tensorflow as tf  # only on the TensorFlow backend, which has it

    return [d.name for d in tf.config.list_logical_devices("GPU")]


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 mixed precision on an accelerator (no loss scaling needed), float32 on CPU."""
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if accelerators() else "float32"


def deterministic_xla() -> None:
    """Ask XLA for deterministic GPU kernels: effective only if JAX has not listed its devices yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def prepare_backend(precision: str) -> str:
    """Set the backend up for a repeatable run and resolve `precision`; returns the policy.

    Call it before anything touches a device: XLA reads XLA_FLAGS once, when JAX first lists its
    devices (resolving `auto` does). On a CPU, runs repeat without any of this; on a GPU they need:
    - deterministic kernels (reductions and convolution gradients otherwise pick atomics):
      `--xla_gpu_deterministic_ops` (JAX), op determinism (TensorFlow) and deterministic
      algorithms (torch), the last two only when the backend sees a GPU;
    - float32 that is float32: Ampere and later GPUs run float32 matmuls and convolutions in TF32
      (10-bit mantissa) by default. With `precision: float32` TF32 is off; a mixed policy computes in
      bf16/fp16 anyway.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        deterministic_xla()
    policy = resolve_precision(precision)
    exact = policy == "float32"
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest" if exact else None)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(not exact)
        if accelerators():
            tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not exact
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
    return policy


def with_precision(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model` computing in `policy` (variables stay float32), sharing nothing with it.

    A loaded model keeps the float32 policy it was saved with, so mixed precision needs a clone;
    the trained weights go back into the float32 original, which is what gets saved and exported.
    """
    if policy == "float32":
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.InputLayer) or isinstance(layer, keras.Model):
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        # The head's softmax stays float32 for a numerically safe loss (Keras's mixed-precision advice).
        config["dtype"] = "float32" if layer.name == "head" else policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    for original, cloned in zip(_all_layers(model), _all_layers(copy)):
        cloned.trainable = original.trainable
    return copy


def _all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


@contextmanager
def data_parallel(enabled: bool) -> Iterator[tuple[str, ...]]:
    """Replicate the model over every local device and split each batch between them; yields the devices.

    TensorFlow: tf.distribute.MirroredStrategy over the GPUs, else the logical CPUs (build or load
    the model inside this block). JAX: keras.distribution.DataParallel, over every process's devices
    when several processes joined (components.training.distributed). One device, or `enabled` false:
    a no-op that yields no devices (training runs wherever the backend puts it).
    """
    backend = keras.backend.backend()
    if not enabled or backend not in ("tensorflow", "jax"):
        yield ()
        return
    if backend == "jax":
        devices = tuple(keras.distribution.list_devices())
        if len(devices) < 2:
            yield ()
            return
        previous = keras.distribution.distribution()
        distribution = keras.distribution.DataParallel(devices=list(devices))
        # Several processes: each TrainFeed already reads only its own share of every batch.
        distribution.auto_shard_dataset = process()[1] == 1
        keras.distribution.set_distribution(distribution)
        try:
            yield devices
        finally:
            keras.distribution.set_distribution(previous)
        return
    import tensorflow as tf

    devices = tuple(d.name for d in tf.config.list_logical_devices("GPU")) or \
        tuple(d.name for d in tf.config.list_logical_devices("CPU"))
    if len(devices) < 2:
        yield ()
        return
    strategy = tf.distribute.MirroredStrategy(list(devices))
    with strategy.scope():
        yield tuple(strategy.extended.worker_devices)
