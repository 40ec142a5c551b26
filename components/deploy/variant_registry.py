"""The export-variant registry: every name `export.variants` takes, its builder, and whether it needs calibration.

Plain data, so the config validates `export.variants` against it without importing onnxruntime;
each builder is the function of that name in components.deploy.variants (a test checks that each
exists). Adding a variant is one entry here and its builder there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantKind:
    name: str  # the export.variants value, and the file name in paths.onnx_variants (<name>.onnx)
    builder: str  # the function in components.deploy.variants that builds and gates it
    needs_calibration: bool  # built from validation images (the export stage reads them only then)


VARIANTS: dict[str, VariantKind] = {v.name: v for v in (
    VariantKind("optimized", "optimized", needs_calibration=False),  # gate: parity, export.max_abs_diff
    VariantKind("int8", "int8", needs_calibration=True),  # gate: test accuracy, export.int8_max_accuracy_drop
)}
NAMES = tuple(VARIANTS)
