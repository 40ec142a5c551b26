"""Stage `source`: train the source model on the source task, download pretrained weights, or pretrain
the backbone on unlabelled images (self-supervised).

Training runs on several processes when the environment names a cluster
(components.training.distributed); process 0 alone writes the model and reports.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from components.core.config import Params
from components.core.reports import SourceReport, write_report
from components.data.dataset import load_split
from components.training.download import cache_dir_from, fetch, fetch_imagenet
from components.core.errors import PipelineError
from components.training.distributed import Cluster, join
from components.training.models import build_model, load_keras_file, save_model_dir, uses_application
from components.training.trainer import Curves, accuracy, data_parallel, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceResult:
    mode: str
    test_accuracy: float | None

    def __str__(self) -> str:
        if self.test_accuracy is None:
            return f"{self.mode}: pretrained backbone ready"
        return f"{self.mode}: source test accuracy {self.test_accuracy:.4f}"


def _train(params: Params, cluster: Cluster) -> tuple[keras.Model, tuple[str, ...], dict]:
    clean, cfg = params.paths.clean, params.source
    train, val, test = (load_split(clean, "source", split) for split in ("train", "val", "test"))
    keras.utils.set_random_seed(params.seed)
    with data_parallel(cluster.count > 1):
        model = build_model(params.model, params.data, len(train.classes), bn_inference=False)
        log.info("training the source model on %d images of %d classes", len(train), len(train.classes))
        result = fit(
            model, train, val, phase="source", epochs=cfg.epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, patience=cfg.patience,
            curves=Curves(params.paths.training_curves / "source") if cluster.is_chief else None, seed=params.seed,
        )
        test_accuracy = accuracy(model, test)
    report = {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_accuracy": round(result.best_val_accuracy, 6),
        "test_accuracy": round(test_accuracy, 6),
        "train_images": len(train),
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "workers": cluster.count,
    }
    return model, train.classes, report


def _self_supervised(params: Params) -> tuple[keras.Model, None, dict]:
    from components.training.self_supervised import pretrain, unlabeled_pool

    params.paths.source_model.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tlpipe-unlabeled-", dir=params.paths.source_model.parent) as workdir:
        pool, counts = unlabeled_pool(params, Path(workdir))
        log.info("unlabelled images: %s", ", ".join(f"{n} from {name}" for name, n in counts.items()))
        encoder, result = pretrain(params, pool)
    return encoder, None, {"method": "simclr", "images": counts, "epochs_run": result.epochs,
                           "final_loss": result.final_loss, "seconds": result.seconds,
                           "images_per_second": result.images_per_second}


def _download(params: Params) -> tuple[keras.Model, None, dict]:
    cfg = params.source
    if cfg.weights == "imagenet":
        if not uses_application(params.model):
            raise PipelineError(
                f"weights: imagenet needs a Keras Applications backbone (model.backbone), not {params.model.backbone}"
            )
        path = fetch_imagenet(params.model.backbone, cfg.mirror, cfg.sha256, cache_dir_from(cfg.cache_dir))
        model = build_model(params.model, params.data, None, bn_inference=False, backbone_weights=path)
        return model, None, {"weights": "imagenet", "backbone": params.model.backbone, "file": str(path)}
    path = fetch(cfg.weights, cfg.sha256, cache_dir_from(cfg.cache_dir))
    if path.name.endswith(".weights.h5"):
        # The weights of a headless model of the configured backbone (what a `source` run saves).
        model = build_model(params.model, params.data, None, bn_inference=False)
        try:
            model.load_weights(path)
        except ValueError as error:
            raise PipelineError(f"{path} does not fit backbone {params.model.backbone}: {error}") from None
    elif path.suffix == ".keras":
        model = load_keras_file(path)
    else:
        raise PipelineError(f"{path}: source.weights must be a .keras or .weights.h5 file")
    return model, None, {"weights": cfg.weights, "sha256": cfg.sha256, "file": str(path)}


def run(params: Params) -> SourceResult:
    started = time.perf_counter()
    if params.source.mode == "train":
        cluster = join()
        model, classes, report = _train(params, cluster)
        if not cluster.is_chief:
            return SourceResult(params.source.mode, report["test_accuracy"])
    elif params.source.mode == "self_supervised":
        model, classes, report = _self_supervised(params)
        (params.paths.training_curves / "source" / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    else:
        model, classes, report = _download(params)
        # dvc.yaml declares the curves folder as the stage's plots; a download has no curves to draw.
        (params.paths.training_curves / "source" / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    save_model_dir(model, classes, params.paths.source_model)
    write_report(params.paths.source_report, SourceReport(mode=params.source.mode, **report,
                                                          total_seconds=round(time.perf_counter() - started, 3)))
    return SourceResult(params.source.mode, report.get("test_accuracy"))
