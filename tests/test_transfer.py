"""Stage `transfer`: which weights move, which are skipped and why (what trains is fine-tuning's choice)."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from components import source, transfer
from components.core.config import Params, with_overrides
from components.training.models import build_model, load_model_dir, save_model_dir, weighted_layers
from tests.conftest import shrunk_params, write_clean_dataset

SPLITS = {"train": 16, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """A workspace with a cleaned source (grayscale) and target task, and a trained source model."""
    params = shrunk_params(tmp_path_factory.mktemp("transfer"), {"source.epochs": 1})
    write_clean_dataset(params.paths.clean, "source", ["a", "b", "c", "d"], SPLITS, params.data.image_size)
    write_clean_dataset(params.paths.clean, "target", ["x", "y", "z"], SPLITS, params.data.image_size, seed=3)
    source.run(params)
    return params


def _weights(directory: Path) -> dict[str, list[np.ndarray]]:
    model, _ = load_model_dir(directory)
    return {path: layer.get_weights() for path, layer in weighted_layers(model)}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_full_transfer_moves_the_backbone_and_gives_a_new_head(trained: Params) -> None:
    result = transfer.run(trained)

    report = json.loads(trained.paths.transfer_report.read_text())
    moved = {item["layer"] for item in report["transferred"]}
    source_weights, target_weights = _weights(trained.paths.source_model), _weights(trained.paths.transferred_model)
    backbone = {path for path in source_weights if path.startswith("backbone.")}
    assert moved == backbone and result.transferred == len(backbone)
    assert all(_same(source_weights[path], target_weights[path]) for path in backbone)
    assert [item["layer"] for item in report["reinitialized"]] == ["head"]
    assert target_weights["head"][0].shape[-1] == 3  # the target task's classes, not the source's 4
    assert "frozen" not in report and "frozen" not in str(result)  # trainability is fine-tuning's, per phase
    _, classes = load_model_dir(trained.paths.transferred_model)
    assert classes == ("x", "y", "z")


def test_partial_transfer_by_pattern_reinitializes_the_rest(trained: Params) -> None:
    params = with_overrides(trained, {"transfer.layers": ["backbone.block1_*"]})
    transfer.run(params)

    report = json.loads(params.paths.transfer_report.read_text())
    assert {item["layer"] for item in report["transferred"]} == {
        "backbone.block1_conv1", "backbone.block1_bn1", "backbone.block1_conv2", "backbone.block1_bn2"}
    reinitialized = {item["layer"] for item in report["reinitialized"]}
    assert "backbone.block2_conv1" in reinitialized and "head" in reinitialized


def test_without_channel_adaptation_a_gray_source_skips_the_first_conv_with_its_reason(trained: Params) -> None:
    params = with_overrides(trained, {"data.color_mode": "rgb", "transfer.adapt_channels": False})
    transfer.run(params)

    report = json.loads(params.paths.transfer_report.read_text())
    skipped = {item["layer"]: item["reason"] for item in report["skipped"]}
    assert list(skipped) == ["backbone.block1_conv1"]
    assert skipped["backbone.block1_conv1"].startswith("shape mismatch: source [(3, 3, 1, 8)] vs target [(3, 3, 3, 8)]")
    assert "backbone.block1_conv2" in {item["layer"] for item in report["transferred"]}


def _backbone_features(directory_or_model, images: np.ndarray) -> np.ndarray:
    model = load_model_dir(directory_or_model)[0] if isinstance(directory_or_model, Path) else directory_or_model
    return np.asarray(model.get_layer("backbone").predict(images, verbose=0))


GRAY = np.random.default_rng(5).random((4, 16, 16, 1)).astype("float32")


def test_gray_source_into_rgb_target_gives_the_same_response_to_a_gray_image(trained: Params) -> None:
    params = with_overrides(trained, {"data.color_mode": "rgb"})
    result = transfer.run(params)

    report = json.loads(params.paths.transfer_report.read_text())
    first = report["layers"][0]
    assert (first["layer"], first["status"]) == ("backbone.block1_conv1", "adapted") and not report["skipped"]
    assert result.transferred == len(report["transferred"]) == len(report["layers"]) - 1  # all but the head
    gray_response = _backbone_features(trained.paths.source_model, GRAY)
    rgb_response = _backbone_features(params.paths.transferred_model, np.repeat(GRAY, 3, axis=-1))
    np.testing.assert_allclose(rgb_response, gray_response, rtol=1e-4, atol=1e-5)


def test_rgb_source_into_gray_target_sums_the_first_kernels(trained: Params) -> None:
    rgb = with_overrides(trained, {"data.color_mode": "rgb"})
    keras.utils.set_random_seed(1)
    source_model = build_model(rgb.model, rgb.data, 4, bn_inference=False)
    target_model = build_model(trained.model, trained.data, 3, bn_inference=True)
    report = transfer.transfer_weights(source_model, target_model, ("backbone.*",))

    assert report["layers"][0]["status"] == "adapted" and not report["skipped"]
    np.testing.assert_allclose(_backbone_features(target_model, GRAY),
                               _backbone_features(source_model, np.repeat(GRAY, 3, axis=-1)), rtol=1e-4, atol=1e-5)


def test_transfer_by_position_pairs_layers_whose_names_differ(trained: Params, tmp_path: Path) -> None:
    source_model, classes = load_model_dir(trained.paths.source_model)
    renamed = keras.models.clone_model(
        source_model, recursive=True,
        clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "name": f"src_{layer.name}"}))
    renamed.set_weights(source_model.get_weights())
    save_model_dir(renamed, classes, tmp_path / "renamed")
    by_name = with_overrides(trained, {"paths.source_model": str(tmp_path / "renamed")})
    assert transfer.run(by_name).transferred == 0  # no path matches

    by_position = with_overrides(by_name, {"transfer.match": "position"})
    transfer.run(by_position)
    report = json.loads(by_position.paths.transfer_report.read_text())
    pairs = {item["layer"]: item["source"] for item in report["transferred"]}
    assert pairs["backbone.block1_conv1"] == "backbone.src_block1_conv1"
    assert len(pairs) == 12 and not report["skipped"]
    assert [item["layer"] for item in report["reinitialized"]] == ["head"]
    source_weights, target_weights = _weights(trained.paths.source_model), _weights(by_position.paths.transferred_model)
    assert _same(source_weights["backbone.block3_conv2"], target_weights["backbone.block3_conv2"])


def test_a_different_input_resolution_transfers_every_backbone_layer(trained: Params) -> None:
    params = with_overrides(trained, {"data.image_size": 24})
    result = transfer.run(params)

    assert result.skipped == 0 and result.transferred == 12
    model, _ = load_model_dir(params.paths.transferred_model)
    assert tuple(model.get_layer("backbone").inputs[0].shape) == (None, 24, 24, 1)
    assert model.predict(np.zeros((1, 24, 24, 1), dtype=np.uint8), verbose=0).shape == (1, 3)


def test_the_readable_table_lists_every_weighted_layer_with_its_status(trained: Params) -> None:
    params = with_overrides(trained, {"transfer.layers": ["backbone.block[12]_*"]})
    transfer.run(params)

    report = json.loads(params.paths.transfer_report.read_text())
    table = params.paths.transfer_table.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2] not in "#-"]
    assert len(rows) == len(report["layers"]) == 13  # every weighted layer, head included
    assert "| `backbone.block1_conv1` | transferred | backbone.block1_conv1 |  |" in table
    assert "| `backbone.block3_conv1` | reinitialized |  | not selected by transfer.layers |" in table
    assert "finetune.unfreeze_top" in table  # where to look for what trains
