"""The JSON reports the stages write: one typed model each, one writer, one reader, and the gates.

Every stage writes its report through `write_report` and every consumer (the summary, the flows, the
HTML report, export, promotion, drift) reads it through `read_report`, so a field added to a model
here reaches every reader, and a malformed file is one error naming it and the fix, never a
KeyError three calls later. A missing report is None: that stage has not run, which readers say.

The keys on disk are the models' field names, in declaration order (DVC's `metrics show` reads
scores.json and parity.json; other tools read the rest). A writer's unset optional fields stay off
disk, so each file keeps the keys its stage always wrote.

Gates (evaluate's, promotion's, drift's checks) are one shape, `Gate`, built by `build_gates` and
shown by `gate_rows` / `gate_table`; numbers shown to people go through `number`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.core.artifacts import write_json
from components.core.errors import PipelineError

Comparison = Literal[">=", "<="]


def number(value: Any) -> str:
    """A number for people: 4 decimals, or 4 significant digits below 1e-3 (parity differences); n/a for None."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


class Report(BaseModel):
    """A JSON artifact we own the shape of: an unknown key is an error, not a silently ignored field."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    STAGE: ClassVar[str | None] = None  # the dvc.yaml stage that writes it (named in the fix)
    FIX: ClassVar[str | None] = None  # the fix when no stage writes it


# ---------- gates ----------

class Gate(BaseModel):
    """One check of a value against a bound: `value comparison bound` must hold."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
    name: str
    value: float
    bound: float = Field(alias="threshold")
    comparison: Comparison = ">="  # gates written before the comparison was recorded were all minimums
    passed: bool

    @property
    def why(self) -> str:
        """The gate in words: "min_accuracy: 0.8000 < 0.9000" (failed) or "... >= ..." (passed)."""
        relation = self.comparison if self.passed else {">=": "<", "<=": ">"}[self.comparison]
        return f"{self.name}: {number(self.value)} {relation} {number(self.bound)}"


def build_gates(checks: Iterable[tuple[str, float, float, Comparison]]) -> list[Gate]:
    """Gates from (name, value, bound, comparison): passed when `value comparison bound` holds."""
    return [
        Gate(name=name, value=value, bound=bound, comparison=comparison,
             passed=value >= bound if comparison == ">=" else value <= bound)
        for name, value, bound, comparison in checks
    ]


def metric_gates(metrics: Mapping[str, Any], min_accuracy: float, min_macro_f1: float) -> list[Gate]:
    """The absolute gates on a model's test metrics (evaluate's, and promotion's first ones)."""
    return build_gates([("min_accuracy", metrics["accuracy"], min_accuracy, ">="),
                        ("min_macro_f1", metrics["macro_f1"], min_macro_f1, ">=")])


def gate_rows(gates: Iterable[Gate]) -> list[tuple[str, str, str, bool]]:
    """(name, value, bound, passed) per gate, numbers formatted: the rows every gate table shows."""
    return [(g.name, number(g.value), f"{g.comparison} {number(g.bound)}", g.passed) for g in gates]


def gate_table(gates: Iterable[Gate]) -> str:
    """The gates as a markdown table (the model card's, the promotion summary's)."""
    rows = [f"| {name} | {value} | {bound} | {'pass' if passed else 'FAIL'} |" for name, value, bound, passed
            in gate_rows(gates)]
    return "\n".join(["| gate | value | threshold | result |", "| --- | --- | --- | --- |",
                      *(rows or ["| (none recorded) | | | |"])])


# ---------- the stages' reports ----------

class ValidationReport(Report):
    STAGE: ClassVar[str] = "validate"
    success: bool
    tasks: dict[str, dict[str, Any]]
    expectations: list[dict[str, Any]]
    unusable: int
    duplicates: int


class DriftReport(Report):
    STAGE: ClassVar[str] = "validate"
    passed: bool
    status: str
    checks: list[Gate]
    changed: str | None = None  # set when the data is another dataset than the reference's
    reference: dict[str, Any] | None = None  # set when compared
    dataset: dict[str, Any]
    current: dict[str, Any]


class DriftReference(Report):
    STAGE: ClassVar[str] = "validate"
    dataset: dict[str, Any] = {}  # absent in references recorded before drift was per dataset
    stats: dict[str, Any]


