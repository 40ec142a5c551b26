"""params.yaml, parsed once into frozen typed models: a typo or a bad value fails before any work.

Every default lives in params.yaml alone, so every field here is required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.core.errors import PipelineError

DEFAULT_PARAMS = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(_Section):
    source_dir: str
    target_dir: str
    embedded_source_classes: tuple[int, ...]
    embedded_target_classes: tuple[int, ...]
    image_size: int = Field(ge=8, le=1024)
    color_mode: Literal["grayscale", "rgb"]

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    @property
    def pil_mode(self) -> str:
        return "L" if self.color_mode == "grayscale" else "RGB"


class ValidateParams(_Section):
    min_images_per_class: int = Field(ge=1)
    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    max_aspect_ratio: float = Field(ge=1)
    max_imbalance_ratio: float = Field(ge=1)
    allow_class_overlap: bool
    drift_gate: bool
    drift_max_class_share_change: float = Field(ge=0)
    drift_max_size_change: float = Field(ge=0)
    drift_max_channel_change: float = Field(ge=0)


class CleanParams(_Section):
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    target_train_per_class: int | None = Field(ge=1)
    near_duplicate_distance: int = Field(ge=-1, le=64)
    near_duplicate_min_side: int = Field(ge=1)
    split_share_tolerance: float = Field(gt=0, lt=1)
    workers: int = Field(ge=0)

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> "CleanParams":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9 to leave images to train on")
        return self


Backbone = Literal["simple_cnn", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_v2_b0", "resnet50", "vgg16"]


class ModelParams(_Section):
    backbone: Backbone
    width: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)


class SourceParams(_Section):
    mode: Literal["train", "download"]
    weights: str
    sha256: str
    mirror: str = Field(pattern=r"^(https?|file)://")
    cache_dir: str
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    patience: int = Field(ge=1)

    @model_validator(mode="after")
    def _download_names_weights(self) -> "SourceParams":
        if self.mode == "download" and not self.weights:
            raise ValueError("mode 'download' needs weights: imagenet, a file path or an http(s) URL")
        if self.mode == "download" and self.weights != "imagenet" and len(self.sha256) != 64:
            raise ValueError("weights from a file or URL must be pinned: set sha256 to the file's 64-hex digest")
        if self.sha256 and len(self.sha256) != 64:
            raise ValueError("sha256 must be a 64-hex digest, or empty")
        return self


class TransferParams(_Section):
    layers: tuple[str, ...]
    match: Literal["name", "position"]
    adapt_channels: bool
    # all | none | until:<layer name prefix> | top:<N trainable>
    freeze: str = Field(pattern=r"^(all|none|until:\S+|top:\d+)$")


class FinetuneParams(_Section):
    batch_size: int = Field(ge=1)
    head_epochs: int = Field(ge=0)
    head_learning_rate: float = Field(gt=0)
    epochs: int = Field(ge=0)
    learning_rate: float = Field(gt=0)
    unfreeze_top: int = Field(ge=-1)
    patience: int = Field(ge=1)
    warmup_epochs: int = Field(ge=0)
    cosine_decay: bool
    label_smoothing: float = Field(ge=0, lt=1)
    class_weight: Literal["balanced", "none"]
    augment_flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    augment_rotation: float = Field(ge=0, le=0.5)
    augment_zoom: float = Field(ge=0, lt=1)
    augment_contrast: float = Field(ge=0, lt=1)
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    jit_compile: Literal["auto"] | bool
    data_parallel: bool
    min_steps_per_epoch: int = Field(ge=0)


class EvaluateParams(_Section):
    min_accuracy: float = Field(ge=0, le=1)
    min_macro_f1: float = Field(ge=0, le=1)
    compare_scratch: bool
    min_transfer_gain: float | None = Field(ge=-1, le=1)


class ExportParams(_Section):
    opset: int = Field(ge=13)
    max_abs_diff: float = Field(gt=0)
    parity_images: int = Field(ge=1)
    variants: tuple[Literal["optimized", "int8"], ...]
    int8_max_accuracy_drop: float = Field(ge=0, le=1)
    calibration_images: int = Field(ge=1)


class PromoteParams(_Section):
    max_regression: float = Field(ge=0, le=1)
    tag_prefix: str = Field(pattern=r"^[A-Za-z0-9._/-]*$")


class Paths(_Section):
    raw: Path
    manifest: Path
    clean: Path
    source_model: Path
    transferred_model: Path
    finetuned_model: Path
    finetune_checkpoint: Path
    onnx_model: Path
    onnx_variants: Path
    bundle: Path
    validation: Path
    data_docs: Path
    quarantine: Path
    quarantine_summary: Path
    drift_report: Path
    drift_reference: Path
    source_report: Path
    transfer_report: Path
    transfer_table: Path
    finetune_report: Path
    training_curves: Path
    metrics: Path
    gates: Path
    confusion: Path
    confusion_png: Path
    export_report: Path
    transfer_gain: Path
    production: Path
    releases: Path
    promotion_report: Path
    promotion_summary: Path
    dvc_lock: Path
    explained_errors: Path
    report: Path


class Params(_Section):
    seed: int
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    clean: CleanParams
    model: ModelParams
    source: SourceParams
    transfer: TransferParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    export: ExportParams
    promote: PromoteParams
    paths: Paths

    @property
    def validation(self) -> ValidateParams:
        return self.validate_

    def resolve(self, root: Path) -> "Params":
        """The same params with every relative path (paths:, data folders) taken from `root` (the repository)."""
        resolved = {name: root / path for name, path in self.paths.model_dump().items()}
        folders = {key: str(root / value) for key in ("source_dir", "target_dir") if (value := getattr(self.data, key))}
        data = self.data.model_copy(update=folders)
        return self.model_copy(update={"paths": Paths(**resolved), "data": data})


def _describe(error: ValidationError, source: Path) -> str:
    lines = [f"{source}: {error.error_count()} problem(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        key = key.replace("validate_", "validate")
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or fix its spelling")
        elif item["type"] == "missing":
            lines.append(f"  - missing key '{key}': add it (the repository's params.yaml lists every key)")
        else:
            lines.append(f"  - '{key}': {item['msg']}")
    return "\n".join(lines)


def load_params(path: Path = DEFAULT_PARAMS, root: Path | None = None) -> Params:
    """Read and check params.yaml; relative paths are taken from `root` (default: its folder)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_describe(error, path)) from None
    return params.resolve(root if root is not None else path.parent)


def set_dotted(raw: dict, overrides: dict[str, object]) -> dict:
    """Replace dotted keys, e.g. {"finetune.epochs": 1}, in a params mapping (in place; returned)."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = raw
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            raise PipelineError(f"unknown key '{dotted}'")
        section[leaf] = value
    return raw


def with_overrides(params: Params, overrides: dict[str, object]) -> Params:
    """A re-validated copy with dotted keys replaced, e.g. {"finetune.epochs": 1}."""
    raw = set_dotted(params.model_dump(by_alias=True, mode="json"), overrides)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_describe(error, Path("overrides"))) from None
