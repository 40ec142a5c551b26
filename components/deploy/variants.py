"""Optimized variants of the exported model, each behind its own gate (written by the export stage).

- `optimized`: onnxruntime's offline graph optimization (constant folding, fusions) saved to a file,
  so a server skips that work at load; trusted only at parity <= export.max_abs_diff with the model.
- `int8`: onnxruntime static quantization (QDQ, int8 weights, uint8 activations), calibrated on the
  validation images; trusted only when test accuracy drops by at most export.int8_max_accuracy_drop.

A refused variant is reported with its reason and not written: the float model stays the one to
deploy, so a variant never fails the stage.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from components.data.dataset import Split
from components.core.errors import PipelineError

log = logging.getLogger(__name__)

VARIANTS = ("optimized", "int8")
CALIBRATION_BATCH = 16
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class Variant:
    name: str
    accepted: bool
    reason: str
    data: bytes  # the model; empty when it could not be built
    report: dict[str, Any]


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _predict(session: ort.InferenceSession, split: Split) -> np.ndarray:
    """Outputs for every image of the split, read batch by batch from its shards."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x})[0] for x, _ in split.batches(64)])


def latency_ms(data: bytes, image: np.ndarray) -> float:
    """Median batch-1 latency in milliseconds (after a warm-up call) on this machine."""
    session = _session(data)
    name = session.get_inputs()[0].name
    session.run(None, {name: image})
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        session.run(None, {name: image})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def optimized(reference: bytes, test: Split, max_abs_diff: float) -> Variant:
    """onnxruntime's extended graph optimizations, saved; gated on parity with the reference model."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        # EXTENDED keeps the graph portable across CPUs (ALL adds layout changes tied to this machine).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(reference, options, providers=["CPUExecutionProvider"])
        data = out.read_bytes()
    diff = float(np.max(np.abs(_predict(_session(data), test) - _predict(_session(reference), test))))
    accepted = diff <= max_abs_diff  # also refuses NaN
    reason = f"max |optimized - model| {diff:.1e} {'<=' if accepted else '>'} {max_abs_diff:.1e}"
    return Variant("optimized", accepted, reason, data, {"max_abs_diff": diff, "max_abs_diff_bound": max_abs_diff})


class _Calibration(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader protocol over in-memory images, in fixed batches."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        batches = [x[i : i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)]
        self.batches: Iterator[np.ndarray] = iter(batches)
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def int8(reference: bytes, calibration: np.ndarray, test: Split, max_accuracy_drop: float) -> Variant:
    """Static int8 quantization calibrated on `calibration`; gated on test accuracy against the float model."""
    input_name = _session(reference).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, out = (Path(folder) / name for name in ("model.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(reference)
        try:
            # tf2onnx graphs need shapes inferred (and are folded) before activations can be quantized.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out), _Calibration(input_name, calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
        except Exception as error:  # quantization tools raise many types; each means "no int8 variant"
            return Variant("int8", False, f"quantization failed: {type(error).__name__}: {error}", b"", {})
        data = out.read_bytes()
    float_accuracy = float(np.mean(_predict(_session(reference), test).argmax(axis=1) == test.y))
    int8_accuracy = float(np.mean(_predict(_session(data), test).argmax(axis=1) == test.y))
    drop = float_accuracy - int8_accuracy
    accepted = drop <= max_accuracy_drop + 1e-12  # the bound is inclusive; float noise must not flip it
    reason = (
        f"test accuracy {int8_accuracy:.4f} vs {float_accuracy:.4f} (drop {drop:+.4f}) "
        f"{'within' if accepted else 'beyond'} export.int8_max_accuracy_drop {max_accuracy_drop}"
    )
    report = {
        "accuracy": int8_accuracy,
        "float_accuracy": float_accuracy,
        "accuracy_drop": drop,
        "max_accuracy_drop": max_accuracy_drop,
        "calibration_images": len(calibration),
        "test_images": len(test),
    }
    return Variant("int8", accepted, reason, data, report)


def build(
    names: tuple[str, ...], reference: bytes, calibration: np.ndarray, test: Split, max_abs_diff: float,
    max_accuracy_drop: float,
) -> list[Variant]:
    """The requested variants, each gated, with size and batch-1 latency next to the reference model's."""
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise PipelineError(f"unknown export.variants {sorted(unknown)}: choose from {list(VARIANTS)}")
    built = []
    for name in names:
        variant = optimized(reference, test, max_abs_diff) if name == "optimized" else int8(
            reference, calibration, test, max_accuracy_drop
        )
        if variant.data:
            variant.report.update(size_bytes=len(variant.data), latency_ms_batch1=latency_ms(variant.data, test.images([0])))
        log.log(logging.INFO if variant.accepted else logging.WARNING,
                "variant %s %s: %s", name, "accepted" if variant.accepted else "REFUSED", variant.reason)
        built.append(variant)
    return built
