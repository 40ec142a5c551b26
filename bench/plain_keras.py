"""The hand-written Keras script a user would write instead of tlpipe: the end-to-end baseline.

    .venv/bin/python bench/plain_keras.py [--params params.yaml] [--data digits | --data CLEAN_DIR | --folders DIR] [--json]

Source training, weight transfer, two-phase fine-tuning and test evaluation of the embedded
digits task in one process, written the way the Keras transfer-learning guide teaches it. It does
the same training work as the pipeline and nothing else (no validation suite, no quarantine, no
checkpoints, no curves, no gates, no ONNX export):

- data: scikit-learn digits, source classes 0-4 and target classes 5-9 (params.yaml `data`),
  8x8 pixels scaled to 0..255; a stratified random split with `clean.val_fraction` /
  `clean.test_fraction` and `clean.target_train_per_class` target training images per class.
  With `--data CLEAN_DIR` it reads the pipeline's own cleaned folders instead (the same images);
  with `--folders DIR`, the user's folders DIR/{source,target}/<class>/* (bench/photos.py writes
  them), decoded, converted to `data.color_mode` and resized to `data.image_size` in memory.
- model: the pipeline's simple_cnn written out by hand (uint8 in, rescale and resize inside,
  3 blocks of 2x conv-BN-ReLU, global pooling, dropout, softmax), `model.width`, `model.dropout`.
- recipe: `source` and `finetune` sections of params.yaml: epochs, batch sizes, learning rates,
  early stopping on validation loss with its patience (best weights restored), and for
  fine-tuning warmup + cosine decay, label smoothing, balanced class weights and the same random
  augmentation, head phase on the frozen backbone (BatchNorm in inference mode), then all
  backbone layers unfrozen. A split smaller than `min_steps_per_epoch` batches is repeated, as
  the pipeline does, so both train the same number of steps.

Hyperparameters are read from params.yaml over the shipped defaults (components/core/defaults.yaml
beside it; plain yaml, no tlpipe code) so both sides always train the same recipe. Prints the test accuracy and per-phase seconds; `--json` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
STARTED = time.perf_counter()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

IMPORTED = time.perf_counter()


def merged(defaults: dict, over: dict) -> dict:
    """`over` on top of `defaults`, section by section (params.yaml holds only what it changes)."""
    out = dict(defaults)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_params(path: Path) -> dict:
    defaults = path.resolve().parent / "components" / "core" / "defaults.yaml"
    if not defaults.is_file():  # a params.yaml outside a tlpipe checkout: this checkout's defaults
        defaults = Path(__file__).resolve().parents[1] / "components" / "core" / "defaults.yaml"
    return merged(yaml.safe_load(defaults.read_text()), yaml.safe_load(path.read_text()) or {})


def digits(cfg: dict, seed: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{task: {split: (uint8 NHWC images, labels 0..k-1)}} from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    data = cfg["data"]
    raw = load_digits()
    pixels = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    tasks = {}
    for task, classes in (("source", data["embedded_source_classes"]), ("target", data["embedded_target_classes"])):
        keep = np.isin(raw.target, classes)
        tasks[task] = split(pixels[keep], np.searchsorted(classes, raw.target[keep]), cfg, seed, task)
    return tasks


def split(x: np.ndarray, y: np.ndarray, cfg: dict, seed: int, task: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A stratified random train/val/test split with clean's fractions and the target label budget."""
    from sklearn.model_selection import train_test_split

    clean = cfg["clean"]
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=clean["test_fraction"], stratify=y,
                                                      random_state=seed)
    val_share = clean["val_fraction"] / (1 - clean["test_fraction"])
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val_share, stratify=y_rest,
                                                      random_state=seed)
    budget = clean["target_train_per_class"]
    if task == "target" and budget is not None:
        chosen = np.concatenate([np.flatnonzero(y_train == k)[:budget] for k in range(int(y.max()) + 1)])
        x_train, y_train = x_train[chosen], y_train[chosen]
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def image_folders(cfg: dict, seed: int, root: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The user's own folders (root/{source,target}/<class>/*), decoded and resized as a plain script does."""
    from PIL import Image

    side, mode = cfg["data"]["image_size"], "RGB" if cfg["data"]["color_mode"] == "rgb" else "L"
    tasks = {}
    for task in ("source", "target"):
        classes = sorted(p.name for p in (root / task).iterdir() if p.is_dir())
        xs, ys = [], []
        for label, name in enumerate(classes):
            for file in sorted((root / task / name).iterdir()):
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert(mode).resize((side, side), Image.Resampling.BILINEAR))
                xs.append(pixels if pixels.ndim == 3 else pixels[..., None])
                ys.append(label)
        tasks[task] = split(np.stack(xs), np.asarray(ys), cfg, seed, task)
    return tasks


