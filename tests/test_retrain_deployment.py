"""Scheduled retraining for real: a Prefect server and a process worker on 127.0.0.1, the repository's
prefect.yaml deployed from a temporary git + DVC copy, runs triggered and awaited.

The first run is also the suite's end-to-end run: its `dvc repro` is the one full pipeline run of
the default suite, so the end-to-end checks (every stage, metrics, parity, reconciled counts, the
DVC cache) are made on what it wrote.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import END_TO_END, REPO, free_port, raw_files, write_shrunk_params_yaml

BIN = Path(sys.executable).parent
POOL = "tlpipe-process"  # prefect.yaml's work pool
DEPLOYMENT = "tlpipe-retrain/retrain"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick runs up quickly (default 10 s)
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "GX_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started; prove none is left."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository holding the project's code, dvc.yaml, prefect.yaml and a shrunk params.yaml."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("components", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    write_shrunk_params_yaml(root / "params.yaml", END_TO_END)
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    # The project's DVC settings, as a clone has them (the offline plots page among them).
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Iterator[dict[str, Any]]:
    """`prefect server start` (SQLite in a temp PREFECT_HOME), the process work pool, a worker, and
    the repository's prefect.yaml deployed; everything is stopped at the end, leaving no process."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    logs = home / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []

    def start(command: list[str], name: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        process = subprocess.Popen(command, cwd=repo, env=_env(home, api), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        started.append(process)
        return process

    try:
        server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server")
        deadline = time.monotonic() + 300  # a fresh database takes a minute on 2 busy cores
        while True:
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Prefect server did not answer /api/health"
            time.sleep(1)
        cli = [str(BIN / "prefect")]
        _run([*cli, "work-pool", "create", POOL, "--type", "process"], repo, _env(home, api))
        deployed = _run([*cli, "deploy", "--name", "retrain"], repo, _env(home, api))
        start([*cli, "worker", "start", "--pool", POOL], "worker")
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_HOME: home}):
            yield {"api": api, "home": home, "logs": logs, "deploy_output": deployed.stdout}
    finally:
        for process in reversed(started):
            _stop(process)


def trigger(parameters: dict[str, Any] | None = None) -> Any:
    """Start a run of the deployment now, as `prefect deployment run` does; its id."""
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, parameters=parameters or {}, timeout=0, as_subflow=False).id


def wait(flow_run_id: Any, timeout: float = 1500) -> Any:
    """The flow run once it has ended."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.type.value in TERMINAL:
                return run
            assert time.monotonic() < deadline, f"flow run still {run.state and run.state.name} after {timeout} s"
            time.sleep(2)


def run_logs(flow_run_id: Any, expect: str, wait: float = 30) -> str:
    """The run's log messages as the server holds them (they arrive in batches, a moment after the run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if expect in text or time.monotonic() > deadline:
                return text
            time.sleep(1)


def artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


@pytest.fixture(scope="module")
def runs(repo: Path, prefect: dict[str, Any]) -> list[Any]:
    """Two runs triggered together, as two schedules firing at once; in the order they ran.

    The first is the suite's end-to-end run; the second, held back by the concurrency limit until
    the first ends, finds nothing changed.
    """
    ids = [trigger(), trigger()]
    ended = [wait(flow_run_id) for flow_run_id in ids]
    for run in ended:
        assert run.state.type.value == "COMPLETED", run_logs(run.id, "failed")[-5000:]
    return sorted(ended, key=lambda run: run.start_time)


@pytest.mark.timeout(1800)
def test_the_deployment_is_scheduled_and_runs_one_at_a_time(prefect: dict[str, Any], runs: list[Any]) -> None:
    from prefect.client.orchestration import get_client

    assert "retrain" in prefect["deploy_output"]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.schedules[0].schedule.timezone == "Europe/Berlin"
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    first, second = runs
    assert second.start_time >= first.end_time, "two runs of the deployment overlapped"