class TaskCounts(Report):
    input: int
    kept: int
    quarantined: int
    held_back: int
    splits: dict[str, int]
    split_shares: dict[str, float] = {}
    leaked_across_splits: int = 0
    per_class: dict[str, dict[str, int]] = {}


class QuarantineReport(Report):
    STAGE: ClassVar[str] = "clean"
    quarantined: list[dict[str, str]]
    held_back: list[dict[str, str]] = []
    counts: dict[str, TaskCounts]
    reconciled: bool = True
    expectations: list[dict[str, Any]] = []


class SourceReport(Report):
    STAGE: ClassVar[str] = "source"
    mode: str
    # mode train
    epochs_run: int | None = None
    best_epoch: int | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    train_images: int | None = None
    seconds: float | None = None
    images_per_second: float | None = None
    workers: int | None = None  # processes that trained together (components.training.distributed)
    # mode self_supervised (also epochs_run, seconds, images_per_second)
    method: str | None = None
    images: dict[str, int] | None = None  # unlabelled images per origin
    final_loss: float | None = None
    # mode download
    weights: str | None = None
    backbone: str | None = None
    sha256: str | None = None
    file: str | None = None
    total_seconds: float


class Probe(Report):
    """Linear and k-NN probes of the transferred features: fitted on target train, scored on val."""
    linear_probe_accuracy: float
    knn_accuracy: float
    knn_k: int
    chance: float
    train_images: int
    val_images: int
    features: int
    seconds: float


class TransferReport(Report):
    STAGE: ClassVar[str] = "transfer"
    layers: list[dict[str, Any]]
    transferred: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    reinitialized: list[dict[str, Any]]
    match: str
    patterns: list[str]
    probe: Probe | None = None  # None: the cleaned images' channels differ from data.color_mode
    head_init: Literal["random", "probe"] = "random"  # probe: the head took the linear probe's weights


class FinetuneReport(Report):
    STAGE: ClassVar[str] = "finetune"
    backend: str
    precision: str
    compute_dtype: list[str]
    replicas: int
    devices: list[str]
    resumed: bool
    train_images: int
    val_images: int
    kept_phase: str
    val_loss: float
    val_accuracy: float
    phases: dict[str, dict[str, Any]]  # the trainer's FitResult per phase (head, unfrozen)
    trainable: dict[str, list[str]] = {}  # per phase that ran, the weighted layers it trained
    workers: int = 1  # processes that trained together (components.training.distributed)


class ClassMetrics(Report):
    precision: float
    recall: float
    f1: float
    support: int


class MetricsReport(Report):
    STAGE: ClassVar[str] = "evaluate"
    accuracy: float
    macro_precision: float | None = None
    macro_recall: float | None = None
    macro_f1: float
    test_images: int | None = None
    per_class: dict[str, ClassMetrics] = {}
    confusion_matrix: list[list[int]] = []


