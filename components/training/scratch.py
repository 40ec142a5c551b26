"""The from-scratch baseline: the target model trained from random weights with fine-tuning's budget and recipe.

Transfer learning promises better accuracy from fewer labels and less time; this is what it is
measured against (the `scratch` stage, scratch.enabled), never assumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

from components.core.config import Params
from components.data.dataset import load_split
from components.training.models import build_model
from components.training.trainer import FitResult, accuracy, fit, recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScratchResult:
    test_accuracy: float
    train_images: int
    fit: FitResult


def train_scratch(params: Params) -> ScratchResult:
    """One phase of head_epochs + epochs epochs, all layers trainable, at the head learning rate.

    The same data, seed, batch size, patience, schedule, smoothing, class weights and augmentation
    as fine-tuning; only the starting weights (random) and the phases differ.
    """
    cfg = params.finetune
    train, val, test = (load_split(params.paths.clean, "target", split) for split in ("train", "val", "test"))
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, len(train.classes), bn_inference=False)
    epochs = max(cfg.head_epochs + cfg.epochs, 1)
    log.info("training a from-scratch baseline on %d images for up to %d epochs", len(train), epochs)
    result = fit(model, train, val, phase="scratch", epochs=epochs, batch_size=cfg.batch_size,
                 learning_rate=cfg.head_learning_rate, patience=cfg.patience, recipe=recipe(cfg), seed=params.seed)
    return ScratchResult(accuracy(model, test), len(train), result)
