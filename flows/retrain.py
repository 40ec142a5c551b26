"""Scheduled retraining: pull, decide whether anything changed, `dvc repro`, promote or keep, push.

Deployed by prefect.yaml (a cron schedule, a process work pool, one run at a time). The pipeline
runs as `dvc repro` in a subprocess, so dvc.lock records exactly what was trained; promotion
(components.deploy.promote) only ever moves production to a complete release, so a failed run, whatever
step it fails in, leaves the champion as it was. A failed run logs and, when `notify_block` names
a Prefect block (a notification block such as `slack-webhook/ops`, or a `webhook/NAME` block), sends
it the failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from components.core.config import Params, load_params
from components.core.errors import PipelineError
from components.core.reports import (MetricsReport, PromotionReport, QuarantineReport, TransferGainReport, number,
                                     read_report, require_report)
from flows.pipeline import markdown_table, model_rows

SUMMARY_KEY = "tlpipe-retrain"
PER_CLASS_KEY = "tlpipe-retrain-per-class"
# Remote pull and push are the steps that fail transiently (network, object store): 10, 20, 40 s.
REMOTE_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=10)}


def _dvc_command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    # This interpreter's bin first on PATH, as after `source .venv/bin/activate`: dvc.yaml calls `tlpipe`.
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return [str(bin_dir / "dvc"), *args], env


def dvc(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in the repository, output captured."""
    command, env = _dvc_command(args)
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def _tail(done: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


def default_remote(root: Path) -> str | None:
    done = dvc(["remote", "default"], root)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _sync(root: Path, args: list[str], verb: str) -> str:
    """`dvc pull` or `dvc push` against the default remote; with no remote configured, log it and go on."""
    logger = get_run_logger()
    remote = default_remote(root)
    if remote is None:
        logger.info("no default DVC remote (dvc remote add -d NAME URL): no dvc %s, the local cache only", args[0])
        return "no remote"
    done = dvc(args, root)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {args[0]} with {remote} failed (retried with backoff):\n{_tail(done)}")
    logger.info("%s %s", verb, remote)
    return remote


@task(cache_policy=NO_CACHE, **REMOTE_RETRIES)
def dvc_pull(root: Path) -> str:
    # --allow-missing: outputs never pushed yet (a first run) are rebuilt, not an error.
    return _sync(root, ["pull", "--allow-missing"], "pulled from")


@task(cache_policy=NO_CACHE, **REMOTE_RETRIES)
def dvc_push(root: Path) -> str:
    return _sync(root, ["push"], "pushed to")


def _lock(root: Path) -> dict[str, Any]:
    """dvc.lock's record of each stage (its deps, params and outs with their hashes), as DVC wrote it."""
    path = root / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}).get("stages") or {} if path.is_file() else {}


def _repro(root: Path, stage: str | None = None, force: bool = False, stale: list[str] | None = None) -> list[str]:
    """Run `dvc repro` (of `stage` only, or the graph), its output streamed to the run's log; the stages it ran.

    Asked of DVC, not read from its console: the stages `dvc status` finds out of date before (`stale`
    when the caller has just asked; and always_changed ones), and those whose dvc.lock record the run
    rewrote (downstream of a change). No retries: a stage fails deterministically (bad data, a failed gate), so a retry repeats it.
    """
    from components.deploy.promote import stale_stages

    logger = get_run_logger()
    graph = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    targets = [stage] if stage else list(graph)
    due = set(targets) if force else set(stale_stages(root, stage) if stale is None else stale) | {
        name for name in targets if (graph[name] or {}).get("always_changed")}
    before = _lock(root)
    command, env = _dvc_command(["repro", *(["--force"] if force else []), *([stage] if stage else [])])
    lines: list[str] = []
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout or []:
            lines.append(line.rstrip())
            logger.info("%s", lines[-1])
    if process.returncode != 0:
        tail = "\n".join(lines[-40:])
        raise PipelineError(f"dvc repro {stage or ''} failed; the champion is untouched:\n{tail}")
    after = _lock(root)
    return [name for name in targets if name in due or after.get(name) != before.get(name)]


@task(cache_policy=NO_CACHE)
def ingest(root: Path) -> list[str]:
    # Ingest is always_changed in dvc.yaml: it looks at the input folders and rewrites nothing
    # when they are unchanged, so afterwards `dvc status` tells whether the data changed.
    return _repro(root, "ingest")


@task(cache_policy=NO_CACHE)
def pipeline_changes(root: Path) -> dict[str, str]:
    """`dvc status` of the graph: changed deps, params, code or missing outputs, per stage, in words."""
    from components.deploy.promote import stale_stages

    return stale_stages(root, None)


@task(cache_policy=NO_CACHE)
def repro(root: Path, force: bool, stale: list[str]) -> list[str]:
    return _repro(root, force=force, stale=stale)


@task(cache_policy=NO_CACHE)
def promote(params: Params) -> PromotionReport:
    from components.deploy.promote import run

    result = run(params)
    get_run_logger().info("%s", result)
    return require_report(params.paths.promotion_report, PromotionReport)