@pytest.mark.timeout(1800)
def test_the_first_run_trains_the_whole_pipeline_and_promotes_a_first_champion(repo: Path, runs: list[Any]) -> None:
    from flows.retrain import PER_CLASS_KEY, SUMMARY_KEY

    # The end-to-end checks, on what this run's `dvc repro` wrote.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "validate", "clean", "scratch", "source", "transfer", "finetune", "evaluate",
                                  "report", "export"}
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["accuracy"] >= END_TO_END["evaluate.min_accuracy"], "the pipeline did not learn the digits"
    assert metrics["macro_f1"] >= END_TO_END["evaluate.min_macro_f1"]
    assert set(metrics["per_class"]) == {"5", "6", "7", "8", "9"}
    gates = json.loads((repo / "reports/gates.json").read_text())
    assert gates["passed"] is True
    assert {g["name"]: g["threshold"] for g in gates["gates"]} == {
        "min_accuracy": END_TO_END["evaluate.min_accuracy"], "min_macro_f1": END_TO_END["evaluate.min_macro_f1"]
    }
    assert json.loads((repo / "reports/export.json").read_text())["max_abs_diff"] <= 1e-4
    assert (repo / "reports/report.html").is_file() and (repo / "models/bundle/report.html").is_file()
    assert json.loads((repo / "reports/quarantine.json").read_text())["reconciled"] is True

    # The first champion, promoted on absolute gates only, with its lineage and version tag.
    decision = json.loads((repo / "reports/promotion.json").read_text())
    assert decision["decision"] == "promoted" and decision["first_champion"] is True
    assert "no champion yet: absolute gates only" in decision["reasons"]
    assert os.readlink(repo / "models/production") == "releases/v1"
    assert (repo / "models/production/model.onnx").read_bytes() == (repo / "models/model.onnx").read_bytes()
    lineage = json.loads((repo / "models/production/lineage.json").read_text())
    clean_md5 = next(out["md5"] for out in lock["stages"]["clean"]["outs"] if out["path"] == "data/clean")
    assert lineage["dvc"]["data"]["data/clean"] == clean_md5
    head = _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert lineage["code"]["commit"] == head
    assert _run(["git", "rev-parse", "model-v1^{commit}"], repo).stdout.strip() == head
    assert "## Lineage: release v1" in (repo / "models/production/MODEL_CARD.md").read_text()

    name, data = next((name, data) for name, data in raw_files(repo / "data/raw/target").items() if name.startswith("7/"))
    image = repo.parent / Path(name).name
    image.write_bytes(data)
    predicted = _run([str(BIN / "tlpipe"), "predict", "models/production/model.onnx", str(image)], repo).stdout
    assert predicted.split("\t")[1].split(":")[0] in {"5", "6", "7", "8", "9"}

    found = artifacts(runs[0].id)
    summary = found[SUMMARY_KEY].data
    assert "| run | retrained |" in summary and "challenger promoted; production v1" in summary
    # The stages run, as DVC records them (status before, dvc.lock after): the whole graph, in its order.
    assert f"| stages run | {' -> '.join(lock['stages'])} |" in summary
    assert "| target images |" in summary and "quarantined" in summary
    assert "| accuracy |" in summary and "| transfer gain (accuracy) | not measured |" in summary
    table = json.loads(found[PER_CLASS_KEY].data)
    assert [row["class"] for row in table] == ["5", "6", "7", "8", "9"]
    assert {"precision", "recall", "f1", "support"} <= set(table[0])


