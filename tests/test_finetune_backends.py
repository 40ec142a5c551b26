"""The same fine-tune stage on the TensorFlow and JAX backends (a subprocess each: the backend is fixed at
import), the JAX-trained model exported to ONNX under TensorFlow, and data-parallel training on 2 CPU devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_resume import NO_AUGMENT, finetune_workspace, run_stage

RECIPE = {"finetune.head_epochs": 6, "finetune.epochs": 2, "finetune.batch_size": 8, "evaluate.min_accuracy": 0.6,
          **NO_AUGMENT}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_finetune_stage_trains_on_each_backend(tmp_path: Path, backend: str) -> None:
    params, params_yaml = finetune_workspace(tmp_path, RECIPE)
    env = {"KERAS_BACKEND": backend}
    run_stage("finetune", params_yaml, env)
    run_stage("evaluate", params_yaml, env)

    report = json.loads(params.paths.finetune_report.read_text())
    assert report["backend"] == backend and report["precision"] == "float32" and report["replicas"] == 1
    assert set(report["phases"]) == {"head", "unfrozen"}
    assert json.loads(params.paths.metrics.read_text())["accuracy"] >= 0.6
    assert json.loads(params.paths.gates.read_text())["passed"] is True
    if backend == "jax":
        # The .keras file moves between backends: exported here, under TensorFlow, with parity.
        from components import export

        result = export.run(params)
        assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
        assert params.paths.onnx_model.stat().st_size > 0


@pytest.mark.slow
def test_data_parallel_training_on_two_logical_cpu_devices(tmp_path: Path) -> None:
    # XLA_FLAGS makes JAX see 2 host devices; keras.distribution.DataParallel splits each batch between them.
    params, params_yaml = finetune_workspace(tmp_path, {**RECIPE, "finetune.data_parallel": True})
    env = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    output = run_stage("finetune", params_yaml, env)
    run_stage("evaluate", params_yaml, env)
    report = json.loads(params.paths.finetune_report.read_text())
    assert report["replicas"] == 2, output
    assert json.loads(params.paths.metrics.read_text())["accuracy"] >= 0.6
