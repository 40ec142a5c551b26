"""Optimized export variants: graph-optimized (parity gate) and int8 static quantization (accuracy gate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from components import export
from components.core.artifacts import OWNER_MARKER, write_json
from components.deploy import variants
from components.deploy.variant_registry import VARIANTS
from components.core.config import Params
from components.data.dataset import load_split
from tests.conftest import shrunk_params, write_clean_dataset

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, dict]:
    """A tiny model trained until it is accurate (so an accuracy drop can show), exported with every variant."""
    import keras

    from components.training.models import build_model, save_model_dir

    params = shrunk_params(tmp_path_factory.mktemp("variants"), {"export.variants": list(VARIANTS)})
    size = params.data.image_size
    write_clean_dataset(params.paths.clean, "target", CLASSES, {"train": 20, "val": 8, "test": 10}, size, seed=3)
    write_json(params.paths.gates, {"passed": True, "gates": []})
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, len(CLASSES), bn_inference=True)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = load_split(params.paths.clean, "target", "train")
    model.fit(train.images(np.arange(len(train))), train.y, epochs=15, batch_size=20, verbose=0)
    save_model_dir(model, tuple(CLASSES), params.paths.finetuned_model)
    export.run(params)
    return params, json.loads(params.paths.export_report.read_text())


def test_variants_within_their_bounds_are_written_and_reported(exported: tuple[Params, dict]) -> None:
    params, report = exported
    variants = report["variants"]
    assert variants["int8"]["float_accuracy"] >= 0.9  # the model is good, so the gate means something

    optimized = variants["optimized"]
    assert optimized["accepted"] and optimized["max_abs_diff"] <= 1e-4
    int8 = variants["int8"]
    assert int8["accepted"], int8["reason"]
    assert int8["accuracy_drop"] <= params.export.int8_max_accuracy_drop == 0.01
    assert int8["calibration_images"] == 3 * 8  # the validation split, never the test images
    written = sorted(p.name for p in params.paths.onnx_variants.iterdir())
    assert written == sorted([OWNER_MARKER, *(f"{name}.onnx" for name in VARIANTS)])

    for name in VARIANTS:
        path = params.paths.onnx_variants / f"{name}.onnx"
        assert variants[name]["path"] == str(path)
        assert variants[name]["size_bytes"] == path.stat().st_size
        assert variants[name]["latency_ms_batch1"] > 0
    assert report["latency_ms_batch1"] > 0

    quantized = onnx.load(params.paths.onnx_variants / "int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in quantized.graph.node}
    # Weights stored in int8: the file is smaller than the float model.
    assert int8["size_bytes"] < report["size_bytes"]

    # The int8 model answers like the float one on the test images (it is the same task).
    test = load_split(params.paths.clean, "target", "test")
    session = ort.InferenceSession(str(params.paths.onnx_variants / "int8.onnx"), providers=["CPUExecutionProvider"])
    accuracy = float(np.mean(session.run(None, {"input": test.images(np.arange(len(test)))})[0].argmax(axis=1) == test.y))
    assert accuracy == pytest.approx(int8["accuracy"])


def test_int8_beyond_the_accuracy_bound_is_refused(exported: tuple[Params, dict]) -> None:
    params, _ = exported
    reference = params.paths.onnx_model.read_bytes()
    test = load_split(params.paths.clean, "target", "test")
    # Calibrated on blank images, the activation ranges miss what real images produce: int8 saturates.
    blank = np.zeros((16, 16, 16, 1), dtype=np.uint8)
    bound = params.export.model_copy(update={"int8_max_accuracy_drop": 0.01})
    refused = variants.int8(reference, test, bound, blank)
    assert not refused.accepted
    assert refused.report["accuracy_drop"] > 0.01
    assert "beyond export.int8_max_accuracy_drop 0.01" in refused.reason

    # The same variant passes once the bound allows its drop: the gate, not the build, decided.
    looser = params.export.model_copy(update={"int8_max_accuracy_drop": refused.report["accuracy_drop"]})
    allowed = variants.int8(reference, test, looser, blank)
    assert allowed.accepted


def test_unknown_variant_is_an_error_naming_the_choices(exported: tuple[Params, dict], tmp_path: Path) -> None:
    """A name the registry lacks never builds another variant: params refuse it, and so does build()."""
    from components.core.config import load_params
    from components.core.errors import PipelineError

    params, _ = exported
    (tmp_path / "params.yaml").write_text("export:\n  variants: [optimized, fp8]\n")
    with pytest.raises(PipelineError, match=r"export\.variants\.1.*'optimized' or 'int8'"):
        load_params(tmp_path / "params.yaml")

    test = load_split(params.paths.clean, "target", "test")
    with pytest.raises(PipelineError, match=r"unknown export.variants \['fp8'\]: choose from \['optimized', 'int8'\]"):
        variants.build(("fp8",), params.paths.onnx_model.read_bytes(), test, params.export, None)


def test_every_registered_variant_names_a_builder_taking_the_common_arguments() -> None:
    import inspect

    for name, kind in VARIANTS.items():
        build_one = variants.builder(name)
        assert build_one.__name__ == kind.builder
        assert list(inspect.signature(build_one).parameters) == ["reference", "test", "settings", "calibration"]
