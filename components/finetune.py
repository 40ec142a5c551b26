"""Stage `finetune`: train the head on the frozen backbone, then unfreeze its top layers at a lower rate.

Which layers train in each phase is decided by components.training.trainability alone.

Every epoch ends with a checkpoint (paths.finetune_checkpoint), so a killed run continues from its
last completed epoch when rerun; the finished model is written whole or not at all. Several
processes train together when the environment names a cluster (components.training.distributed);
process 0 alone writes, and the others resume from its checkpoint, which must be on storage they read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import keras

from components.core.reports import FinetuneReport, write_report
from components.core.config import Params
from components.data.dataset import Split, load_split
from components.training.distributed import agree, join
from components.training.models import BACKBONE_NAME, MODEL_FILE, load_model_dir, save_model_dir
from components.training.trainability import Trainable, set_phase
from components.training.trainer import (
    Checkpoint, Curves, FitResult, accelerators, data_parallel, evaluate, fit, prepare_backend, recipe, with_precision,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    val_accuracy: float
    kept_phase: str

    def __str__(self) -> str:
        return f"best val accuracy {self.val_accuracy:.4f} (kept the {self.kept_phase} weights)"


def _fingerprint(params: Params, train: Split, val: Split) -> str:
    """What a checkpoint must match to be resumed: the starting model, the data, the recipe and seed.

    Not `precision` as written (auto): the checkpoint's settings hold the policy it resolved to.
    """
    digest = hashlib.sha256()
    digest.update((params.paths.transferred_model / MODEL_FILE).read_bytes())
    recipe = params.finetune.model_dump(mode="json", exclude={"precision"})
    digest.update(json.dumps([params.seed, recipe], sort_keys=True).encode())
    for split in (train, val):
        digest.update(split.fingerprint().encode())
    return digest.hexdigest()


def run(params: Params) -> FinetuneResult:
    cfg = params.finetune
    cluster = join()  # first: JAX's multi-process set-up and XLA's flags precede any device use
    policy = prepare_backend(cfg.precision)
    train, val = load_split(params.paths.clean, "target", "train"), load_split(params.paths.clean, "target", "val")
    keras.utils.set_random_seed(params.seed)
    checkpoint = Checkpoint(params.paths.finetune_checkpoint, _fingerprint(params, train, val),
                            {"backend": keras.backend.backend(), "precision": policy}, writer=cluster.is_chief)
    resuming = checkpoint.load()
    with data_parallel(cfg.data_parallel or cluster.count > 1) as devices:
        model, classes = load_model_dir(params.paths.transferred_model)
        trainee = with_precision(model, policy)
        log.info("fine-tuning on %d images of %d classes (backend %s, %s, %d replica(s), accelerators: %s)",
                 len(train), len(classes), keras.backend.backend(), policy, max(len(devices), 1),
                 accelerators() or "none")
        phases = {name: FitResult(**{k: tuple(v) if isinstance(v, list) else v for k, v in result.items()})
                  for name, result in checkpoint.context.get("phases", {}).items()}
        epochs_done = sum(p.epochs_run for p in phases.values()) + (checkpoint.state or {}).get("epoch", 0)
        agree(epochs_done, "a checkpoint after epoch", f"put paths.finetune_checkpoint ({checkpoint.directory}) "
              "on storage every worker reads, or delete it on every worker")
        curves = Curves(params.paths.training_curves / "finetune", resume_at=epochs_done) \
            if cluster.is_chief else None
        common = dict(batch_size=cfg.batch_size, patience=cfg.patience, curves=curves, recipe=recipe(cfg),
                      checkpoint=checkpoint, seed=params.seed)
        trainable: dict[str, Trainable] = {}
        if cfg.head_epochs:
            trainable["head"] = set_phase(trainee, "head")
            log.info("%s", trainable["head"])
        if cfg.head_epochs and "head" not in phases:
            phases["head"] = fit(trainee, train, val, phase="head", epochs=cfg.head_epochs,
                                 learning_rate=cfg.head_learning_rate, **common)
            checkpoint.context["phases"] = {name: asdict(result) for name, result in phases.items()}
        kept = "head" if cfg.head_epochs else "transferred"
        if "head" in checkpoint.context_arrays:  # resumed in phase 2: the head phase's result, saved
            best_loss, best_weights = checkpoint.context["head_loss"], checkpoint.context_arrays["head"]
        else:
            best_loss, best_weights = evaluate(trainee, val)["loss"], trainee.get_weights()
            checkpoint.context["head_loss"], checkpoint.context_arrays["head"] = best_loss, best_weights
        # The second phase runs when it trains more than the first: some backbone layer besides BatchNorm.
        unfrozen = set_phase(trainee, "unfrozen", cfg.unfreeze_top) if cfg.epochs else None
        if unfrozen is not None and unfrozen.backbone:
            trainable["unfrozen"] = unfrozen
            log.info("%s", unfrozen)
            phases["unfrozen"] = fit(trainee, train, val, phase="unfrozen", epochs=cfg.epochs,
                                     learning_rate=cfg.learning_rate, **common)
            loss = evaluate(trainee, val)["loss"]
            if loss <= best_loss:
                kept, best_loss = "unfrozen", loss
            else:
                log.info("unfreezing did not lower validation loss (%.4f > %.4f): keeping the head-phase "
                         "weights", loss, best_loss)
                trainee.set_weights(best_weights)
        if trainee is not model:  # the float32 original is what gets saved and exported
            set_phase(model, *(("unfrozen", cfg.unfreeze_top) if "unfrozen" in trainable else ("head",)))
            model.set_weights(trainee.get_weights())
        # Both reported figures from the model that is saved (trainee may compute in bf16).
        final = evaluate(model, val)
    if not cluster.is_chief:
        log.info("process %d of %d: done; process 0 writes the model and reports", cluster.index, cluster.count)
        return FinetuneResult(final["accuracy"], kept)
    save_model_dir(model, classes, params.paths.finetuned_model)
    write_report(params.paths.finetune_report, FinetuneReport.model_validate({
        "backend": keras.backend.backend(),
        "precision": policy,
        # What the backbone really computed in (mixed precision is active when this is float16/bfloat16).
        "compute_dtype": sorted({layer.compute_dtype for layer in trainee.get_layer(BACKBONE_NAME).layers
                                 if layer.weights}),
        "replicas": max(len(devices), 1),
        "devices": list(devices),  # the devices each batch was split between (empty: no data parallelism)
        "workers": cluster.count,  # processes that trained together (components.training.distributed)
        "resumed": resuming,
        "train_images": len(train),
        "val_images": len(val),
        "kept_phase": kept,
        "val_loss": round(final["loss"], 6),
        "val_accuracy": round(final["accuracy"], 6),
        "phases": {name: asdict(result) for name, result in phases.items()},
        # Per phase that ran, the weighted layers it trained (components.training.trainability decides).
        "trainable": {name: [*what.backbone, *what.others] for name, what in trainable.items()},
    }))
    checkpoint.finish()
    return FinetuneResult(final["accuracy"], kept)
