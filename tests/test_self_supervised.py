"""Self-supervised source (source.mode: self_supervised): it learns without labels on either backend, never
sees a target val or test image, refuses bad unlabelled input before training, and its features are probed."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import clean, ingest, source, transfer, validate
from components.apps import summary, sweep
from components.core.config import Params, load_params, with_overrides
from components.core.errors import PipelineError
from components.core.reports import Probe, TransferReport, write_report
from components.data.dataset import HELD_BACK, load_split
from components.training.models import load_model_dir
from components.training.probe import probe
from components.training.self_supervised import unlabeled_pool
from tests.conftest import REPO, raw_files, shrunk_params, write_class_folders, write_clean_split, write_shrunk_params_yaml
from tests.test_resume import TEXTURES, run_stage, write_texture_task

# Small and quick: the pool is 72 + 24 textures, batches of 32, 6 epochs.
SSL = {"source.mode": "self_supervised", "source.self_supervised.epochs": 6, "source.self_supervised.batch_size": 32}
CHANCE = 1 / len(TEXTURES)


def _texture_workspace(root: Path) -> tuple[Params, Path]:
    """A cleaned target task of three textures, with a held-back split, and its params.yaml."""
    params = shrunk_params(root, SSL)
    write_texture_task(params.paths.clean, {"train": 24, "val": 8, "test": 16}, params.data.image_size)
    held = load_split(params.paths.clean, "target", "test")  # the test textures shifted by a column: same kind, other images
    positions = np.arange(len(held))
    write_clean_split(params.paths.clean, "target", HELD_BACK, list(TEXTURES), list(np.roll(held.images(positions), 1, axis=2)),
                      [TEXTURES[k] for k in held.y])
    return params, write_shrunk_params_yaml(root / "params.yaml", SSL)


def _check_learned(params: Params) -> None:
    report = json.loads(params.paths.source_report.read_text())
    assert report["mode"] == "self_supervised" and report["images"] == {
        "target train": 72, "target held back by the label budget": 48}
    # Chance for NT-Xent is log(2B - 1): every other view equally likely to be the positive.
    assert report["final_loss"] < 0.8 * math.log(2 * 32 - 1), report
    model, classes = load_model_dir(params.paths.source_model)
    assert classes is None and model.get_layer("backbone") is not None  # the headless contract of `download`
    found = probe(model, *(load_split(params.paths.clean, "target", s) for s in ("train", "val")),
                  images=params.transfer.probe_images)
    assert found["linear_probe_accuracy"] > CHANCE + 0.3 and found["knn_accuracy"] > CHANCE + 0.3, found


def test_pretraining_learns_without_labels_and_transfer_reads_it(tmp_path: Path) -> None:
    params, _ = _texture_workspace(tmp_path)
    source.run(params)
    _check_learned(params)
    transfer.run(params)  # the transfer stage takes the headless source like any other
    report = json.loads(params.paths.transfer_report.read_text())
    assert len(report["transferred"]) == len([r for r in report["layers"] if r["layer"].startswith("backbone.")])
    assert report["probe"]["linear_probe_accuracy"] > CHANCE + 0.3 and report["probe"]["chance"] == pytest.approx(CHANCE)


@pytest.mark.slow  # a stage subprocess: 7 minutes on 2 cores shared with a sweep and other work
@pytest.mark.timeout(900)
def test_pretraining_learns_on_the_jax_backend(tmp_path: Path) -> None:
    params, params_yaml = _texture_workspace(tmp_path)
    run_stage("source", params_yaml, {"KERAS_BACKEND": "jax"}, timeout=420)
    _check_learned(params)  # and the JAX-trained file loads and probes under TensorFlow


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The embedded digits, cleaned with a label budget of 5 per class (the rest held back)."""
    root = tmp_path_factory.mktemp("digits")
    params = shrunk_params(root, {**SSL, "clean.target_train_per_class": 5})
    for stage in (ingest, validate, clean):
        stage.run(params)
    return params


def test_the_unlabelled_pool_holds_no_target_val_or_test_image(digits: Params, tmp_path: Path) -> None:
    pool, counts = unlabeled_pool(digits, tmp_path)
    train, held = (load_split(digits.paths.clean, "target", s) for s in ("train", HELD_BACK))
    evaluation = {h for s in ("val", "test") for h in load_split(digits.paths.clean, "target", s).sha256}
    assert len(train) == 25 and len(held) > 200
    assert counts == {"target train": 25, "target held back by the label budget": len(held)} and len(pool) == 25 + len(held)
    assert set(pool.sha256) == set(train.sha256) | set(held.sha256)
    assert not set(pool.sha256) & evaluation
    quarantine = json.loads(digits.paths.quarantine.read_text())
    assert sorted(held.paths) == sorted(r["path"] for r in quarantine["held_back"] if r["task"] == "target")