@pytest.mark.timeout(1800)
def test_the_second_run_finds_nothing_changed_and_skips_saying_why(repo: Path, runs: list[Any]) -> None:
    from flows.retrain import SUMMARY_KEY

    second = runs[1]
    assert "skipping: nothing changed" in run_logs(second.id, "skipping: nothing changed")
    assert "skipped: nothing changed" in artifacts(second.id)[SUMMARY_KEY].data
    assert os.readlink(repo / "models/production") == "releases/v1"
    assert sorted(p.name for p in (repo / "models/releases").iterdir()) == ["v1"]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        _Hook.received.append(self.rfile.read(int(self.headers.get("content-length", 0))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.timeout(1800)  # the runs fixture first, when run alone
def test_a_failed_run_notifies_the_webhook_block_and_leaves_the_champion(
    repo: Path, prefect: dict[str, Any], runs: list[Any]
) -> None:
    from prefect.blocks.webhook import Webhook

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        Webhook(url=f"http://127.0.0.1:{server.server_address[1]}/hook").save("tlpipe-alerts", overwrite=True)
        champion = (repo / "models/production/model.onnx").read_bytes()

        run = wait(trigger({"params_path": "no-such-params.yaml", "notify_block": "webhook/tlpipe-alerts"}))

        assert run.state.type.value == "FAILED"
        deadline = time.monotonic() + 30
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        server.shutdown()
        server.server_close()
    assert len(_Hook.received) == 1
    message = json.loads(_Hook.received[0])["text"]
    assert "failed; the champion is untouched" in message and "no-such-params.yaml not found" in message
    assert (repo / "models/production/model.onnx").read_bytes() == champion


def set_params(repo: Path, changes: dict[str, object]) -> None:
    from components.core.config import set_dotted

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(set_dotted(raw, changes), sort_keys=False))


@pytest.mark.timeout(1800)  # the runs fixture first, when run alone
def test_dvc_repro_after_the_run_reruns_nothing_and_a_gate_change_reruns_only_evaluation(repo: Path, runs: list[Any]) -> None:
    again = _run(["dvc", "repro"], repo)
    assert _ran(again.stdout) <= {"ingest"}, "ingest only checks its inputs; nothing else may rerun"
    assert "nothing rewritten" in again.stderr + again.stdout

    set_params(repo, {"evaluate.min_accuracy": END_TO_END["evaluate.min_accuracy"] - 0.01})
    changed = _run(["dvc", "repro"], repo).stdout
    assert _ran(changed) - {"ingest"} <= {"evaluate", "report", "export"}
    assert "evaluate" in _ran(changed)


@pytest.mark.timeout(1800)  # the runs fixture first, when run alone
def test_the_reports_read_back_through_dvc_and_tlpipe_summary(repo: Path, runs: list[Any]) -> None:
    """`dvc metrics show`, `dvc plots show` and `tlpipe summary` as a user runs them, on the run's real outputs."""
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo).stdout)
    by_file = next(iter(shown.values()))["data"]
    # The headline only (details stay in reports/metrics.json, not a DVC metric, so the table fits a terminal).
    assert set(by_file) == {"reports/scores.json", "reports/parity.json"}
    assert by_file["reports/scores.json"]["data"] == {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                                      "gates_passed": True}

    shown = _run(["dvc", "plots", "show", "-o", "plots_html"], repo).stdout
    assert "plots_html/index.html" in shown
    page = (repo / "plots_html/index.html").read_text()
    assert "cdn.jsdelivr.net" not in page, "the page renders offline"
    assert "target test split (rows actual, columns predicted)" in page and "confusion.png" in page
    assert "finetune accuracy (train and validation)" in page, "the training curves are plotted"

    text = _run([str(BIN / "tlpipe"), "summary"], repo).stdout
    assert f"target test accuracy {metrics['accuracy']:.4g}, macro F1 {metrics['macro_f1']:.4g}" in text
    assert "gates: PASSED" in text
    transfer = json.loads((repo / "reports/transfer.json").read_text())
    assert f"transfer: {len(transfer['transferred'])} transferred, 0 skipped, 1 reinitialized layers" in text
    counts = json.loads((repo / "reports/quarantine.json").read_text())["counts"]
    assert f"target: input {counts['target']['input']}, kept {counts['target']['kept']}" in text
    lines = [line.strip() for line in text.splitlines()]
    at = next(number for number, line in enumerate(lines) if line.startswith("tlpipe predict"))
    # The embedded digits exist only in data/raw's packs: the line before takes one out, with tar.
    assert lines[at - 1].startswith("tar -xf data/raw/target/pack-00000.tar -C /tmp 5/digit_"), lines[at - 1]
    answer = _run(["bash", "-c", f"{lines[at - 1]} && {lines[at]}"], repo).stdout
    assert answer.split("\t")[1].split(":")[0] in {"5", "6", "7", "8", "9"}, "the suggested command works as printed"


@pytest.mark.timeout(1800)  # the runs fixture first, when run alone
def test_after_a_failed_dvc_repro_promote_refuses_the_stale_challenger(repo: Path, runs: list[Any]) -> None:
    """A gate nothing passes: `dvc repro` fails at evaluate, models/model.onnx is the previous run's, and
    `tlpipe promote` says so (exit 1) instead of judging it, leaving production and its report alone."""
    before = (repo / "params.yaml").read_text()
    champion = os.readlink(repo / "models/production")
    report = (repo / "reports/promotion.json").read_bytes()
    set_params(repo, {"evaluate.min_accuracy": 0.999})
    try:
        failed = subprocess.run(["dvc", "repro"], cwd=repo, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                                capture_output=True, text=True, timeout=900)
        assert failed.returncode != 0 and "gates failed" in failed.stdout + failed.stderr

        promoted = subprocess.run([str(BIN / "tlpipe"), "promote"], cwd=repo, capture_output=True, text=True, timeout=300)
    finally:
        (repo / "params.yaml").write_text(before)
    assert promoted.returncode == 1, promoted.stdout
    assert "is not what the current graph produces" in promoted.stderr
    # The gate's new value reaches DVC through the effective params evaluate reads its section from.
    assert "stage evaluate out of date (changed deps: reports/effective_params.yaml (evaluate)" in promoted.stderr
    assert "stage export out of date (changed deps: " in promoted.stderr
    assert "run dvc repro" in promoted.stderr
    assert os.readlink(repo / "models/production") == champion
    assert (repo / "reports/promotion.json").read_bytes() == report


@pytest.mark.slow  # reruns evaluation and export
@pytest.mark.timeout(1800)
def test_dvc_exp_run_runs_an_experiment_with_a_changed_param(repo: Path, runs: list[Any]) -> None:
    before = (repo / "params.yaml").read_text()
    done = _run(["dvc", "exp", "run", "-S", f"evaluate.min_macro_f1={END_TO_END['evaluate.min_macro_f1'] - 0.02}"], repo)
    assert "evaluate" in _ran(done.stdout)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert "min_macro_f1" in json.dumps(shown)
    assert (repo / "params.yaml").read_text() != before, "dvc exp run applies the param to the workspace"
    assert json.loads((repo / "reports/gates.json").read_text())["passed"] is True
