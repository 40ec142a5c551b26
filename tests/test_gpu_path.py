"""What the first GPU run would meet, reproduced on CPU: BatchNorm in inference mode while fine-tuning,
loss scaling under mixed_float16, checkpoints tied to their precision and backend, one model behind the
reported validation figures, and steady-state throughput.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from components import finetune
from components.core.config import Params
from components.training.models import BACKBONE_NAME, load_model_dir, save_model_dir
from tests.test_resume import NO_AUGMENT, TEXTURES, finetune_workspace

# One unfrozen phase over every layer (the default recipe's shape), short.
UNFROZEN = {"finetune.head_epochs": 0, "finetune.epochs": 2, "finetune.unfreeze_top": -1,
            "finetune.batch_size": 8, **NO_AUGMENT}


def _batchnorms(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    backbone = model.get_layer(BACKBONE_NAME)
    return {layer.name: layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}


def _with_source_statistics(params: Params) -> dict[str, list[np.ndarray]]:
    """Give the transferred model's BatchNorm layers moving statistics of their own (as a trained source
    leaves them, not the initial 0 and 1); returns each layer's weights as saved."""
    model, classes = load_model_dir(params.paths.transferred_model)
    rng = np.random.default_rng(3)
    for layer in _batchnorms(model).values():
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([gamma, beta, rng.normal(0, 0.3, mean.shape).astype("float32"),
                           rng.uniform(0.5, 2.0, variance.shape).astype("float32")])
    save_model_dir(model, classes, params.paths.transferred_model)
    return {name: layer.get_weights() for name, layer in _batchnorms(model).items()}


def test_finetuning_every_layer_keeps_batchnorm_in_inference_mode(tmp_path: Path) -> None:
    params, _ = finetune_workspace(tmp_path, UNFROZEN)
    source = _with_source_statistics(params)
    transferred, _ = load_model_dir(params.paths.transferred_model)

    finetune.run(params)

    report = json.loads(params.paths.finetune_report.read_text())
    assert report["kept_phase"] == "unfrozen"
    finetuned, classes = load_model_dir(params.paths.finetuned_model)
    assert classes == TEXTURES
    for name, layer in _batchnorms(finetuned).items():
        _, _, mean, variance = layer.get_weights()
        np.testing.assert_array_equal(mean, source[name][2], err_msg=f"{name} moving mean changed")
        np.testing.assert_array_equal(variance, source[name][3], err_msg=f"{name} moving variance changed")
    # The convolutions did train: the statistics held because BatchNorm was frozen, not because nothing moved.
    conv = transferred.get_layer(BACKBONE_NAME).get_layer("block1_conv1").get_weights()[0]
    assert np.abs(finetuned.get_layer(BACKBONE_NAME).get_layer("block1_conv1").get_weights()[0] - conv).max() > 1e-4
