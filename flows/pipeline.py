"""The Prefect flow: the dvc.yaml stages in dvc.yaml order, one task each, run in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.core.config import Params, load_params
from components.core.console import quiet_libraries, stage_warnings
from components.core.errors import PipelineError
from components.core.reports import ExportReport, GatesReport, MetricsReport, number, read_report
from components.core import graph
from components.core.graph import record_in_dvc, stage_names

ARTIFACT_KEY = "tlpipe-run"
quiet_libraries()  # a flow started without the CLI (a Prefect worker) is as quiet as `tlpipe run`


def stage_order(stages: list[str] | None = None) -> list[str]:
    """The stages to run in dvc.yaml order: all of them, or the named subset."""
    names = stage_names()
    unknown = [name for name in stages or [] if name not in names]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}: the stages are {', '.join(names)}")
    return [name for name in names if not stages or name in stages]


# No retries: a stage fails deterministically (bad data, a failed gate, a diverged fit), so a
# retry only repeats the failure. No Prefect cache either: DVC is the cache.
@task(retries=0, cache_policy=NO_CACHE)
def run_stage(name: str, params: Params) -> Any:
    with stage_warnings(name, params.paths.warnings):
        return graph.run_stage(name, params)


def model_rows(params: Params) -> list[tuple[str, str]]:
    """Metrics, gate verdict and ONNX model of the last run, from the reports on disk; n/a where a stage has not run."""
    metrics = read_report(params.paths.metrics, MetricsReport)
    gates = read_report(params.paths.gates, GatesReport)
    export = read_report(params.paths.export_report, ExportReport)
    verdict = "n/a" if gates is None else "passed" if gates.passed else "failed"
    failed = [g.name for g in gates.failed] if gates else []
    onnx = params.paths.onnx_model if params.paths.onnx_model.is_file() else None
    return [
        ("accuracy", number(metrics.accuracy if metrics else None)),
        ("macro F1", number(metrics.macro_f1 if metrics else None)),
        ("gates", verdict + (f" ({', '.join(failed)})" if failed else "")),
        ("ONNX model", number(onnx)),
        ("ONNX parity (max abs diff)", number(export.max_abs_diff if export else None)),
    ]


def markdown_table(title: str, rows: list[tuple[str, str]]) -> str:
    return "\n".join([f"# {title}", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def report_link(params: Params) -> str:
    """A link to the run report: the bundle's copy (export facts filled in) when export wrote one."""
    for page in (params.paths.bundle / "report.html", params.paths.report):
        if page.is_file():
            return f"[{page.name}]({page.resolve().as_uri()})"
    return "n/a"


def run_summary(params: Params, ran: list[str]) -> str:
    """Markdown for the run's artifact, from the reports on disk; a missing report reads n/a."""
    return markdown_table("tlpipe run", [("stages run", " -> ".join(ran)), *model_rows(params),
                                         ("run report", report_link(params))])


@flow(name="tlpipe")
def pipeline(params_path: str = "params.yaml", stages: list[str] | None = None) -> dict[str, Any]:
    """Run the dvc.yaml stages (or the named subset) in order; the first failure stops the run."""
    logger = get_run_logger()
    params = load_params(Path(params_path), record=True)  # the effective values dvc.yaml reads
    results: dict[str, Any] = {}
    previous = None
    try:
        for name in stage_order(stages):
            state = run_stage.with_options(name=name, task_run_name=name)(
                name, params, wait_for=[previous] if previous else None, return_state=True
            )
            try:
                results[name] = state.result()
            except PipelineError as error:
                raise PipelineError(f"stage '{name}' failed: {error}") from error
            logger.info("%s: %s", name, results[name])
            previous = state
    finally:
        record_in_dvc(list(results), Path(params_path))  # one graph, two drivers: dvc.lock knows what ran
    create_markdown_artifact(run_summary(params, list(results)), key=ARTIFACT_KEY, description="metrics, gates and model of the last run")
    return results
