"""The training machinery that source training and fine-tuning share: compile, fit, early stopping, curves.

Keras APIs only, fed from numpy arrays, so the same code runs on the TensorFlow, JAX or torch backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from components.dataset import Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    epochs_run: int
    best_epoch: int  # 1-based, within this phase
    best_val_accuracy: float
    seconds: float
    images_per_second: float


class _Progress(keras.callbacks.Callback):
    """One log line per epoch, and the curves to dvclive (so `dvc plots show` draws them)."""

    def __init__(self, phase: str, epochs: int, live: object | None) -> None:
        super().__init__()
        self.phase, self.epochs, self.live = phase, epochs, live

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        shown = "  ".join(f"{key} {value:.4f}" for key, value in sorted(logs.items()) if key != "learning_rate")
        log.info("%s epoch %d/%d  %s", self.phase, epoch + 1, self.epochs, shown)
        if self.live is not None:
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                if key in logs:
                    self.live.log_metric(key, float(logs[key]))
            self.live.next_step()


def open_curves(directory: Path) -> object:
    """A dvclive logger writing TSV curves under `directory`, leaving dvc.yaml and experiments alone."""
    from dvclive import Live

    return Live(str(directory), dvcyaml=False, save_dvc_exp=False, report=None)


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


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
    live: object | None = None,
) -> FitResult:
    """Train with Adam and early stopping on validation loss; the model ends at its best epoch.

    Validation loss, not accuracy: on small validation sets accuracy ties early (1.0 for epochs on
    end) while the loss still tells better weights from worse.
    """
    compile_model(model, learning_rate)
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True, start_from_epoch=0
    )
    started = time.perf_counter()
    history = model.fit(
        train.x,
        train.y,
        validation_data=(val.x, val.y),
        batch_size=min(batch_size, len(train)),
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[stopper, _Progress(phase, epochs, live)],
    )
    seconds = time.perf_counter() - started
    val_accuracy = history.history["val_accuracy"]
    epochs_run = len(val_accuracy)
    best = int(np.argmin(history.history["val_loss"]))
    return FitResult(
        epochs_run=epochs_run,
        best_epoch=best + 1,
        best_val_accuracy=float(val_accuracy[best]),
        seconds=round(seconds, 3),
        images_per_second=round(epochs_run * len(train) / seconds, 1) if seconds else 0.0,
    )


def accuracy(model: keras.Model, split: Split, batch_size: int = 256) -> float:
    predicted = model.predict(split.x, batch_size=batch_size, verbose=0).argmax(axis=1)
    return float((predicted == split.y).mean())