def _folder(root: Path, files: list[tuple[str, bytes]]) -> Path:
    root.mkdir()
    for number, (name, data) in enumerate(files):
        (root / f"{number}{Path(name).suffix}").write_bytes(data)
    return root


def test_a_folder_sharing_an_image_with_the_target_test_split_is_refused(digits: Params, tmp_path: Path) -> None:
    test = load_split(digits.paths.clean, "target", "test")
    spare = load_split(digits.paths.clean, "target", HELD_BACK)
    packed = raw_files(digits.paths.raw / "target")
    files = [(p, packed[p.removeprefix("target/")]) for p in (*spare.paths[:10], test.paths[3])]
    folder = _folder(tmp_path / "unlabelled", files)
    run = with_overrides(digits, {"source.self_supervised.folder": str(folder)})
    with pytest.raises(PipelineError, match=r"source.self_supervised.folder: 1 of its 11 images are also in the "
                                            r"target's val or test split"):
        source.run(run)
    assert not run.paths.source_model.exists()
    clean_folder = _folder(tmp_path / "clean_unlabelled", files[:10])
    pool, counts = unlabeled_pool(with_overrides(digits, {"source.self_supervised.folder": str(clean_folder)}),
                                  tmp_path / "pool")
    assert counts[f"folder {clean_folder}"] == 10 and len(pool) == 25 + len(spare) + 10


@pytest.mark.parametrize("mode, size, problem", [("RGB", (8, 8), "RGB 8x8"), ("L", (64, 64), "L 64x64")])
def test_a_folder_of_another_mode_or_size_is_refused(digits: Params, tmp_path: Path, mode: str,
                                                    size: tuple[int, int], problem: str) -> None:
    folder = write_class_folders(tmp_path / "unlabelled", ["any"], per_class=3, size=size, mode=mode)
    run = with_overrides(digits, {"source.self_supervised.folder": str(folder)})
    with pytest.raises(PipelineError, match=rf"3 of its 3 images differ in mode or size .*\({problem}\)"):
        source.run(run)


def test_a_folder_with_a_file_that_is_no_image_is_refused(digits: Params, tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "unlabelled", ["any"], per_class=2, size=(8, 8))
    (folder / "any" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match=r"1 of its 3 files are not readable images, e.g. .*broken.png"):
        source.run(with_overrides(digits, {"source.self_supervised.folder": str(folder)}))


def test_too_few_unlabelled_images_for_a_batch_is_refused_before_training(digits: Params) -> None:
    run = with_overrides(digits, {"source.self_supervised.batch_size": 4096})
    with pytest.raises(PipelineError, match=r"source.self_supervised: \d+ unlabelled images \(25 from target train, "
                                            r"\d+ from target held back .*fewer than one batch of "
                                            r"source.self_supervised.batch_size=4096"):
        source.run(run)
    assert not run.paths.source_model.exists()


def test_self_supervised_with_nothing_to_read_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="source.self_supervised.images"):
        shrunk_params(tmp_path, {**SSL, "source.self_supervised.images": []})


def test_summary_warns_when_the_probe_is_near_chance(tmp_path: Path) -> None:
    params = shrunk_params(tmp_path)
    params.paths.transfer_report.parent.mkdir(parents=True)
    weak = Probe(linear_probe_accuracy=0.25, knn_accuracy=0.3, knn_k=5, chance=0.2, train_images=25, val_images=25,
                  features=32, seconds=0.1)
    report = TransferReport(layers=[], transferred=[], skipped=[], reinitialized=[], match="name",
                            patterns=["backbone.*"], probe=weak)
    write_report(params.paths.transfer_report, report)
    assert any("near chance" in line for line in summary.warnings(params))
    write_report(params.paths.transfer_report, report.model_copy(update={"probe": weak.model_copy(
        update={"linear_probe_accuracy": 0.9})}))
    assert not any("near chance" in line for line in summary.warnings(params))