def clean_folders(root: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The same arrays read from a tlpipe data/clean folder (<task>/<split>/: uint8 .npy shards in the
    order split.json lists them, one label per row in index.csv; docs/data-format.md)."""
    import csv

    tasks = {}
    for task in ("source", "target"):
        classes = json.loads((root / task / "classes.json").read_text())
        tasks[task] = {}
        for split in ("train", "val", "test"):
            folder = root / task / split
            meta = json.loads((folder / "split.json").read_text())
            x = np.concatenate([np.load(folder / shard["file"]) for shard in meta["shards"]])
            with open(folder / "index.csv", newline="") as handle:
                y = np.asarray([classes.index(row["label"]) for row in csv.DictReader(handle)])
            tasks[task][split] = (x, y)
    return tasks


def backbone(side: int, width: int, channels: int) -> keras.Model:
    inputs = keras.Input((side, side, channels))
    x = inputs
    for block, filters in enumerate((width, width * 2, width * 4), start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = keras.layers.BatchNormalization(momentum=0.9)(x)
            x = keras.layers.ReLU()(x)
        if block < 3:
            x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="backbone")


def classifier(base: keras.Model, side: int, classes: int, dropout: float, frozen: bool) -> keras.Model:
    inputs = keras.Input((None, None, base.inputs[0].shape[-1]), dtype="uint8")
    x = keras.layers.Resizing(side, side)(keras.layers.Rescaling(1 / 255)(inputs))
    x = base(x, training=False) if frozen else base(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def augmented(model: keras.Model, ft: dict, seed: int) -> keras.Model:
    """Random augmentation in front of the model for training only, as the Keras guide does."""
    inputs = keras.Input(model.inputs[0].shape[1:], dtype="uint8")
    x = keras.layers.Rescaling(1.0)(inputs)
    if ft["augment_rotation"]:
        x = keras.layers.RandomRotation(ft["augment_rotation"], fill_mode="constant", seed=seed + 1)(x)
    if ft["augment_zoom"]:
        x = keras.layers.RandomZoom(ft["augment_zoom"], fill_mode="constant", seed=seed + 2)(x)
    if ft["augment_contrast"]:
        x = keras.layers.RandomContrast(ft["augment_contrast"], value_range=(0, 255), seed=seed + 3)(x)
    x = keras.ops.cast(keras.ops.clip(keras.ops.round(x), 0, 255), "uint8")
    return keras.Model(inputs, model(x))


def train(model: keras.Model, train_xy: tuple, val_xy: tuple, epochs: int, batch: int, rate: object,
          patience: int, smoothing: float = 0.0, class_weight: dict | None = None) -> dict:
    model.compile(keras.optimizers.Adam(rate), keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
                  metrics=["accuracy"])
    classes = model.outputs[0].shape[-1]
    (x, y), (vx, vy) = train_xy, val_xy
    stop = keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
    start = time.perf_counter()
    history = model.fit(x, keras.utils.to_categorical(y, classes), batch_size=batch, epochs=epochs, verbose=0,
                        validation_data=(vx, keras.utils.to_categorical(vy, classes)), class_weight=class_weight,
                        callbacks=[stop])
    seconds = time.perf_counter() - start
    ran = len(history.history["loss"])
    return {"epochs": ran, "seconds": round(seconds, 3), "images_per_second": round(ran * len(x) / seconds, 1)}


def repeated(xy: tuple, batch: int, min_steps: int) -> tuple:
    times = max(1, math.ceil(min_steps * batch / len(xy[0])))
    return tuple(np.concatenate([a] * times) for a in xy)


def cosine(rate: float, warmup_epochs: int, epochs: int, steps: int, enabled: bool) -> object:
    if not enabled:
        return rate
    warmup = min(warmup_epochs, epochs) * steps
    return keras.optimizers.schedules.CosineDecay(0.0, max(epochs * steps - warmup, 1), warmup_target=rate,
                                                  warmup_steps=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", default="digits", help="digits (scikit-learn) or a tlpipe clean folder")
    parser.add_argument("--folders", type=Path, help="image folders FOLDERS/{source,target}/<class>/* instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = read_params(args.params)
    seed, side, src, ft = cfg["seed"], cfg["data"]["image_size"], cfg["source"], cfg["finetune"]
    keras.utils.set_random_seed(seed)
    if args.folders:
        tasks = image_folders(cfg, seed, args.folders)
    else:
        tasks = digits(cfg, seed) if args.data == "digits" else clean_folders(Path(args.data))
    channels = tasks["source"]["train"][0].shape[-1]
    report: dict = {"import_seconds": round(IMPORTED - STARTED, 3)}

    # Source model, trained from scratch on the source task.
    source_classes = int(tasks["source"]["train"][1].max()) + 1
    source = classifier(backbone(side, cfg["model"]["width"], channels), side, source_classes, cfg["model"]["dropout"], False)
    report["source"] = train(source, tasks["source"]["train"], tasks["source"]["val"], src["epochs"],
                             src["batch_size"], src["learning_rate"], src["patience"])

    # Transfer: a fresh backbone takes the source backbone's weights, frozen, with a new head.
    target_train, target_val = tasks["target"]["train"], tasks["target"]["val"]
    target_classes = int(target_train[1].max()) + 1
    base = backbone(side, cfg["model"]["width"], channels)
    base.set_weights(source.get_layer("backbone").get_weights())
    base.trainable = False
    target = classifier(base, side, target_classes, cfg["model"]["dropout"], True)

    # Fine-tuning: head on the frozen backbone, then everything at a lower rate.
    batch = min(ft["batch_size"], len(target_train[0]))
    train_xy = repeated(target_train, batch, ft["min_steps_per_epoch"])
    steps = math.ceil(len(train_xy[0]) / batch)
    counts = np.bincount(target_train[1], minlength=target_classes)
    weights = {k: len(target_train[1]) / (target_classes * c) for k, c in enumerate(counts)} \
        if ft["class_weight"] == "balanced" else None
    trainer = augmented(target, ft, seed)
    for phase, epochs, rate in (("head", ft["head_epochs"], ft["head_learning_rate"]),
                                ("unfrozen", ft["epochs"], ft["learning_rate"])):
        if phase == "unfrozen":
            base.trainable = True
        if not epochs:  # a phase switched off in params.yaml (head_epochs: 0), as the stage skips it
            report[phase] = {"epochs": 0, "seconds": 0.0, "images_per_second": 0.0}
            continue
        report[phase] = train(trainer, train_xy, target_val, epochs, batch,
                              cosine(rate, ft["warmup_epochs"], epochs, steps, ft["cosine_decay"]), ft["patience"],
                              ft["label_smoothing"], weights)

    x_test, y_test = tasks["target"]["test"]
    report["test_accuracy"] = round(float((target.predict(x_test, verbose=0).argmax(1) == y_test).mean()), 4)
    report["total_seconds"] = round(time.perf_counter() - STARTED, 3)
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