def already_judged(params: Params) -> PromotionReport | None:
    """The last promotion report when it judged the ONNX model that is there now, else None."""
    from components.data.images import sha256_file

    report = read_report(params.paths.promotion_report, PromotionReport)
    if not params.paths.onnx_model.is_file() or report is None:
        return None
    return report if report.challenger.sha256 == sha256_file(params.paths.onnx_model) else None


def retrain_summary(params: Params, ran: list[str], decision: PromotionReport | None, skipped: str | None) -> str:
    """The run's markdown artifact: data and quarantine counts, metrics, gates, transfer gain, the decision."""
    rows: list[tuple[str, str]] = [("run", f"skipped: {skipped}" if skipped else "retrained")]
    rows.append(("stages run", " -> ".join(ran) or "none"))
    quarantine = read_report(params.paths.quarantine, QuarantineReport)
    for task_name, count in (quarantine.counts if quarantine else {}).items():
        rows.append((f"{task_name} images", f"{count.input} in, {count.kept} kept "
                     f"({', '.join(f'{k} {v}' for k, v in count.splits.items())}), {count.quarantined} "
                     f"quarantined, {count.held_back} held back by the label budget"))
    rows += model_rows(params)
    gain = read_report(params.paths.transfer_gain, TransferGainReport)
    rows.append(("transfer gain (accuracy)", number(gain.accuracy_gain) if gain and gain.compared else "not measured"))
    if decision:
        gates = ", ".join(f"{g.name} {number(g.value)} ({'pass' if g.passed else 'FAIL'})" for g in decision.gates)
        rows += [
            ("decision", f"challenger {decision.decision}; production {decision.version or 'none'}"),
            ("reasons", "; ".join(decision.reasons)),
            ("promotion gates", gates or "n/a"),
        ]
    return markdown_table("tlpipe retrain", rows)


def per_class_table(params: Params, decision: PromotionReport | None) -> list[dict[str, Any]]:
    """One row per class: the challenger's metrics through onnxruntime, and the champion's F1 beside them."""
    challenger = decision.challenger.metrics if decision else read_report(params.paths.metrics, MetricsReport)
    champion = decision.champion.metrics.per_class if decision and decision.champion else {}
    return [
        {"class": name, **values.model_dump(), "champion_f1": champion[name].f1 if name in champion else None}
        for name, values in (challenger.per_class if challenger else {}).items()
    ]


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook: the log always; the block named by the `notify_block` parameter when one is."""
    from prefect.blocks.core import Block
    from prefect.logging.loggers import flow_run_logger
    from prefect.utilities.asyncutils import run_coro_as_sync

    logger = flow_run_logger(flow_run, flow)
    message = f"tlpipe retrain run {flow_run.name} failed; the champion is untouched: {state.message}"
    logger.error(message)
    name = (flow_run.parameters or {}).get("notify_block") or ""
    if not name:
        return
    try:
        block = Block.load(name)
        if hasattr(block, "notify"):
            block.notify(body=message, subject="tlpipe retrain failed")
        else:  # prefect.blocks.webhook.Webhook: a plain HTTP call
            run_coro_as_sync(block.call({"text": message, "flow_run": str(flow_run.id), "state": state.name}))
    except Exception as error:  # a broken notifier must not hide the run's own failure
        logger.error("could not notify through block %r: %s", name, error)


@flow(name="tlpipe-retrain", on_failure=[notify_failure])
def retrain(params_path: str = "params.yaml", force: bool = False, notify_block: str = "") -> dict[str, Any]:
    """Pull; skip with the reason when nothing changed (unless `force`); dvc repro; promote or keep; push.

    params_path: params.yaml of the repository to retrain (its folder is the repository).
    force: retrain every stage (dvc repro --force) and judge the result even when nothing changed.
    notify_block: a Prefect block told about a failed run, as TYPE/NAME (e.g. webhook/ops); empty: none.
    """
    logger = get_run_logger()
    path = Path(params_path).resolve()
    params = load_params(path)
    root = path.parent
    dvc_pull(root)
    ran = ingest(root)
    changes = pipeline_changes(root)
    judged = already_judged(params)
    skipped = None
    if changes or force or judged is None:
        why = "forced" if force else (f"stages out of date: {', '.join(changes)}" if changes
                                      else "the exported model was not judged against the champion yet")
        logger.info("retraining (%s)", why)
        logger.debug("dvc status: %s", changes)
        ran += [stage for stage in repro(root, force, list(changes)) if stage not in ran]
        decision = promote(params)
    else:
        skipped = (f"nothing changed: data, params and code match dvc.lock, and the challenger was already "
                   f"judged ({judged.decision}, production {judged.version or 'none'})")
        logger.info("skipping: %s (force=True retrains anyway)", skipped)
        decision = judged
    dvc_push(root)
    create_markdown_artifact(retrain_summary(params, ran, decision, skipped), key=SUMMARY_KEY,
                             description="data, metrics, gates and the promotion decision of this run")
    table = per_class_table(params, decision)
    if table:
        create_table_artifact(table, key=PER_CLASS_KEY, description="per-class metrics of the challenger on the test split")
    return {"skipped": skipped, "ran": ran, "decision": decision.decision, "version": decision.version}


if __name__ == "__main__":
    retrain()
