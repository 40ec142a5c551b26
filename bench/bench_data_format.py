"""The split format, chosen by measurement: disk size and shuffled-batch read throughput of candidate
formats, and `fit` throughput of the streaming feed against `fit` on an in-memory array.

    .venv/bin/python bench/bench_data_format.py formats [--images 2000] [--size 160]
    .venv/bin/python bench/bench_data_format.py fit --backend tensorflow|jax [--images 1024] [--size 96]
    .venv/bin/python bench/bench_data_format.py fit --split DATA_CLEAN/target/train   # a pipeline's own split

Images: random crops (random position and scale) of the photographs scikit-learn and matplotlib
ship (china.jpg, flower.jpg, grace_hopper.jpg), resized to --size px RGB: real photo statistics,
so PNG/JPEG sizes are realistic. Generated in a temporary folder, removed at the end.

formats: each candidate holds the same images; read throughput is shuffled batches of 64 images
as uint8 arrays, the whole split once (files dropped from nothing: the page cache is warm, as on
the second epoch of a split that fits in RAM; cold reads are disk-bound for every format alike).
- shards: uint8 .npy shards + index (components/data/dataset.py), positional reads.
- tfrecord-png / tfrecord-jpeg: one TFRecord file of encoded images, tf.data with a 1,000-image
  shuffle buffer, parallel decode (AUTOTUNE), batch 64.
- png-folders: today's layout, one PNG per image, decoded with Pillow in random order.

fit: one process per backend; the same model (the project's default backbone, width from
params.yaml) and batch 32, 2 epochs each after a 1-epoch warm-up: `fit` on the feed
(components.data.stream.TrainFeed over shards) and `fit` on the same images as one in-memory
numpy array (shuffle=True). Images/s of the timed epochs, and the ratio feed / in-memory; also per
CPU second of the process (all its threads), which the load of other processes on the machine
moves much less than wall time. With --split, the images are a split clean wrote (its size and
classes), e.g. the target training split of bench/bench_real.py's repository at 10k images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def photos() -> list[np.ndarray]:
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    found = list(load_sample_images().images)
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        found.append(np.asarray(Image.open(handle).convert("RGB")))
    return found


def crops(count: int, size: int, seed: int = 0):
    """`count` (image, label) pairs: random crops of the sample photos, label = which photo."""
    rng = np.random.default_rng(seed)
    sources = photos()
    for i in range(count):
        label = i % len(sources)
        photo = sources[label]
        side = int(rng.integers(min(photo.shape[:2]) // 4, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        yield np.asarray(crop), label


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def formats(images: int, size: int) -> dict:
    import tensorflow as tf

    from components.data.dataset import SplitWriter, load_split

    root = Path(tempfile.mkdtemp(prefix="tlpipe-format-"))
    try:
        classes = ["china", "flower", "hopper"]
        (root / "clean" / "t").mkdir(parents=True)
        (root / "clean" / "t" / "classes.json").write_text(json.dumps(classes))
        pngs = root / "png"
        writers = {kind: tf.io.TFRecordWriter(str(root / f"{kind}.tfrecord")) for kind in ("png", "jpeg")}
        started = time.perf_counter()
        with SplitWriter(root / "clean" / "t" / "train", classes, (size, size, 3), images) as shards:
            for i, (pixels, label) in enumerate(crops(images, size)):
                shards.add(pixels, classes[label], f"{i}.png", str(i))
                folder = pngs / classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{i:06d}.png")
                for kind in ("png", "jpeg"):
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format=kind.upper(), **({"quality": 95} if kind == "jpeg" else {}))
                    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
                               "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
                    writers[kind].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        for writer in writers.values():
            writer.close()
        log = {"images": images, "size": size, "generate_and_write_seconds": round(time.perf_counter() - started, 1)}

        def timed(read) -> float:
            read()  # warm: page cache and tracing
            start = time.perf_counter()
            count = read()
            assert count == images, count
            return round(images / (time.perf_counter() - start), 1)

        split = load_split(root / "clean", "t", "train")

        def read_shards() -> int:
            order = np.random.default_rng(1).permutation(images)
            return sum(len(split.images(order[i : i + 64])) for i in range(0, images, 64))

        def read_tfrecord(kind: str):
            spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}

            def parse(record):
                example = tf.io.parse_single_example(record, spec)
                return tf.io.decode_image(example["image"], channels=3, expand_animations=False), example["label"]

            def read() -> int:
                data = (tf.data.TFRecordDataset(str(root / f"{kind}.tfrecord")).shuffle(1000, seed=1)
                        .map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(tf.data.AUTOTUNE))
                return sum(int(x.shape[0]) for x, _ in data)
            return read

        files = sorted(pngs.rglob("*.png"))

        def read_pngs() -> int:
            order = np.random.default_rng(1).permutation(len(files))
            count = 0
            for i in range(0, len(files), 64):
                batch = np.stack([np.asarray(Image.open(files[j])) for j in order[i : i + 64]])
                count += len(batch)
            return count

        log["formats"] = {
            "shards": {"bytes": _du(root / "clean"), "files": len(list((root / "clean").rglob("*.npy"))),
                       "images_per_second": timed(read_shards)},
            "tfrecord-png": {"bytes": _du(root / "png.tfrecord"), "files": 1,
                             "images_per_second": timed(read_tfrecord("png"))},
            "tfrecord-jpeg": {"bytes": _du(root / "jpeg.tfrecord"), "files": 1,
                              "images_per_second": timed(read_tfrecord("jpeg"))},
            "png-folders": {"bytes": _du(pngs), "files": len(files), "images_per_second": timed(read_pngs)},
        }
        return log
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fit(images: int, size: int, epochs: int = 2, batch: int = 32, split_dir: Path | None = None) -> dict:
    import keras

    from components.core.config import load_params
    from components.data.dataset import SplitWriter, load_split
    from components.data.stream import TrainFeed
    from components.training.models import build_model
    from components.training.trainer import compile_model

    params = load_params(REPO / "params.yaml")
    data = params.data.model_copy(update={"image_size": size, "color_mode": "rgb"})
    root = Path(tempfile.mkdtemp(prefix="tlpipe-fit-"))
    try:
        if split_dir is None:
            classes = ["china", "flower", "hopper"]
            with SplitWriter(root / "train", classes, (size, size, 3), images) as writer:
                for i, (pixels, label) in enumerate(crops(images, size)):
                    writer.add(pixels, classes[label], f"{i}.png", str(i))
            (root / "classes.json").write_text(json.dumps(classes))
            split = load_split(root.parent, root.name, "train")
        else:
            split = load_split(split_dir.parent.parent, split_dir.parent.name, split_dir.name)
            classes, images, size = list(split.classes), len(split), split.shape[0]
            data = params.data.model_copy(update={"image_size": size, "color_mode": "rgb"})
        x = split.images(np.arange(len(split)))  # the in-memory side holds it all, by design
        y = np.eye(len(classes), dtype="float32")[split.y]

        def timed_fit(run) -> float:
            keras.utils.set_random_seed(0)
            model = build_model(params.model, data, len(classes), bn_inference=False)
            compile_model(model, 0.001)
            run(model, 1)  # warm-up epoch: tracing and compilation
            start, cpu = time.perf_counter(), time.process_time()
            run(model, epochs)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            return {"wall": round(epochs * len(split) / wall, 1), "cpu": round(epochs * len(split) / cpu, 1)}

        feed = TrainFeed(split, batch, seed=0)

        def on_feed(model, n):
            model.fit(feed, epochs=n, verbose=0)

        def in_memory(model, n):
            model.fit(x, y, batch_size=batch, epochs=n, shuffle=True, verbose=0)

        results = {}
        for name, run in (("in_memory", in_memory), ("feed", on_feed), ("in_memory_again", in_memory),
                          ("feed_again", on_feed)):  # alternated: load on the machine drifts
            results[name] = timed_fit(run)
        ratios = {}
        for clock in ("wall", "cpu"):
            feed_rate = (results["feed"][clock] + results["feed_again"][clock]) / 2
            memory_rate = (results["in_memory"][clock] + results["in_memory_again"][clock]) / 2
            ratios[clock] = round(feed_rate / memory_rate, 3)
        return {"backend": keras.backend.backend(), "images": images, "size": size, "batch": batch,
                "images_per_second": results, "feed_over_in_memory": ratios}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["formats", "fit"])
    parser.add_argument("--images", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    parser.add_argument("--split", type=Path, help="fit: a split folder clean wrote (<clean>/<task>/<split>)")
    args = parser.parse_args()
    if args.what == "formats":
        result = formats(args.images or 2000, args.size or 160)
    else:
        os.environ["KERAS_BACKEND"] = args.backend
        result = fit(args.images or 1024, args.size or 96, split_dir=args.split)
    result.update(machine=f"{os.cpu_count()} cores", load=os.getloadavg(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
