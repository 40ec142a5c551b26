"""The Dockerfile without a Docker engine: hadolint, and the same install steps as `make setup`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
# The commands that make the environment: create the venv, install uv, install from a lock.
INSTALL = re.compile(r"^(\S*python3?(\.\d+)? -m venv |\S*python -m pip install |\S*uv pip install )")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def _docker_install_commands() -> list[str]:
    commands = [part.strip() for name, args in _instructions() if name == "RUN" for part in args.split("&&")]
    return [" ".join(command.split()) for command in commands if INSTALL.match(command)]


def _make_install_commands(tmp_path: Path) -> list[str]:
    """What `make setup` runs on a fresh checkout, as make itself expands it (`-n`: print, run nothing)."""
    for name in ("Makefile", "requirements.lock", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHON", "MAKEFLAGS"}}
    result = subprocess.run(["make", "-n", "setup"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [" ".join(line.split()) for line in result.stdout.splitlines() if INSTALL.match(line.strip())]


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"hadolint Dockerfile:\n{result.stdout}{result.stderr}"


def test_image_installs_the_lock_exactly_as_make_setup_does(tmp_path: Path) -> None:
    make = _make_install_commands(tmp_path)
    assert any("-r requirements.lock" in command for command in make), make  # the parse found the steps
    assert _docker_install_commands() == make


def test_image_runs_tlpipe_as_a_non_root_user() -> None:
    instructions = _instructions()
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    entrypoint = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["tlpipe"], entrypoint


def test_credentials_and_local_state_stay_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".dvc/config.local", ".venv", ".dvc/cache", "data", "models"} <= ignored


def test_the_kubernetes_workers_run_the_gpu_image_through_its_one_entry_point() -> None:
    import yaml

    manifest = REPO / "deploy" / "k8s" / "finetune-multiworker.yaml"
    (job,) = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc and doc["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(":gpu")  # docker build --build-arg VARIANT=gpu
    # No `command`: the image's ENTRYPOINT, one for both variants, so the CPU image's `tlpipe stage
    # finetune` (the tests') is what every worker runs; the cluster comes from the environment.
    assert "command" not in container and container["args"][:2] == ["stage", "finetune"]
    instructions = _instructions()
    assert [args for name, args in instructions if name == "ENTRYPOINT"] == ['["tlpipe"]']
    gpu = [args for name, args in instructions if name == "RUN" and 'VARIANT" = gpu' in args]
    assert gpu and "jax[cuda12]" in gpu[0]  # the multi-worker backend, with CUDA
    ports = {int(port) for name, args in instructions if name == "EXPOSE" for port in args.split()}
    assert container["ports"][0]["containerPort"] in ports
