"""The split format (uint8 shards + index) and the one streaming feed: order, coverage, bad input, memory."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.core.config import Params
from components.core.errors import PipelineError
from components.data.dataset import INDEX_FILE, META_FILE, SplitWriter, load_split, shard_name, write_split
from tests.conftest import REPO, write_class_folders, write_clean_split


def _split(root: Path, count: int = 40, shard_images: int = 7, classes: tuple[str, ...] = ("a", "b")) -> np.ndarray:
    """A split of `count` random 8x8 RGB images in shards of `shard_images`; returns the images."""
    images = np.random.default_rng(count).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    labels = [classes[i * len(classes) // count] for i in range(count)]
    (root / "t").mkdir(parents=True, exist_ok=True)
    (root / "t" / "classes.json").write_text(json.dumps(list(classes)))
    write_split(root / "t" / "train", classes, images, labels, shard_bytes=shard_images * 8 * 8 * 3)
    return images


def test_a_split_reads_back_by_position_in_any_order_without_loading_it(tmp_path: Path) -> None:
    images = _split(tmp_path)
    split = load_split(tmp_path, "t", "train")
    assert len(split) == 40 and len(split.shards) == 6 and split.shape == (8, 8, 3)
    assert split.y.tolist() == [0] * 20 + [1] * 20 and split.paths[0] == "a/000000"
    shuffled = np.random.default_rng(1).permutation(40)
    assert (split.images(shuffled) == images[shuffled]).all()  # across shards, any order
    batches = list(split.batches(16))
    assert [len(x) for x, _ in batches] == [16, 16, 8]
    assert (np.concatenate([x for x, _ in batches]) == images).all()


def test_the_training_feed_is_fixed_by_seed_and_epoch_and_covers_every_image(tmp_path: Path) -> None:
    from components.data.stream import TrainFeed

    _split(tmp_path, count=23)
    split = load_split(tmp_path, "t", "train")
    feed = TrainFeed(split, 8, seed=5, min_steps=5, multiple=2)
    assert feed.batch_size == 8 and len(feed) == 6  # 23 images repeated twice to reach 5 steps: 46 -> 6 batches
    order = feed.order(3)
    assert (np.bincount(order[:46], minlength=23) == 2).all()  # two passes: every image exactly twice
    # A fresh feed (a resumed process) sees the same order for the same epoch; another epoch differs.
    assert (TrainFeed(split, 8, seed=5, min_steps=5, multiple=2).order(3) == order).all()
    assert not (feed.order(4) == order).all()
    feed.epoch = 3
    x, y = feed[5]
    assert x.shape == (8, 8, 8, 3) and y.shape == (8, 2)  # the last batch full: wraps, never short
    assert (x == split.images(order[40:48])).all() and (y.argmax(axis=1) == split.y[order[40:48]]).all()
    odd = TrainFeed(split, 7, seed=5, multiple=2)
    assert odd.batch_size == 6 and all(len(odd[i][0]) % 2 == 0 for i in range(len(odd)))


def _breaks(root: Path) -> str:
    with pytest.raises(PipelineError) as error:
        load_split(root, "t", "train")
    message = str(error.value)
    assert "dvc repro clean" in message and "tlpipe stage clean" in message  # the fix, every time
    return message


def test_a_missing_truncated_or_foreign_shard_or_a_wrong_index_is_refused(tmp_path: Path) -> None:
    _split(tmp_path)
    folder = tmp_path / "t" / "train"
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)

    def restore() -> None:
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)

    (folder / shard_name(2)).unlink()
    assert f"{folder / shard_name(2)} is missing" in _breaks(tmp_path)
    restore()
    with open(folder / shard_name(3), "r+b") as handle:
        handle.truncate(os.path.getsize(folder / shard_name(3)) - 10)
    assert "truncated" in _breaks(tmp_path) and shard_name(3) in _breaks(tmp_path)
    restore()
    shutil.copyfile(folder / shard_name(0), folder / shard_name(1))  # same shape, other images
    assert f"{folder / shard_name(1)} does not hold the images" in _breaks(tmp_path)
    restore()
    np.save(folder / shard_name(0), np.zeros((7, 8, 8, 1), dtype=np.uint8))  # another split's kind of shard
    assert "foreign shard" in _breaks(tmp_path)
    restore()
    (folder / shard_name(4)).write_text("not an array")
    assert "not a tlpipe shard" in _breaks(tmp_path)
    restore()
    lines = (folder / INDEX_FILE).read_text().splitlines()
    (folder / INDEX_FILE).write_text("\n".join(lines[:-1]) + "\n")  # one image fewer than the shards hold
    assert "the index disagrees with its shards" in _breaks(tmp_path)
    restore()
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "format": "tlpipe-uint8-shards/0"}))
    assert "this tlpipe reads" in _breaks(tmp_path)
    restore()
    load_split(tmp_path, "t", "train")  # whole again: the checks are about the damage, not the folder


def test_a_split_in_the_old_png_layout_names_the_fix(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "t" / "train", ["a", "b"], per_class=2)
    (tmp_path / "t" / "classes.json").write_text(json.dumps(["a", "b"]))
    assert "PNG folders, the split format of an older tlpipe" in _breaks(tmp_path)


def test_a_writer_refuses_images_that_do_not_fit_the_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image shape"):
        with SplitWriter(tmp_path / "s", ["a"], (4, 4, 1), 2) as writer:
            writer.add(np.zeros((5, 4), dtype=np.uint8), "a", "x.png", "0")
    with pytest.raises(ValueError, match="1 images written, 2 announced"):
        with SplitWriter(tmp_path / "s", ["a"], (4, 4, 1), 2) as writer:
            writer.add(np.zeros((4, 4), dtype=np.uint8), "a", "x.png", "0")
    assert not (tmp_path / "s" / META_FILE).exists()  # a short split never looks finished


# Clean under a file-size limit: its shards hit it half way, like a full disk. The old splits must stay.
DISK_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write raises (EFBIG) instead of killing
from components import clean
from components.core.config import load_params
params = load_params(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    clean.run(params)
except OSError as error:
    print("write failed:", error)
    sys.exit(3)
"""