class GatesReport(Report):
    STAGE: ClassVar[str] = "evaluate"
    passed: bool
    gates: list[Gate]

    @classmethod
    def of(cls, gates: list[Gate]) -> "GatesReport":
        return cls(passed=all(g.passed for g in gates), gates=gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


class ScoresReport(Report):
    """The few numbers `dvc metrics show` and `dvc exp show` print (a dvc.yaml metric)."""

    STAGE: ClassVar[str] = "evaluate"
    accuracy: float
    macro_f1: float
    gates_passed: bool


class ScratchReport(Report):
    """The from-scratch baseline (stage scratch); trained false when scratch.enabled is off."""
    STAGE: ClassVar[str] = "scratch"
    trained: bool
    reason: str | None = None
    test_accuracy: float | None = None
    train_images: int | None = None
    fit: dict[str, Any] | None = None  # the trainer's FitResult


class TransferGainReport(Report):
    STAGE: ClassVar[str] = "evaluate"
    compared: bool
    transfer_accuracy: float | None = None
    scratch_accuracy: float | None = None
    accuracy_gain: float | None = None
    transfer: dict[str, Any] | None = None
    scratch: dict[str, Any] | None = None


class ExplainedError(Report):
    path: str
    true: str
    predicted: str
    probability: float  # of the predicted (wrong) class
    image: str  # file names in the errors folder
    overlay: str


class ErrorsReport(Report):
    """The misclassified test images evaluate explained with Grad-CAM (errors.json beside their pictures)."""

    STAGE: ClassVar[str] = "evaluate"
    layer: str | None
    misclassified: int
    shown: int
    cases: list[ExplainedError]


class ExportReport(Report):
    STAGE: ClassVar[str] = "export"
    max_abs_diff: float
    max_abs_diff_bound: float
    top1_agreement: float
    opset: int
    parity_images: int
    other_size_images: int
    sizes_checked: list[list[int]]
    onnx_sha256: str
    size_bytes: int
    input: dict[str, Any]
    outputs: list[dict[str, Any]]
    labels: list[str]
    latency_ms_batch1: float | None = None
    variants: dict[str, dict[str, Any]] = {}
    bundle: str
    seconds: float | None = None  # set once the bundle is written


class ParityReport(Report):
    """ONNX against Keras, the numbers `dvc metrics show` prints (a dvc.yaml metric)."""

    STAGE: ClassVar[str] = "export"
    onnx_max_abs_diff: float
    onnx_top1_agreement: float


class WarningsReport(Report):
    stage: str
    warnings: list[str]


class Scored(Report):
    """A model scored on the test split through onnxruntime (promotion's challenger and champion)."""

    path: str
    sha256: str
    labels: list[str]
    metrics: MetricsReport


class PromotionReport(Report):
    FIX: ClassVar[str] = "run tlpipe promote again (it rewrites this report)"
    time: str
    champion_version: str | None
    first_champion: bool
    gates: list[Gate]
    challenger: Scored
    champion: Scored | None
    production: str
    tag: str | None
    decision: Literal["promoted", "rejected", "kept"] | None = None
    version: str | None = None
    reasons: list[str] = []


class Lineage(Report):
    """A release's lineage.json: what it was made from and why it was promoted."""

    FIX: ClassVar[str] = "restore this release's lineage.json, or move the release out of the releases folder"
    version: str
    time: str
    replaced: str | None
    onnx_sha256: str
    labels: list[str]
    gates: list[Gate]
    metrics: dict[str, MetricsReport | None]
    code: dict[str, Any]
    dvc: dict[str, Any]
    params: dict[str, Any]
    tag: str | None


# ---------- writing and reading ----------

R = TypeVar("R", bound=Report)


def dump(report: Report) -> dict[str, Any]:
    """The report as the JSON object on disk (the keys its writer set)."""
    return report.model_dump(mode="json", by_alias=True, exclude_unset=True)


def write_report(path: Path, report: Report) -> None:
    """Write a report atomically."""
    write_json(path, dump(report))


def _fix(model: type[Report], stage: str | None) -> str:
    if model.FIX and not stage:
        return model.FIX
    stage = stage or model.STAGE
    return f"rerun the {stage} stage (dvc repro --force {stage})" if stage else "rerun the stage that writes it"


def _parse(path: Path, model: type[R], payload: Any, stage: str | None = None) -> R:
    """`payload` (read from `path`) as a `model`, or a PipelineError naming the file, the field and the fix."""
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise PipelineError(f"{path} is not a valid {model.__name__} ({where}: {first['msg']}{more}): "
                            f"{_fix(model, stage)}") from None


def read_report(path: Path, model: type[R], stage: str | None = None) -> R | None:
    """The report at `path` as a `model`; None when it is missing (its stage has not run).

    A file that is not JSON, or not this model's shape, is a PipelineError naming it and the fix.
    `stage` names the writer when the model serves several (each stage's warnings).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is unreadable ({error}): {_fix(model, stage)}") from None
    try:
        payload = json.loads(text)
    except ValueError as error:
        raise PipelineError(f"{path} is not JSON ({error}): {_fix(model, stage)}") from None
    return _parse(path, model, payload, stage)


def require_report(path: Path, model: type[R], stage: str | None = None) -> R:
    """The report at `path`; a PipelineError saying which stage to run when it is missing."""
    report = read_report(path, model, stage)
    if report is None:
        stage = stage or model.STAGE
        fix = f"run the {stage} stage first (dvc repro {stage})" if stage else _fix(model, None)
        raise PipelineError(f"{path} not found: {fix}")
    return report
