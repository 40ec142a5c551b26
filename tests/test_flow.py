"""The Prefect flow, run for real on Prefect's temporary local server: stages in order, a failure stops it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from components.core.errors import PipelineError
from tests.conftest import REPO, shrunk_params

# Slow: a fresh Prefect server takes 30-70 s to start on 2 cores, the stages ~30 s more.
pytestmark = pytest.mark.slow

SUBSET = ["ingest", "validate", "clean"]


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Prefect's temporary local server (a real uvicorn subprocess), its database and home in temp folders.

    The harness, unlike a server Prefect starts on first use, drains logs and events and stops the
    server when the module ends; otherwise pytest's exit waits on log uploads to a stopped server.
    A fresh database needs ~30 s on 2 cores, over Prefect's 20 s default startup timeout.
    """
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: tmp_path_factory.mktemp("prefect")}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the flow reads the graph from ./dvc.yaml, as `tlpipe run` does


def write_params(root: Path, extra: dict[str, object] | None = None) -> Path:
    """A params.yaml for the flow: the real one, shrunk, every path under `root`."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(shrunk_params(root, extra).model_dump(by_alias=True, mode="json")))
    return path


def recorded_task_runs(flow_run_id: UUID, expected: int) -> dict[str, list[str]]:
    """The flow run's task runs as the Prefect server recorded them: name -> the names it waited for."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + 30  # task runs reach the server as events, a moment after the flow ends
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC
            )
            if len(runs) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    names = {run.id: run.name for run in runs}
    return {run.name: [names.get(upstream.id, "?") for upstream in run.task_inputs.get("wait_for", [])] for run in runs}


def test_the_flow_runs_the_chosen_stages_in_order_and_writes_their_outputs(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.pipeline import ARTIFACT_KEY, pipeline

    state = pipeline(params_path=str(write_params(tmp_path)), stages=list(reversed(SUBSET)), return_state=True)

    assert state.is_completed(), state.message
    assert list(state.result()) == SUBSET
    paths = shrunk_params(tmp_path).paths
    assert sorted(child.name for child in paths.raw.iterdir() if child.is_dir()) == ["source", "target"]
    assert paths.manifest.is_file() and paths.validation.is_file() and paths.quarantine.is_file()
    assert any(paths.clean.iterdir())
    assert not paths.source_model.exists(), "a stage outside the subset ran"
    recorded = recorded_task_runs(state.state_details.flow_run_id, len(SUBSET))
    assert recorded == {"ingest": [], "validate": ["ingest"], "clean": ["validate"]}, "the UI's graph: one task per stage, in order"
    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts()
    summary = next(artifact for artifact in artifacts if artifact.key == ARTIFACT_KEY).data
    assert "ingest -> validate -> clean" in summary
    assert "| accuracy | n/a |" in summary, "a report the subset did not write reads n/a and fails nothing"


def test_a_failing_stage_fails_the_flow_with_its_message_and_stops_it(tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    missing = tmp_path / "no-such-images"
    params_path = write_params(tmp_path, {"data.source_dir": str(missing)})

    state = pipeline(params_path=str(params_path), stages=SUBSET, return_state=True)

    assert state.is_failed()
    with pytest.raises(PipelineError, match=rf"stage 'ingest' failed: .*{re.escape(str(missing))}"):
        state.result()
    assert list(recorded_task_runs(state.state_details.flow_run_id, 1)) == ["ingest"], "a stage after the failure ran"
    paths = shrunk_params(tmp_path).paths
    assert not paths.raw.exists() and not paths.manifest.exists() and not paths.clean.exists()


def test_tlpipe_run_the_images_default_command_runs_the_flow(tmp_path: Path) -> None:
    """`tlpipe run` (the Docker image's CMD) as a command, against this module's Prefect server."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    tlpipe = Path(sys.executable).parent / "tlpipe"
    params_path = write_params(tmp_path)
    done = subprocess.run([str(tlpipe), "run", "--params", str(params_path), "--stages", *SUBSET], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    paths = shrunk_params(tmp_path).paths
    assert paths.manifest.is_file() and paths.quarantine.is_file() and any(paths.clean.iterdir())
    assert not paths.source_model.exists(), "a stage outside the subset ran"

    failed = subprocess.run([str(tlpipe), "run", "--params", str(tmp_path / "missing.yaml")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "missing.yaml" in failed.stderr
