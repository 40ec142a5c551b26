"""Export stage: a real tiny model -> ONNX with labels in metadata, parity-checked; and the run summary."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from components import export
from components.core.artifacts import OWNER_MARKER, write_json
from components.core.config import Params, with_overrides
from components.core.errors import PipelineError
from components.training.models import build_model, load_model_dir, save_model_dir
from components.apps.summary import summary
from components.core.reports import number
from tests.conftest import pack_folder, shrunk_params, write_class_folders, write_clean_dataset

CLASSES = ["5", "6", "7"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, export.ExportResult]:
    """One real export, shared by the tests below (conversion is the slow part)."""
    params = shrunk_params(tmp_path_factory.mktemp("export"), {"export.variants": []})  # tests/test_variants.py
    size = params.data.image_size
    write_clean_dataset(params.paths.clean, "target", CLASSES, {"test": 4}, size)
    gate = {"name": "accuracy", "value": 1.0, "threshold": 0.0, "passed": True}
    write_json(params.paths.gates, {"passed": True, "gates": [gate]})
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, len(CLASSES), bn_inference=True)
    save_model_dir(model, tuple(CLASSES), params.paths.finetuned_model)
    return params, export.run(params)


def _elsewhere(params: Params, name: str, extra: dict[str, object] | None = None) -> Params:
    """The same inputs, with the stage's outputs sent to fresh paths (so a test sees what it writes)."""
    out = params.paths.onnx_model.parent / name
    return with_overrides(
        params,
        {"paths.onnx_model": str(out / "model.onnx"), "paths.export_report": str(out / "export.json"), **(extra or {})},
    )


def test_export_writes_a_checked_onnx_model_with_its_contract(exported: tuple[Params, export.ExportResult]) -> None:
    params, result = exported
    path = params.paths.onnx_model
    model = onnx.load(path)
    onnx.checker.check_model(model)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(meta["labels"]) == CLASSES
    spec = json.loads(meta["input_spec"])
    assert spec == {
        "name": "input",
        "dtype": "uint8",
        "layout": "NHWC",
        "channels": 1,
        "color_mode": "grayscale",
        "image_size": params.data.image_size,
    }
    assert "scales and resizes inside" in meta["preprocessing"]
    assert meta["tlpipe_version"]

    report = json.loads(params.paths.export_report.read_text())
    assert report["max_abs_diff"] <= 1e-4
    assert report["opset"] == params.export.opset == result.opset
    assert {op.domain: op.version for op in model.opset_import}[""] == params.export.opset
    assert report["parity_images"] == 3 * 4  # fewer test images than export.parity_images
    assert report["labels"] == CLASSES
    assert report["outputs"] == [{"name": "head", "shape": [None, len(CLASSES)], "type": "tensor(float)"}]
    assert report["size_bytes"] == path.stat().st_size == result.size_bytes
    assert report["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["latency_ms_batch1"] > 0
    assert report["variants"] == {}
    assert [p.name for p in params.paths.onnx_variants.iterdir()] == [OWNER_MARKER]  # no variant file
    assert str(params.paths.onnx_model) in str(result)


def test_onnx_model_takes_any_batch_and_image_size(exported: tuple[Params, export.ExportResult]) -> None:
    params, _ = exported
    session = ort.InferenceSession(str(params.paths.onnx_model), providers=["CPUExecutionProvider"])
    keras_model, _ = load_model_dir(params.paths.finetuned_model)
    rng = np.random.default_rng(1)
    for shape in [(1, 16, 16, 1), (3, 40, 24, 1), (2, 9, 61, 1)]:
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        probabilities = session.run(None, {"input": x})[0]
        assert probabilities.shape == (shape[0], len(CLASSES))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probabilities, keras_model.predict(x, verbose=0), atol=1e-4)