def test_clean_on_a_full_disk_leaves_the_old_splits_whole(tmp_path: Path) -> None:
    from components import clean, ingest, validate
    from tests.conftest import write_shrunk_params_yaml

    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=60, size=(40, 40), mode="RGB")
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=12, seed=1)
    settings = {"data.source_dir": str(source), "data.target_dir": str(target), "data.color_mode": "rgb",
                "data.image_size": 32}
    params_yaml = write_shrunk_params_yaml(tmp_path / "params.yaml", settings)
    from components.core.config import load_params

    params: Params = load_params(params_yaml)
    for stage in (ingest, validate, clean):
        stage.run(params)
    before = {p.relative_to(params.paths.clean): p.read_bytes() for p in params.paths.clean.rglob("*") if p.is_file()}
    train = load_split(params.paths.clean, "target", "train")
    assert train.nbytes > 4 * 32 * 32 * 3  # bigger than the limit below: the write fails part way
    # New data, so clean writes different shards.
    for path in write_class_folders(tmp_path / "more", ["a", "b"], per_class=5, size=(40, 40), mode="RGB",
                                    seed=9).glob("*/*.png"):
        shutil.copyfile(path, target / path.parent.name / f"new_{path.name}")
    ingest.run(params)
    validate.run(params)

    limit = 4 * 32 * 32 * 3
    done = subprocess.run([sys.executable, "-c", DISK_FULL, str(params_yaml), str(limit)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "File too large" in done.stdout
    after = {p.relative_to(params.paths.clean): p.read_bytes() for p in params.paths.clean.rglob("*") if p.is_file()}
    assert after == before  # every old shard and index, byte for byte
    assert not [p for p in params.paths.clean.parent.iterdir() if p.name.startswith(".clean.")]  # no temp left
    assert len(load_split(params.paths.clean, "target", "train")) == len(train)


# Training and evaluation on a split bigger than the memory it may add: a subprocess fits one epoch
# and evaluates, and reports its peak resident memory. Run on a small and a big split, the growth
# between them must stay far below the big split's size (a whole-split read would add all of it).
# Peak RSS, not RLIMIT_AS/RLIMIT_DATA: TensorFlow and XLA reserve gigabytes of address space up
# front. On TensorFlow the growth measured 4-16 MB for the 157 MB split (docs/data-format.md); JAX
# on CPU showed about 90 MB more that did not come from Python objects (tracemalloc), so
# TensorFlow is the sharper check. The small split is one prediction batch, and a second model
# predicts at the images' own 64 px: a prediction batch that grows with the split (it was
# min(256, split) images: +0.9 GB at 96 px in the real-size benchmark) shows as growth here.
MEMORY = """
import json, resource, sys
import keras
from components.core.config import load_params
from components.data.dataset import load_split
from components.training.models import build_model
from components.training.trainer import evaluate, fit
params = load_params(sys.argv[1])
keras.utils.set_random_seed(0)
train, val = load_split(params.paths.clean, "target", "train"), load_split(params.paths.clean, "target", "val")
model = build_model(params.model, params.data, len(train.classes), bn_inference=False)
fit(model, train, val, phase="head", epochs=1, batch_size=64, learning_rate=0.001, patience=1, seed=0)
scores = evaluate(model, train)
full_size = build_model(params.model, params.data.model_copy(update={"image_size": 64}), len(train.classes),
                        bn_inference=False)
evaluate(full_size, train)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "images": len(train),
                  "split_bytes": train.nbytes, "accuracy": scores["accuracy"]}))
"""


def _peak(root: Path, images: int) -> dict:
    root.mkdir()
    from tests.conftest import write_shrunk_params_yaml

    # 64-px images, a model that resizes them to the shrunk 16 px inside (as every tlpipe model does):
    # the data is big, the computation small.
    size = 64
    params_yaml = write_shrunk_params_yaml(root / "params.yaml", {"data.color_mode": "rgb"})
    from components.core.config import load_params

    params = load_params(params_yaml)
    rng = np.random.default_rng(images)
    clean_dir = params.paths.clean
    write_clean_split(clean_dir, "target", "val", ["a", "b"], list(rng.integers(0, 256, (8, size, size, 3), np.uint8)),
                      ["a", "b"] * 4)
    with SplitWriter(clean_dir / "target" / "train", ["a", "b"], (size, size, 3), images) as writer:
        for i in range(images):  # streamed: the test process never holds the split either
            writer.add(rng.integers(0, 256, (size, size, 3), np.uint8), "ab"[i % 2], f"{i}.png", str(i))
    done = subprocess.run([sys.executable, "-c", MEMORY, str(params_yaml)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "tensorflow"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_and_evaluation_on_a_split_bigger_than_the_memory_budget(tmp_path: Path) -> None:
    small, big = _peak(tmp_path / "small", 32), _peak(tmp_path / "big", 12_800)  # 0.4 MB and 157 MB of pixels
    budget = big["split_bytes"] // 4  # what streaming may add: a quarter of the big split
    grown = (big["peak_kib"] - small["peak_kib"]) * 1024
    assert big["images"] == 12_800 and big["split_bytes"] > 150e6
    assert grown < budget, f"peak memory grew by {grown / 1e6:.0f} MB for a {big['split_bytes'] / 1e6:.0f} MB split"
    assert 0 <= big["accuracy"] <= 1


# JAX data parallel on 2 forced CPU devices, odd split sizes: every batch the feed gives must divide
# between the devices, and evaluation must count each image once (issue 19).
ODD_SPLITS = """
import json, sys
import keras, numpy as np
from components.core.config import load_params
from components.data.dataset import load_split
from components.data.stream import predict
from components.training.models import build_model
from components.training.trainer import data_parallel, evaluate, fit
params = load_params(sys.argv[1])
train, val = load_split(params.paths.clean, "target", "train"), load_split(params.paths.clean, "target", "val")
with data_parallel(True) as devices:
    keras.utils.set_random_seed(0)
    model = build_model(params.model, params.data, len(train.classes), bn_inference=False)
    fitted = fit(model, train, val, phase="head", epochs=2, batch_size=8, learning_rate=0.001, patience=2,
                 seed=0)
    parallel = predict(model, val, batch_size=4)
    scores = evaluate(model, val, batch_size=4)
single = predict(model, val, batch_size=4)  # the same weights on one device, no padding needed
print(json.dumps({"devices": len(devices), "epochs": fitted.epochs_run, "rows": len(parallel),
                  "same": bool(np.allclose(parallel, single, atol=1e-5)),
                  "correct": float(scores["accuracy"] * len(val))}))
"""


def test_data_parallel_on_jax_takes_odd_split_sizes(tmp_path: Path) -> None:
    from tests.conftest import write_clean_dataset, write_shrunk_params_yaml
    from components.core.config import load_params

    params_yaml = write_shrunk_params_yaml(tmp_path / "params.yaml")
    params = load_params(params_yaml)
    # 3 classes: 21 train images (batches of 8 -> a last batch of 5), 9 val (batches of 4 -> 1 left).
    write_clean_dataset(params.paths.clean, "target", ["x", "y", "z"], {"train": 7, "val": 3},
                        params.data.image_size)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "jax",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", ODD_SPLITS, str(params_yaml)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # IndivisibleError before the fix
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["epochs"] == 2
    assert result["rows"] == 9 and result["same"]  # every val image once, in order: the padding cut off
    assert result["correct"] == round(result["correct"])  # accuracy is a count over the 9 images
