"""Self-supervised pretraining of the backbone on unlabelled images: SimCLR (two augmented views, NT-Xent).

Chosen by measurement on the embedded digits against a rotation-prediction pretext task
(bench/bench_ssl_methods.py, docs/self-supervised.md): linear-probe accuracy per CPU minute.

The unlabelled pool (`unlabeled_pool`) is the target's train split with the images the label
budget held back (labels ignored), the source's train split (labels ignored), and/or a folder of
images; never a target val or test image. It is written as one on-disk split and read through
the streaming feed (components.data.stream), so memory stays flat as it grows. The augmentations
are Keras layers inside the training model; the saved model is the plain encoder of
`models.build_model` (headless), so transfer, fine-tuning and export read it like any source.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from components.core.config import Params, SelfSupervisedParams
from components.core.errors import PipelineError
from components.data.dataset import HELD_BACK, Split, SplitWriter, load_split
from components.data.images import is_image_name, load_normalized, sha256_file
from components.data.stream import TrainFeed, replicas
from components.training.models import build_model
from components.training.trainer import Throughput, ToPixels, jit_on_jax

log = logging.getLogger(__name__)

POOL_CLASS = "unlabeled"
SETTING = "source.self_supervised"


@dataclass(frozen=True)
class PretrainResult:
    epochs: int
    images: int
    final_loss: float
    seconds: float
    images_per_second: float


def _folder_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PipelineError(f"{SETTING}.folder {folder} is not a folder: point it at your unlabelled images or set it to \"\"")
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p))


def _target_looks(params: Params) -> tuple[set[str], tuple[int, int], tuple[int, int]]:
    """The target's image modes and its range of widths and heights, from validate's manifest."""
    if not params.paths.manifest.is_file():
        raise PipelineError(f"{params.paths.manifest} not found: run the validate stage first (dvc repro validate)")
    with open(params.paths.manifest, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["task"] == "target" and not r["error"]]
    widths, heights = [int(r["width"]) for r in rows], [int(r["height"]) for r in rows]
    return {r["mode"] for r in rows}, (min(widths), max(widths)), (min(heights), max(heights))


def _check_folder(params: Params, files: list[Path], held_out: set[str]) -> list[str]:
    """Refuse a folder that overlaps the target's val/test split, or whose images look unlike the target's."""
    from PIL import Image

    hashes = [sha256_file(path) for path in files]
    leaked = [str(path) for path, digest in zip(files, hashes) if digest in held_out]
    if leaked:
        raise PipelineError(
            f"{SETTING}.folder: {len(leaked)} of its {len(files)} images are also in the target's val or test split "
            f"(same content), e.g. {leaked[0]}: pretraining on them would leak the evaluation data; remove them")
    modes, (w_low, w_high), (h_low, h_high) = _target_looks(params)
    off: list[str] = []
    unreadable: list[str] = []
    for path in files:
        try:
            with Image.open(path) as image:  # reads the header only
                mode, (width, height) = image.mode, image.size
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable.append(str(path))
            continue
        if mode not in modes or not (w_low <= width <= w_high and h_low <= height <= h_high):
            off.append(f"{path} ({mode} {width}x{height})")
    if unreadable:
        raise PipelineError(f"{SETTING}.folder: {len(unreadable)} of its {len(files)} files are not readable images, "
                            f"e.g. {unreadable[0]}: remove or replace them")
    if off:
        raise PipelineError(
            f"{SETTING}.folder: {len(off)} of its {len(files)} images differ in mode or size from the target's "
            f"(modes {sorted(modes)}, {w_low}-{w_high} x {h_low}-{h_high} px), e.g. {off[0]}: use images of the "
            "target's kind, or leave them out")
    return hashes


def unlabeled_pool(params: Params, workdir: Path) -> tuple[Split, dict[str, int]]:
    """Write the unlabelled images the settings name into one split under `workdir`; (it, count by origin).

    Checks come first, before any image is copied: a folder that overlaps the target's val/test
    split or holds images unlike the target's, and a pool smaller than one batch.
    """
    cfg: SelfSupervisedParams = params.source.self_supervised
    clean = params.paths.clean
    parts: dict[str, Split] = {}
    if "target" in cfg.images:
        parts["target train"] = load_split(clean, "target", "train")
        if (clean / "target" / HELD_BACK).is_dir():
            parts["target held back by the label budget"] = load_split(clean, "target", HELD_BACK)
    if "source" in cfg.images:
        parts["source train"] = load_split(clean, "source", "train")
    files: list[Path] = []
    hashes: list[str] = []
    if cfg.folder:
        files = _folder_images(Path(cfg.folder))
        held_out = {digest for split in ("val", "test") for digest in load_split(clean, "target", split).sha256}
        hashes = _check_folder(params, files, held_out)
    counts = {name: len(split) for name, split in parts.items()}
    if cfg.folder:
        counts[f"folder {cfg.folder}"] = len(files)
    total = sum(counts.values())
    needed = cfg.batch_size * replicas()
    if total < needed:
        listed = ", ".join(f"{n} from {name}" for name, n in counts.items()) or "none"
        raise PipelineError(
            f"{SETTING}: {total} unlabelled images ({listed}), fewer than one batch of {SETTING}.batch_size={needed}: "
            f"lower batch_size, or add images ({SETTING}.images, {SETTING}.folder)")
    side, channels = params.data.image_size, params.data.channels
    task = Path(workdir) / "pool"  # the layout load_split reads: <root>/<task>/classes.json, <task>/<split>/
    task.mkdir(parents=True, exist_ok=True)
    (task / "classes.json").write_text(f'["{POOL_CLASS}"]\n')
    with SplitWriter(task / POOL_CLASS, (POOL_CLASS,), (side, side, channels), total) as writer:
        for split in parts.values():
            for start in range(0, len(split), 256):
                positions = np.arange(start, min(start + 256, len(split)))
                for position, pixels in zip(positions, split.images(positions)):
                    writer.add(pixels, POOL_CLASS, split.paths[position], split.sha256[position])
        for path, digest in zip(files, hashes):
            pixels = np.asarray(load_normalized(path, side, params.data.pil_mode), dtype=np.uint8)
            writer.add(pixels, POOL_CLASS, os.fspath(path), digest)
    return load_split(Path(workdir), "pool", POOL_CLASS), counts


class NTXent(keras.losses.Loss):
    """SimCLR's normalized-temperature cross-entropy over a batch of 2N projections (view 1, then view 2).

    Each projection's positive is the other view of its image; the other 2N-2 are its negatives.
    The labels Keras passes are ignored.
    """

    def __init__(self, temperature: float, name: str = "nt_xent", **kwargs: object) -> None:
        super().__init__(name=name, **kwargs)
        self.temperature = temperature

    def call(self, y_true: object, y_pred: object) -> object:
        ops = keras.ops
        z = ops.cast(y_pred, "float32")
        z = z / ops.sqrt(ops.sum(z * z, axis=1, keepdims=True) + 1e-12)
        n2 = ops.shape(z)[0]
        logits = ops.matmul(z, ops.transpose(z)) / self.temperature
        logits = logits - ops.eye(n2) * 1e9  # an image is not its own positive
        positives = (ops.arange(n2) + n2 // 2) % n2
        chosen = ops.take_along_axis(logits, ops.expand_dims(positives, 1), axis=1)[:, 0]
        return ops.logsumexp(logits, axis=1) - chosen

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


def _augmenter(cfg: SelfSupervisedParams, seed: int) -> list[keras.layers.Layer]:
    """One random view of a float 0..1 image batch: crop-like shift and zoom, a small turn, contrast, noise."""
    layers: list[keras.layers.Layer] = []
    if cfg.augment_translation:
        layers.append(keras.layers.RandomTranslation(cfg.augment_translation, cfg.augment_translation,
                                                     fill_mode="constant", seed=seed))
    if cfg.augment_zoom:
        layers.append(keras.layers.RandomZoom(cfg.augment_zoom, fill_mode="constant", seed=seed + 1))
    if cfg.augment_rotation:
        layers.append(keras.layers.RandomRotation(cfg.augment_rotation, fill_mode="constant", seed=seed + 2))
    if cfg.augment_contrast:
        layers.append(keras.layers.RandomContrast(cfg.augment_contrast, value_range=(0, 1), seed=seed + 3))
    if cfg.augment_noise:
        layers.append(keras.layers.GaussianNoise(cfg.augment_noise, seed=seed + 4))
    jit_on_jax(layers)
    return layers


def contrastive_model(encoder: keras.Model, cfg: SelfSupervisedParams, seed: int) -> keras.Model:
    """uint8 images -> two augmented views -> the shared encoder -> projection head: (2N, projection_dim)."""
    inputs = keras.Input(encoder.inputs[0].shape[1:], dtype="uint8", name="images")
    pixels = keras.layers.Rescaling(1.0 / 255, name="to_unit")(inputs)
    views = []
    for view in (1, 2):
        x = pixels
        for layer in _augmenter(cfg, seed + 10 * view):
            x = layer(x)
        # Back to uint8: the encoder takes raw pixels, like the exported model.
        views.append(ToPixels(name=f"view{view}")(keras.layers.Rescaling(255.0)(x)))
    both = keras.layers.Concatenate(axis=0, name="views")(views)
    features = encoder(both)
    x = keras.layers.Dense(cfg.projection_dim, activation="relu", name="projection_hidden")(features)
    outputs = keras.layers.Dense(cfg.projection_dim, name="projection")(x)
    return keras.Model(inputs, outputs, name="simclr")


class _Epoch(keras.callbacks.Callback):
    """Sets the feed's epoch (its shuffle order) and logs each epoch's loss."""

    def __init__(self, feed: TrainFeed, epochs: int) -> None:
        super().__init__()
        self.feed, self.epochs, self.losses = feed, epochs, []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.feed.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.losses.append(float((logs or {}).get("loss", float("nan"))))
        log.info("self-supervised epoch %d/%d: loss %.4f", epoch + 1, self.epochs, self.losses[-1])


def pretrain(params: Params, pool: Split) -> tuple[keras.Model, PretrainResult]:
    """Train a headless encoder (build_model with no head) on `pool` with SimCLR; the encoder and a summary."""
    cfg = params.source.self_supervised
    keras.utils.set_random_seed(params.seed)
    encoder = build_model(params.model, params.data, None, bn_inference=False)
    model = contrastive_model(encoder, cfg, params.seed)
    feed = TrainFeed(pool, cfg.batch_size, seed=params.seed, multiple=replicas())
    steps = len(feed)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, max(cfg.epochs * steps - steps, 1),
                                                      warmup_target=cfg.learning_rate, warmup_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=NTXent(cfg.temperature))
    epochs = _Epoch(feed, cfg.epochs)
    throughput = Throughput(steps * feed.batch_size)
    log.info("self-supervised pretraining (SimCLR) on %d unlabelled images, %d epochs of %d steps",
             len(pool), cfg.epochs, steps)
    started = time.perf_counter()
    model.fit(feed, epochs=cfg.epochs, verbose=0, callbacks=[epochs, throughput])
    seconds = time.perf_counter() - started
    if not np.isfinite(epochs.losses[-1]):
        raise PipelineError(f"self-supervised pretraining diverged (loss {epochs.losses[-1]}): "
                            f"lower {SETTING}.learning_rate")
    return encoder, PretrainResult(cfg.epochs, len(pool), round(epochs.losses[-1], 6), round(seconds, 3),
                                   round(throughput.images_per_second, 1))