def test_exporting_one_model_twice_gives_the_same_bytes(exported: tuple[Params, export.ExportResult]) -> None:
    # tf2onnx numbers names from a process-wide counter: without canonical names, the second
    # conversion in one process gave other bytes, and promotion took a re-export for a new model.
    params, _ = exported
    again = _elsewhere(params, "again", {"paths.bundle": str(params.paths.bundle.parent / "again_bundle")})
    export.run(again)
    assert again.paths.onnx_model.read_bytes() == params.paths.onnx_model.read_bytes()
    report = json.loads(again.paths.export_report.read_text())
    assert report["onnx_sha256"] == json.loads(params.paths.export_report.read_text())["onnx_sha256"]


def test_parity_beyond_the_bound_fails_and_writes_nothing(exported: tuple[Params, export.ExportResult]) -> None:
    params, result = exported
    if result.max_abs_diff == 0.0:
        pytest.skip("onnxruntime matched Keras exactly here; export.max_abs_diff must be > 0, so no bound is below it")
    strict = _elsewhere(params, "strict", {"export.max_abs_diff": result.max_abs_diff / 2})
    with pytest.raises(PipelineError, match="ONNX and Keras disagree"):
        export.run(strict)
    assert not strict.paths.onnx_model.parent.exists() or not any(strict.paths.onnx_model.parent.iterdir())


def test_labels_that_do_not_match_the_data_are_refused(exported: tuple[Params, export.ExportResult]) -> None:
    params, _ = exported
    relabelled = params.paths.finetuned_model.parent / "relabelled"
    shutil.copytree(params.paths.finetuned_model, relabelled)
    (relabelled / "labels.json").write_text(json.dumps(["7", "6", "5"]))
    wrong = _elsewhere(params, "wrong", {"paths.finetuned_model": str(relabelled)})
    wrong.paths.onnx_model.parent.mkdir(parents=True)
    wrong.paths.onnx_model.write_bytes(b"the previous export")
    with pytest.raises(PipelineError, match="do not match the cleaned target classes"):
        export.run(wrong)
    assert wrong.paths.onnx_model.read_bytes() == b"the previous export"  # left as it was, not half-replaced
    assert sorted(p.name for p in wrong.paths.onnx_model.parent.iterdir()) == ["model.onnx"]


def test_a_model_that_failed_its_gates_is_not_exported(exported: tuple[Params, export.ExportResult]) -> None:
    params, _ = exported
    failed = _elsewhere(params, "failed", {"paths.gates": str(params.paths.gates.parent / "failed_gates.json")})
    gate = {"name": "macro_f1", "value": 0.4, "threshold": 0.9, "passed": False}
    write_json(failed.paths.gates, {"passed": False, "gates": [gate]})
    with pytest.raises(PipelineError, match="did not pass its gates.*macro_f1"):
        export.run(failed)
    assert not failed.paths.onnx_model.exists()


def test_summary_reports_every_stage_and_a_real_image_to_try(exported: tuple[Params, export.ExportResult]) -> None:
    params, result = exported
    paths = params.paths
    write_json(paths.metrics, {"accuracy": 0.9731, "macro_f1": 0.9702, "per_class": {}})
    # The transfer stage's layout (tests/test_retrain_deployment.py checks `tlpipe summary` on a real run's).
    transfer = {
        "layers": [],
        "transferred": [{"layer": f"backbone.{name}", "source": f"backbone.{name}", "weights": 72} for name in ("a", "b")],
        "skipped": [{"layer": "backbone.c", "reason": "shape (3, 3, 1, 8) != (3, 3, 3, 8)"}],
        "reinitialized": [{"layer": "head", "reason": "not selected by transfer.layers"}],
        "match": "name", "patterns": ["backbone.*"],
    }
    write_json(paths.transfer_report, transfer)
    per_task = {"input": 10, "kept": 8, "quarantined": 1, "held_back": 1, "splits": {"train": 5}, "split_shares": {},
                "leaked_across_splits": 0, "per_class": {}}
    write_json(paths.quarantine, {"quarantined": [], "counts": {"source": per_task, "target": per_task}})
    # The embedded digits exist only in data/raw's packs: the summary says how to take one out.
    pack_folder(write_class_folders(paths.raw.parent / "mine", ["5"], per_class=1), paths.raw / "target")
    pack = paths.raw / "target" / "pack-00000.tar"

    text = summary(params)
    assert "accuracy 0.9731, macro F1 0.9702" in text
    assert "gates: PASSED" in text and "pass  accuracy: 1.0000 (threshold >= 0.0000)" in text
    assert "transfer: 2 transferred, 1 skipped, 1 reinitialized layers" in text
    totals = "input 10, kept 8, quarantined 1, held_back 1, leaked_across_splits 0"
    assert f"quarantine: source: {totals}; target: {totals}" in text
    assert f"max |onnx - keras| {number(result.max_abs_diff)}" in text
    assert f"tar -xf {pack} -C /tmp 5/5_0000.png\n  tlpipe predict {paths.onnx_model} /tmp/5/5_0000.png" in text
    assert "dvc plots show" in text


