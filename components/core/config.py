"""params.yaml over the shipped defaults, parsed once into frozen typed models: a typo or a bad value
fails before any work.

Every default lives in defaults.yaml (next to this file) alone, so every field here is required; a
project's params.yaml holds only what it changes. Types are strict (a YAML `true` is not the number
1, `"3"` is not 3), numbers finite and in range, and rules between keys (`validate.min_side <=
validate.max_side`) are checked here, each error naming its keys.

One rule for every path setting (`paths:`, `data.source_dir`/`target_dir`, `source.cache_dir`,
a `source.weights` file, `source.self_supervised.folder`): `~` is the home folder, and a relative path is taken from the folder
of the params file, wherever the command runs from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from components.core.artifacts import read_yaml, write_text
from components.core.errors import PipelineError
from components.deploy.variant_registry import NAMES as VARIANT_NAMES
from components.training.backbones import NAMES as BACKBONE_NAMES

DEFAULT_PARAMS = Path("params.yaml")
DEFAULTS = Path(__file__).with_name("defaults.yaml")


def _not_a_bool(kind: str) -> BeforeValidator:
    def check(value: object) -> object:
        if isinstance(value, bool):  # YAML's true/false would otherwise pass as 1/0
            raise ValueError(f"must be {kind}, not {str(value).lower()}")
        return value

    return BeforeValidator(check)


# Whole numbers: strict, so true, 3.0 and "3" are refused. Numbers: an integer is fine, a bool,
# infinity or NaN is not.
Int = Annotated[int, _not_a_bool("a whole number"), Strict()]
Float = Annotated[float, _not_a_bool("a number"), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
SEED_LIMIT = 2**32  # numpy's and TensorFlow's seeds are 32-bit

# Keys an older params.yaml may still set, and what replaced them: the error says so, not just "unknown".
REMOVED = {
    "transfer.freeze": "fine-tuning alone decides what trains: finetune.head_epochs (a first phase that trains "
                       "the head on the frozen backbone) and finetune.unfreeze_top (the top N backbone layers "
                       "trained in the second phase); remove the key",
    "evaluate.compare_scratch": "the from-scratch baseline is its own stage now: set scratch.enabled instead",
}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(_Section):
    source_dir: str
    target_dir: str
    embedded_source_classes: tuple[Annotated[Int, Field(ge=0, le=9)], ...]
    embedded_target_classes: tuple[Annotated[Int, Field(ge=0, le=9)], ...]
    image_size: Int = Field(ge=8, le=1024)
    color_mode: Literal["grayscale", "rgb"]

    @model_validator(mode="after")
    def _digit_sets(self) -> "DataParams":
        for key in ("embedded_source_classes", "embedded_target_classes"):
            digits = getattr(self, key)
            if not digits or len(set(digits)) != len(digits):
                raise ValueError(f"data.{key} must list one or more different digits 0-9, got {list(digits)}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    @property
    def pil_mode(self) -> str:
        return "L" if self.color_mode == "grayscale" else "RGB"


class ValidateParams(_Section):
    min_images_per_class: Int = Field(ge=1)
    min_side: Int = Field(ge=1)
    max_side: Int = Field(ge=1)
    max_pixels: Int = Field(ge=1)
    max_aspect_ratio: Float = Field(ge=1)
    max_imbalance_ratio: Float = Field(ge=1)
    allow_class_overlap: Bool
    drift_gate: Bool
    drift_max_class_share_change: Float = Field(ge=0)
    drift_max_size_change: Float = Field(ge=0)
    drift_max_channel_change: Float = Field(ge=0)
    workers: Int = Field(ge=0)

    @model_validator(mode="after")
    def _sides_in_order(self) -> "ValidateParams":
        if self.min_side > self.max_side:
            raise ValueError(
                f"validate.min_side ({self.min_side}) is above validate.max_side ({self.max_side}): "
                "every image would be refused; lower min_side or raise max_side"
            )
        return self


class CleanParams(_Section):
    val_fraction: Float = Field(gt=0, lt=1)
    test_fraction: Float = Field(gt=0, lt=1)
    target_train_per_class: Int | None = Field(ge=1)
    near_duplicate_distance: Int = Field(ge=-1, le=64)
    near_duplicate_min_side: Int = Field(ge=1)
    split_share_tolerance: Float = Field(gt=0, lt=1)
    workers: Int = Field(ge=0)

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> "CleanParams":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9 to leave images to train on")
        return self


# The allowed names come from the registry (an error lists them): adding a backbone touches only it.
Backbone = Literal[BACKBONE_NAMES]  # type: ignore[valid-type]


class ModelParams(_Section):
    backbone: Backbone
    width: Int = Field(ge=1)
    dropout: Float = Field(ge=0, lt=1)


class SelfSupervisedParams(_Section):
    images: tuple[Literal["target", "source"], ...]
    folder: str
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=2)
    learning_rate: Float = Field(gt=0)
    temperature: Float = Field(gt=0)
    projection_dim: Int = Field(ge=1)
    augment_translation: Float = Field(ge=0, lt=1)
    augment_zoom: Float = Field(ge=0, lt=1)
    augment_rotation: Float = Field(ge=0, le=0.5)
    augment_contrast: Float = Field(ge=0, lt=1)
    augment_noise: Float = Field(ge=0, lt=1)


class SourceParams(_Section):
    mode: Literal["train", "download", "self_supervised"]
    weights: str
    sha256: str = Field(pattern=r"^([0-9a-fA-F]{64})?$")  # a digest, or empty
    mirror: str = Field(pattern=r"^(https?|file)://")
    cache_dir: str
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    learning_rate: Float = Field(gt=0)
    patience: Int = Field(ge=1)
    self_supervised: SelfSupervisedParams

    @model_validator(mode="after")
    def _download_names_weights(self) -> "SourceParams":
        if self.mode == "self_supervised" and not (self.self_supervised.images or self.self_supervised.folder):
            raise ValueError("mode 'self_supervised' needs images to pretrain on: set source.self_supervised.images "
                             "(target, source) or source.self_supervised.folder")
        if self.mode == "download" and not self.weights:
            raise ValueError("mode 'download' needs weights: imagenet, a file path or an http(s) URL")
        if self.mode == "download" and self.weights != "imagenet" and not self.sha256:
            raise ValueError("weights from a file or URL must be pinned: set source.sha256 to the file's 64-hex digest")
        return self


class TransferParams(_Section):
    layers: tuple[str, ...]
    match: Literal["name", "position"]
    adapt_channels: Bool
    probe_images: Int = Field(ge=1)
    head_init: Literal["random", "probe"]


class FinetuneParams(_Section):
    batch_size: Int = Field(ge=1)
    head_epochs: Int = Field(ge=0)
    head_learning_rate: Float = Field(gt=0)
    epochs: Int = Field(ge=0)
    learning_rate: Float = Field(gt=0)
    unfreeze_top: Int = Field(ge=-1)
    patience: Int = Field(ge=1)
    warmup_epochs: Int = Field(ge=0)
    cosine_decay: Bool
    label_smoothing: Float = Field(ge=0, lt=1)
    class_weight: Literal["balanced", "none"]
    augment_flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    augment_rotation: Float = Field(ge=0, le=0.5)
    augment_zoom: Float = Field(ge=0, lt=1)
    augment_contrast: Float = Field(ge=0, lt=1)
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    jit_compile: Literal["auto"] | Bool
    data_parallel: Bool
    min_steps_per_epoch: Int = Field(ge=0)


class ScratchParams(_Section):
    enabled: Bool


class EvaluateParams(_Section):
    min_accuracy: Float = Field(ge=0, le=1)
    min_macro_f1: Float = Field(ge=0, le=1)
    min_transfer_gain: Float | None = Field(ge=-1, le=1)


class ExportParams(_Section):
    opset: Int = Field(ge=13)
    max_abs_diff: Float = Field(gt=0)
    parity_images: Int = Field(ge=1)
    variants: tuple[Literal[VARIANT_NAMES], ...]  # type: ignore[valid-type]  # the registry lists them
    int8_max_accuracy_drop: Float = Field(ge=0, le=1)
    calibration_images: Int = Field(ge=1)


class PromoteParams(_Section):
    max_regression: Float = Field(ge=0, le=1)
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
    scores: Path
    parity: Path
    gates: Path
    confusion: Path
    confusion_png: Path
    export_report: Path
    transfer_gain: Path
    scratch_report: Path
    production: Path
    releases: Path
    promotion_report: Path
    promotion_summary: Path
    dvc_lock: Path
    effective_params: Path
    warnings: Path
    explained_errors: Path
    report: Path


class Params(_Section):
    seed: Int = Field(ge=0, lt=SEED_LIMIT)
    data: DataParams
    validate_: ValidateParams = Field(alias="validate")
    clean: CleanParams
    model: ModelParams
    source: SourceParams
    transfer: TransferParams
    finetune: FinetuneParams
    scratch: ScratchParams
    evaluate: EvaluateParams
    export: ExportParams
    promote: PromoteParams
    paths: Paths

    @property
    def validation(self) -> ValidateParams:
        return self.validate_

    @model_validator(mode="after")
    def _gain_needs_a_comparison(self) -> "Params":
        if self.evaluate.min_transfer_gain is not None and not self.scratch.enabled:
            raise ValueError(
                "evaluate.min_transfer_gain gates a comparison that scratch.enabled: false never makes: "
                "set scratch.enabled: true, or evaluate.min_transfer_gain: null"
            )
        return self

    def resolve(self, root: Path) -> "Params":
        """The same params with every path setting taken from `root` (the params file's folder) when relative."""
        def under_root(value: str | Path) -> Path:
            return root / Path(value).expanduser()  # an absolute path (or ~) stays what it is

        resolved = {name: under_root(path) for name, path in self.paths.model_dump().items()}
        folders = {key: str(under_root(value)) for key in ("source_dir", "target_dir") if (value := getattr(self.data, key))}
        source: dict[str, object] = {"cache_dir": str(under_root(self.source.cache_dir))}
        if self.source.self_supervised.folder:
            source["self_supervised"] = self.source.self_supervised.model_copy(
                update={"folder": str(under_root(self.source.self_supervised.folder))})
        weights = self.source.weights
        if weights and weights != "imagenet" and "://" not in weights:  # a file, not a URL
            source["weights"] = str(under_root(weights))
        return self.model_copy(update={
            "paths": Paths(**resolved),
            "data": self.data.model_copy(update=folders),
            "source": self.source.model_copy(update=source),
        })


def _describe(error: ValidationError, source: Path) -> str:
    lines = [f"{source}: {error.error_count()} problem(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        key = key.replace("validate_", "validate")
        if item["type"] == "extra_forbidden" and key in REMOVED:
            lines.append(f"  - '{key}' was removed: {REMOVED[key]}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or fix its spelling")
        elif item["type"] == "missing":
            lines.append(f"  - missing key '{key}': add it (components/core/defaults.yaml lists every key)")
        else:
            lines.append(f"  - '{key}': {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _read_mapping(path: Path) -> dict:
    try:
        raw = read_yaml(path) or {}
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def _merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` over it, key by key inside sections (a new mapping; unknown keys kept for the check)."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def shipped_defaults() -> dict:
    """Every key with its default value, as plain YAML values."""
    return _read_mapping(DEFAULTS)


def effective_raw(path: Path = DEFAULT_PARAMS) -> dict:
    """The shipped defaults with params.yaml over them, as plain YAML values (paths relative, unchecked)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: run from the repository root or pass --params PATH")
    return _merge(shipped_defaults(), _read_mapping(path))


def load_params(path: Path = DEFAULT_PARAMS, root: Path | None = None, record: bool = False) -> Params:
    """Read params.yaml over the defaults and check it; relative paths are taken from `root` (default: its folder).

    `record`: also write the effective values to paths.effective_params (what a stage ran with, and
    what dvc.yaml's `params:` read), rewriting the file only when they changed.
    """
    path = Path(path)
    raw = effective_raw(path)
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_describe(error, path)) from None
    params = params.resolve(root if root is not None else path.parent)
    if record:
        text = yaml.safe_dump(raw, sort_keys=False)
        target = params.paths.effective_params
        if not target.is_file() or target.read_text() != text:
            write_text(target, text)
    return params


def set_dotted(raw: dict, overrides: dict[str, object]) -> dict:
    """Replace dotted keys, e.g. {"finetune.epochs": 1}, in a params mapping (in place; returned)."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = raw
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            raise PipelineError(f"'{dotted}' was removed: {REMOVED[dotted]}" if dotted in REMOVED
                                else f"unknown key '{dotted}'")
        section[leaf] = value
    return raw


def with_overrides(params: Params, overrides: dict[str, object]) -> Params:
    """A re-validated copy with dotted keys replaced, e.g. {"finetune.epochs": 1}."""
    raw = set_dotted(params.model_dump(by_alias=True, mode="json"), overrides)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise PipelineError(_describe(error, Path("overrides"))) from None
