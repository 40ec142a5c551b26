"""Export stage: the gated fine-tuned Keras model -> models/model.onnx, trusted only after a parity check.

The ONNX file carries what a server needs and nothing else has to be shipped beside it: class names
(`labels`), the input contract (`input_spec`) and a note that preprocessing lives inside the graph.
The file is written only when onnxruntime agrees with Keras on held-out images, at their stored
size and at another size (the spatial dims are dynamic); on failure an older file is left as it
was and the stage fails, so DVC records nothing new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from components.deploy import onnx_runtime, variants
from components.core.artifacts import atomic_dir, write_bytes
from components.deploy.bundle import write_bundle
from components.deploy.variant_registry import VARIANTS
from components.core.config import Params
from components.data.dataset import Split, load_split
from components.core.errors import PipelineError
from components.core.reports import ExportReport, GatesReport, ParityReport, require_report, write_report
from components.training.models import INPUT_NAME, load_model_dir

log = logging.getLogger(__name__)

# The model's own resize is bilinear without antialiasing (an antialiased resize does not convert:
# tf2onnx emits ScaleAndTranslate, which onnxruntime rejects); training images were downscaled by
# Pillow first, so a server that wants the same answers downscales large images the same way.
PREPROCESSING = (
    "raw uint8 pixels; the model scales and resizes inside. Training images were resized to "
    "input_spec.image_size with Pillow BILINEAR (EXIF-upright, alpha on white) before the model saw "
    "them; do the same with large images for the same answers (tlpipe predict does)"
)
# The second parity check feeds the same images stretched to another, non-square size.
OTHER_SIZE_FACTORS = (2, 3)
OTHER_SIZE_IMAGES = 4


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    opset: int
    max_abs_diff: float
    top1_agreement: float
    images_checked: int

    def __str__(self) -> str:
        return (
            f"{self.path} ({self.size_bytes / 1e6:.2f} MB, opset {self.opset}): "
            f"max |onnx - keras| {self.max_abs_diff:.1e} on {self.images_checked} images, "
            f"top-1 agreement {self.top1_agreement:.1%}"
        )


def _require_gates_passed(gates_path: Path) -> None:
    # Ship only a blessed model (TFX Pusher): gates.json is a declared input of this stage.
    gates = require_report(gates_path, GatesReport)
    if not gates.passed:
        failed = [g.name for g in gates.failed]
        raise PipelineError(
            f"the model did not pass its gates ({', '.join(failed) or 'see ' + str(gates_path)}); "
            "not exporting it: improve the model or change the evaluate thresholds in params.yaml"
        )


def _tlpipe_version() -> str:
    try:
        return metadata.version("tlpipe")
    except metadata.PackageNotFoundError:
        return "unknown"


def _resize_side(model: keras.Model, fallback: int) -> int:
    # The side the model resizes every input to, read from the model itself when it has the layer.
    try:
        return int(model.get_layer("resize").get_config()["height"])
    except (ValueError, KeyError):
        return fallback


def _convert(model: keras.Model, channels: int, opset: int) -> onnx.ModelProto:
    signature = [tf.TensorSpec((None, None, None, channels), tf.uint8, name=INPUT_NAME)]
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    except Exception as error:  # tf2onnx raises many types; all mean "this graph did not convert"
        raise PipelineError(
            f"tf2onnx could not convert the model at opset {opset}: {error}; "
            "try another export.opset in params.yaml"
        ) from error
    return proto


def canonicalize(proto: onnx.ModelProto) -> None:
    """Rename every tensor and node inside the graph by its place in it, in place, so one model gives one file.

    tf2onnx names constants and nodes from a process-wide counter and keeps whichever of two equal
    constants it meets first, so one Keras model converted twice gave different bytes (and promotion
    saw a new model). The graph's own inputs and outputs keep their names: they are the contract.
    """
    graph = proto.graph
    keep = {value.name for value in graph.input} | {value.name for value in graph.output}
    names: dict[str, str] = {}
    dims: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    def visit(inner: onnx.GraphProto) -> None:
        for index, node in enumerate(inner.node):
            node.input[:] = [rename(name) for name in node.input]
            node.output[:] = [rename(name) for name in node.output]
            node.name = f"{node.op_type}_{index}"
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)
        for field in (inner.input, inner.output, inner.value_info):
            for value in field:
                value.name = rename(value.name)
                for dim in value.type.tensor_type.shape.dim:
                    if dim.HasField("dim_param"):  # symbolic sizes are numbered by the same counter
                        dim.dim_param = dims.setdefault(dim.dim_param, f"d{len(dims)}")
        for item in inner.initializer:
            item.name = rename(item.name)
        for field in (inner.initializer, inner.value_info):  # stored in the order of their new names
            ordered = sorted(field, key=lambda item: (len(item.name), item.name))
            copies = [type(item)() for item in ordered]
            for copy, item in zip(copies, ordered):
                copy.CopyFrom(item)
            del field[:]
            field.extend(copies)

    visit(graph)


def _parity(model: keras.Model, session: ort.InferenceSession, batches: list[np.ndarray]) -> tuple[float, float, int]:
    """(max |onnx - keras|, fraction with the same top-1 label, images compared) over the batches."""
    diffs, agree, count = [], 0, 0
    for x in batches:
        expected = model.predict(x, verbose=0)
        actual = onnx_runtime.run(session, x)
        if actual.shape != expected.shape:
            raise PipelineError(f"ONNX output shape {actual.shape} != Keras {expected.shape} for input {x.shape}")
        diffs.append(float(np.max(np.abs(actual.astype(np.float64) - expected))))
        agree += int(np.sum(actual.argmax(axis=1) == expected.argmax(axis=1)))
        count += len(x)
    return max(diffs), agree / count, count


def _variants(params: Params, data: bytes, test: Split) -> dict[str, dict[str, object]]:
    """Build and gate the optimized variants into paths.onnx_variants (accepted ones only); their report."""
    settings = params.export
    calibration = None
    if any(VARIANTS[name].needs_calibration for name in settings.variants):
        val = load_split(params.paths.clean, "target", "val")  # calibration never sees the test images
        calibration = val.images(np.arange(min(settings.calibration_images, len(val))))  # bounded by the setting
    built = variants.build(tuple(settings.variants), data, test, settings, calibration)
    with atomic_dir(params.paths.onnx_variants) as folder:
        for variant in built:
            if variant.accepted:
                (folder / f"{variant.name}.onnx").write_bytes(variant.data)
    return {
        v.name: {"accepted": v.accepted, "reason": v.reason, **v.report}
        | ({"path": str(params.paths.onnx_variants / f"{v.name}.onnx")} if v.accepted else {})
        for v in built
    }


def run(params: Params) -> ExportResult:
    started = time.perf_counter()
    paths, settings = params.paths, params.export
    _require_gates_passed(paths.gates)

    model, labels = load_model_dir(paths.finetuned_model)
    test = load_split(paths.clean, "target", "test")
    if labels is None or tuple(labels) != test.classes:
        raise PipelineError(
            f"{paths.finetuned_model} labels {labels} do not match the cleaned target classes {list(test.classes)}: "
            "rerun the pipeline from the transfer stage (dvc repro)"
        )
    channels = int(model.inputs[0].shape[-1])
    if channels != params.data.channels:
        raise PipelineError(
            f"the model takes {channels}-channel images but data.color_mode is {params.data.color_mode}: "
            "rerun the pipeline (dvc repro) so the model matches params.yaml"
        )
    outputs = int(model.outputs[0].shape[-1])
    if outputs != len(labels):
        raise PipelineError(f"the model has {outputs} outputs but {len(labels)} labels: rerun the finetune stage")

    log.info("converting %s to ONNX (opset %d)", paths.finetuned_model, settings.opset)
    proto = _convert(model, channels, settings.opset)
    canonicalize(proto)
    input_spec = {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "layout": "NHWC",
        "channels": channels,
        "color_mode": params.data.color_mode,
        "image_size": _resize_side(model, params.data.image_size),
    }
    onnx.helper.set_model_props(
        proto,
        {
            "labels": json.dumps(list(labels)),
            "input_spec": json.dumps(input_spec),
            "preprocessing": PREPROCESSING,
            "tlpipe_version": _tlpipe_version(),
        },
    )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise PipelineError(f"the converted ONNX model is invalid: {error}; try another export.opset") from error
    data = proto.SerializeToString(deterministic=True)

    # Evenly spaced over the split (it is sorted by class), so every class is represented.
    x = test.images(test.spread(settings.parity_images))
    fy, fx = OTHER_SIZE_FACTORS
    other = np.repeat(np.repeat(x[:OTHER_SIZE_IMAGES], fy, axis=1), fx, axis=2)
    session = onnx_runtime.session(data)
    max_abs_diff, top1, checked = _parity(model, session, [x, other])
    log.info("parity: max |onnx - keras| %.2e, top-1 agreement %.1f%% on %d images", max_abs_diff, 100 * top1, checked)
    if not max_abs_diff <= settings.max_abs_diff:  # also catches NaN
        raise PipelineError(
            f"ONNX and Keras disagree: max |difference| {max_abs_diff:.3e} > export.max_abs_diff "
            f"{settings.max_abs_diff:.1e} on {checked} images; {paths.onnx_model} was not written. "
            "Try another export.opset, or check the model for layers that differ at inference"
        )
    if top1 < 1.0:
        # With the difference inside the bound, a changed top-1 label can only be a near-tie.
        log.warning("top-1 label differs on %.1f%% of images (near-ties)", 100 * (1 - top1))

    variant_reports = _variants(params, data, test)
    write_bytes(paths.onnx_model, data)
    result = ExportResult(paths.onnx_model, len(data), settings.opset, max_abs_diff, top1, checked)
    report = {
        "max_abs_diff": max_abs_diff,
        "max_abs_diff_bound": settings.max_abs_diff,
        "top1_agreement": top1,
        "opset": settings.opset,
        "parity_images": len(x),
        "other_size_images": len(other),
        "sizes_checked": [list(x.shape[1:3]), list(other.shape[1:3])],
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "input": input_spec,
        "outputs": [
            {"name": o.name, "shape": [d if isinstance(d, int) else None for d in o.shape], "type": o.type}
            for o in session.get_outputs()
        ],
        "labels": list(labels),
        "latency_ms_batch1": variants.latency_ms(data, x[:1]),
        "variants": variant_reports,
        "bundle": str(paths.bundle),
    }
    write_bundle(paths.onnx_model, paths.bundle, ExportReport(**report), require_report(paths.gates, GatesReport),
                 report_html=paths.report)
    write_report(paths.export_report, ExportReport(**report, seconds=round(time.perf_counter() - started, 2)))
    write_report(paths.parity, ParityReport(onnx_max_abs_diff=max_abs_diff, onnx_top1_agreement=top1))  # a DVC metric
    return result