def test_summary_names_the_stages_that_have_not_run(params: Params) -> None:
    text = summary(params)
    assert "the evaluate stage has not run yet" in text
    assert "the export stage has not run yet" in text
    assert "tlpipe predict" not in text  # no model to try yet
    assert "dvc plots show" in text


def _parse_pbtxt(text: str) -> dict[str, list[object]]:
    """A small protobuf text-format reader (what Triton parses): every field maps to a list of values."""
    import re

    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    position = 0

    def value() -> object:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                if tokens[position] == ",":
                    position += 1
            position += 1
            return items
        if token.startswith('"'):
            return token[1:-1]
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def message(end: str | None) -> dict[str, list[object]]:
        nonlocal position
        fields: dict[str, list[object]] = {}
        while position < len(tokens) and tokens[position] != end:
            name = tokens[position]
            position += 1
            if tokens[position] == ":":
                position += 1
            parsed = value()
            fields.setdefault(name, []).extend(parsed if isinstance(parsed, list) and name != "dims" else [parsed])
        position += 1
        return fields

    return message(None)


def test_bundle_holds_the_model_labels_card_and_a_triton_repository(exported: tuple[Params, export.ExportResult]) -> None:
    params, _ = exported
    bundle = params.paths.bundle
    model_bytes = params.paths.onnx_model.read_bytes()
    assert (bundle / "model.onnx").read_bytes() == model_bytes
    assert (bundle / "labels.txt").read_text().splitlines() == CLASSES
    card = (bundle / "MODEL_CARD.md").read_text()
    import hashlib

    assert hashlib.sha256(model_bytes).hexdigest() in card and "`5`, `6`, `7`" in card and "accuracy" in card

    repository = bundle / "triton" / "tlpipe_classifier"
    assert (repository / "1" / "model.onnx").read_bytes() == model_bytes
    assert (repository / "labels.txt").read_text().splitlines() == CLASSES
    config = _parse_pbtxt((repository / "config.pbtxt").read_text())
    graph = onnx.load(params.paths.onnx_model).graph
    types = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}
    assert config["name"] == ["tlpipe_classifier"] and config["platform"] == ["onnxruntime_onnx"]
    assert config["max_batch_size"][0] > 0  # the graph's batch dim is dynamic, so Triton may batch
    for section, values in (("input", graph.input), ("output", graph.output)):
        assert len(config[section]) == len(values)
        for entry, value in zip(config[section], values):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            assert entry["name"] == [value.name]
            assert entry["data_type"] == [types[value.type.tensor_type.elem_type]]
            assert entry["dims"] == [dims[1:]]  # Triton's dims leave out the batch dim
    assert config["input"][0]["dims"] == [[-1, -1, 1]] and config["output"][0]["dims"] == [[len(CLASSES)]]
    assert config["output"][0]["label_filename"] == ["labels.txt"]
    assert "dynamic_batching" in config
