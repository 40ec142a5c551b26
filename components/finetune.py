"""Stage `finetune`: train the head on the frozen backbone, then unfreeze its top layers at a lower rate."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

from components.artifacts import write_json
from components.config import Params
from components.dataset import Split, load_split
from components.models import BACKBONE_NAME, load_model_dir, save_model_dir
from components.training import FitResult, compile_model, fit, open_curves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    val_accuracy: float
    kept_phase: str

    def __str__(self) -> str:
        return f"best val accuracy {self.val_accuracy:.4f} (kept the {self.kept_phase} weights)"


def unfreeze_top(model: keras.Model, count: int) -> list[str]:
    """Make the top `count` weighted backbone layers trainable (-1: all); returns their names."""
    backbone = model.get_layer(BACKBONE_NAME)
    weighted = [layer for layer in backbone.layers if layer.weights]
    chosen = weighted if count < 0 else weighted[len(weighted) - count :] if count else []
    backbone.trainable = bool(chosen)
    for layer in weighted:
        layer.trainable = layer in chosen
    return [layer.name for layer in chosen]


def _val_loss(model: keras.Model, val: Split) -> float:
    return float(model.evaluate(val.x, val.y, verbose=0, return_dict=True)["loss"])


def run(params: Params) -> FinetuneResult:
    cfg = params.finetune
    model, classes = load_model_dir(params.paths.transferred_model)
    train, val = load_split(params.paths.clean, "target", "train"), load_split(params.paths.clean, "target", "val")
    keras.utils.set_random_seed(params.seed)
    log.info("fine-tuning on %d images of %d classes (backbone: %s)", len(train), len(classes),
             keras.backend.backend())
    compile_model(model, cfg.head_learning_rate)
    live = open_curves(params.paths.training_curves / "finetune")
    phases: dict[str, FitResult] = {}
    try:
        common = dict(batch_size=cfg.batch_size, patience=cfg.patience, live=live)
        if cfg.head_epochs:
            phases["head"] = fit(model, train, val, phase="head", epochs=cfg.head_epochs,
                                 learning_rate=cfg.head_learning_rate, **common)
        kept = "head" if cfg.head_epochs else "transferred"
        best_loss, best_weights = _val_loss(model, val), model.get_weights()
        unfrozen = unfreeze_top(model, cfg.unfreeze_top) if cfg.epochs else []
        if unfrozen:
            log.info("unfreezing %d backbone layers: %s", len(unfrozen), ", ".join(unfrozen))
            phases["unfrozen"] = fit(model, train, val, phase="unfrozen", epochs=cfg.epochs,
                                     learning_rate=cfg.learning_rate, **common)
            loss = _val_loss(model, val)
            if loss <= best_loss:
                kept, best_loss = "unfrozen", loss
            else:
                log.info("unfreezing did not lower validation loss (%.4f > %.4f): keeping the head-phase weights",
                         loss, best_loss)
                model.set_weights(best_weights)
    finally:
        live.end()
    val_accuracy = float(model.evaluate(val.x, val.y, verbose=0, return_dict=True)["accuracy"])
    save_model_dir(model, classes, params.paths.finetuned_model)
    write_json(params.paths.finetune_report, {
        "backend": keras.backend.backend(),
        "train_images": len(train),
        "val_images": len(val),
        "kept_phase": kept,
        "val_loss": round(best_loss, 6),
        "val_accuracy": round(val_accuracy, 6),
        "phases": {name: vars(result) for name, result in phases.items()},
    })
    return FinetuneResult(val_accuracy, kept)
