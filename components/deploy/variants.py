"""Optimized variants of the exported model, each behind its own gate (written by the export stage).

Each variant of the registry (components.deploy.variant_registry) is built by the function it names
here, `builder(reference, test, settings, calibration) -> Variant`:

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from components.core.config import ExportParams
from components.core.errors import PipelineError
from components.data.dataset import Split
from components.deploy import onnx_runtime
from components.deploy.variant_registry import VARIANTS

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class Variant:
    name: str
    accepted: bool
    reason: str
    data: bytes  # the model; empty when it could not be built
    report: dict[str, Any]


def latency_ms(data: bytes, image: np.ndarray) -> float:
    """Median batch-1 latency in milliseconds (after a warm-up call) on this machine."""
    session = onnx_runtime.session(data)
    onnx_runtime.run(session, image)
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        onnx_runtime.run(session, image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _outputs(data: bytes, split: Split) -> np.ndarray:
    return onnx_runtime.predict_split(onnx_runtime.session(data), split)


def optimized(reference: bytes, test: Split, settings: ExportParams, calibration: np.ndarray | None = None) -> Variant:
    """onnxruntime's extended graph optimizations, saved; gated on parity with the reference model."""
    max_abs_diff = settings.max_abs_diff
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "optimized.onnx"
        onnx_runtime.session(reference, optimized_to=out)
        data = out.read_bytes()
    diff = float(np.max(np.abs(_outputs(data, test) - _outputs(reference, test))))
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


def int8(reference: bytes, test: Split, settings: ExportParams, calibration: np.ndarray | None = None) -> Variant:
    """Static int8 quantization calibrated on `calibration`; gated on test accuracy against the float model."""
    if calibration is None or not len(calibration):
        raise ValueError("int8 needs calibration images (its registry entry says needs_calibration)")
    max_accuracy_drop = settings.int8_max_accuracy_drop
    input_name = onnx_runtime.session(reference).get_inputs()[0].name
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
    float_accuracy = float(np.mean(_outputs(reference, test).argmax(axis=1) == test.y))
    int8_accuracy = float(np.mean(_outputs(data, test).argmax(axis=1) == test.y))
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


Builder = Callable[[bytes, Split, ExportParams, np.ndarray | None], Variant]


def builder(name: str) -> Builder:
    """The function that builds and gates the registered variant `name`; PipelineError naming the choices."""
    kind = VARIANTS.get(name)
    if kind is None:
        raise PipelineError(f"unknown export.variants [{name!r}]: choose from {list(VARIANTS)}")
    return globals()[kind.builder]


def build(
    names: tuple[str, ...], reference: bytes, test: Split, settings: ExportParams, calibration: np.ndarray | None,
) -> list[Variant]:
    """The requested variants, each gated, with size and batch-1 latency next to the reference model's.

    `calibration`: validation images, needed when a requested variant's registry entry says so.
    """
    builders = [builder(name) for name in names]  # every name checked before any work
    built = []
    for name, build_one in zip(names, builders):
        variant = build_one(reference, test, settings, calibration)
        if variant.data:
            variant.report.update(size_bytes=len(variant.data), latency_ms_batch1=latency_ms(variant.data, test.images([0])))
        log.log(logging.INFO if variant.accepted else logging.WARNING,
                "variant %s %s: %s", name, "accepted" if variant.accepted else "REFUSED", variant.reason)
        built.append(variant)
    return built
