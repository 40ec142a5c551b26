"""Stage `transfer`: which weights move, which are skipped and why, and what is frozen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components import source, transfer
from components.config import Params, with_overrides
from components.models import load_model_dir, weighted_layers
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


def test_full_transfer_moves_the_backbone_and_gives_a_new_frozen_head(trained: Params) -> None:
    result = transfer.run(trained)

    report = json.loads(trained.paths.transfer_report.read_text())
    moved = {item["layer"] for item in report["transferred"]}
    source_weights, target_weights = _weights(trained.paths.source_model), _weights(trained.paths.transferred_model)
    backbone = {path for path in source_weights if path.startswith("backbone.")}
    assert moved == backbone and result.transferred == len(backbone)
    assert all(_same(source_weights[path], target_weights[path]) for path in backbone)
    assert [item["layer"] for item in report["reinitialized"]] == ["head"]
    assert target_weights["head"][0].shape[-1] == 3  # the target task's classes, not the source's 4
    assert set(report["frozen"]) == backbone
    model, classes = load_model_dir(trained.paths.transferred_model)
    assert classes == ("x", "y", "z")
    assert not model.get_layer("backbone").trainable and model.get_layer("head").trainable


def test_partial_transfer_by_pattern_reinitializes_the_rest(trained: Params) -> None:
    params = with_overrides(trained, {"transfer.layers": ["backbone.block1_*"], "transfer.freeze": "none"})
    transfer.run(params)

    report = json.loads(params.paths.transfer_report.read_text())
    assert {item["layer"] for item in report["transferred"]} == {
        "backbone.block1_conv1", "backbone.block1_bn1", "backbone.block1_conv2", "backbone.block1_bn2"}
    reinitialized = {item["layer"] for item in report["reinitialized"]}
    assert "backbone.block2_conv1" in reinitialized and "head" in reinitialized
    assert report["frozen"] == []
    model, _ = load_model_dir(params.paths.transferred_model)
    assert model.get_layer("backbone").trainable


def test_grayscale_source_into_rgb_target_skips_the_first_conv_with_its_reason(trained: Params) -> None:
    params = with_overrides(trained, {"data.color_mode": "rgb"})
    transfer.run(params)

    report = json.loads(params.paths.transfer_report.read_text())
    skipped = {item["layer"]: item["reason"] for item in report["skipped"]}
    assert list(skipped) == ["backbone.block1_conv1"]
    assert skipped["backbone.block1_conv1"].startswith("shape mismatch: source [(3, 3, 1, 8)] vs target [(3, 3, 3, 8)]")
    assert "backbone.block1_conv2" in {item["layer"] for item in report["transferred"]}