# The real stages, two source modes, two seeds: 3.5 minutes on 2 shared cores (over 10 beside two sweeps).
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_sweep_compares_two_source_modes_with_seeds(tmp_path: Path) -> None:
    params_yaml = write_shrunk_params_yaml(tmp_path / "params.yaml", {"source.self_supervised.epochs": 2})
    out = tmp_path / "sweep"
    assert sweep.main(["--params", str(params_yaml), "--budgets", "3", "--seeds", "1", "2",
                       "--source-modes", "train", "self_supervised", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["source_mode"], r["seed"]) for r in rows] == [("train", "1"), ("self_supervised", "1"),
                                                             ("train", "2"), ("self_supervised", "2")]
    for first, second in (rows[:2], rows[2:]):  # one baseline per budget and seed, shared by the modes
        assert first["scratch_accuracy"] == second["scratch_accuracy"]
    result = json.loads((out / "sweep.json").read_text())
    table = {row["source_mode"]: row for row in result["mean_by_budget"]}
    assert set(table) == {"train", "self_supervised"} and all(row["seeds"] == 2 for row in table.values())
    ssl = [float(r["transfer_accuracy"]) for r in rows if r["source_mode"] == "self_supervised"]
    assert table["self_supervised"]["transfer_min"] == pytest.approx(min(ssl), abs=1e-4)
    assert result["sources"]["self_supervised"]["total_seconds"] > 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "data").exists(), "the sweep wrote outside its temporary workspace"


def test_the_knn_probe_never_takes_more_neighbours_than_a_class_has(tmp_path: Path) -> None:
    from components.training.models import build_model
    from tests.conftest import write_clean_dataset

    params = shrunk_params(tmp_path)
    write_clean_dataset(params.paths.clean, "target", list(TEXTURES), {"train": 1, "val": 8}, params.data.image_size)
    train, val = (load_split(params.paths.clean, "target", s) for s in ("train", "val"))
    found = probe(build_model(params.model, params.data, 3, bn_inference=True), train, val, images=500)
    assert found["knn_k"] == 1 and found["train_images"] == 3 and found["val_images"] == 24


def test_the_probes_see_a_bounded_sample_with_every_class(tmp_path: Path) -> None:
    """Their features are held in memory: a million-image split must not be, so they see transfer.probe_images per split."""
    from components.data.stream import predict
    from components.training.models import build_model
    from tests.conftest import write_clean_dataset

    params = shrunk_params(tmp_path)
    write_clean_dataset(params.paths.clean, "target", list(TEXTURES), {"train": 10, "val": 8}, params.data.image_size)
    train, val = (load_split(params.paths.clean, "target", s) for s in ("train", "val"))
    model = build_model(params.model, params.data, 3, bn_inference=True)
    at = train.spread(7)
    np.testing.assert_allclose(predict(model, train, positions=at), predict(model, train)[at], atol=1e-6)
    found = probe(model, train, val, images=7)
    assert found["train_images"] == 7 and found["val_images"] == 7  # of 30 and 24
    assert set(train.y[train.spread(7)]) == {0, 1, 2}  # spread over the class-sorted split: every class


@pytest.mark.parametrize("classes", [3, 2])  # two: scikit-learn fits one row of weights, not one per class
def test_a_head_from_the_probe_scores_on_val_what_the_probe_scored(tmp_path: Path, classes: int) -> None:
    """transfer.head_init: probe: fine-tuning starts from the linear probe's classifier itself, not an approximation."""
    from components.training.models import HEAD_NAME, build_model
    from components.training.trainer import accuracy
    from tests.conftest import write_clean_dataset

    params = shrunk_params(tmp_path)
    write_clean_dataset(params.paths.clean, "target", list(TEXTURES)[:classes], {"train": 10, "val": 12}, params.data.image_size)
    train, val = (load_split(params.paths.clean, "target", s) for s in ("train", "val"))
    model = build_model(params.model, params.data, classes, bn_inference=True)
    random_head = [w.copy() for w in model.get_layer(HEAD_NAME).get_weights()]
    found = probe(model, train, val, images=500, set_head=True)
    assert not np.allclose(model.get_layer(HEAD_NAME).get_weights()[0], random_head[0])
    assert abs(accuracy(model, val) - found["linear_probe_accuracy"]) <= 1 / len(val), found


def test_transfer_writes_the_probe_head_into_the_transferred_model(tmp_path: Path) -> None:
    """The stage: with head_init probe the saved model scores the probe's accuracy, and the report says which head it has."""
    from components.training.trainer import accuracy

    params, _ = _texture_workspace(tmp_path)
    params = with_overrides(params, {"transfer.head_init": "probe"})
    source.run(params)
    transfer.run(params)
    report = json.loads(params.paths.transfer_report.read_text())
    model, _ = load_model_dir(params.paths.transferred_model)
    val = load_split(params.paths.clean, "target", "val")
    assert report["head_init"] == "probe"
    assert abs(accuracy(model, val) - report["probe"]["linear_probe_accuracy"]) <= 1 / len(val), report["probe"]
