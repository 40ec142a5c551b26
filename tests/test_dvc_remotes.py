"""DVC remotes as a user runs them: push the pipeline's outputs, pull them into a fresh clone, nothing reruns.

A fresh `git clone` has no DVC cache and no outputs, so "pull into a clone" is the wiped-cache,
wiped-workspace case, and also what another machine or a scheduled worker sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_class_folders, write_shrunk_params_yaml

BIN = Path(sys.executable).parent
# The cheapest real stages with both kinds of output: cached (images, manifest, data docs; these
# travel through the remote) and `cache: false` reports (committed to git, as DVC expects).
STAGES = ("ingest", "validate")
OUTPUTS = ("data", "reports")
KEY, SECRET = "tlpipe-test-key", "tlpipe-test-secret"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        # Credentials only as each test gives them; never an instance-metadata lookup off this machine.
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


def _run(command: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], repo)


def _outputs(repo: Path) -> dict[str, bytes]:
    """Every file the stages wrote (cached or committed), by path: what a user needs back."""
    return {
        path.relative_to(repo).as_posix(): path.read_bytes()
        for name in OUTPUTS
        for path in sorted((repo / name).rglob("*"))
        # ingest's machine-local fingerprint sits beside data/raw, deliberately outside what DVC versions
        if path.is_file() and path.name != ".gitignore" and not path.name.startswith(".ingest-state-")
    }


def _cache_objects(repo: Path) -> set[str]:
    """The DVC cache's objects as '<2 hex>/<rest>', the layout a remote stores them in too."""
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    return {path.relative_to(cache).as_posix() for path in cache.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository where the project's first stages ran, with their lock and reports committed."""
    root = tmp_path_factory.mktemp("producer")
    for name in ("components", "flows"):  # dvc.yaml's deps
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    # `dvc push` and `pull` act on every stage of dvc.yaml: keep the project's own first stages only.
    graph = yaml.safe_load((REPO / "dvc.yaml").read_text())
    graph = {"vars": graph["vars"], "stages": {name: graph["stages"][name] for name in STAGES}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    # The user's own image folders, on storage every machine mounts at the same path (ingest
    # fingerprints the folder's path); small, so the remotes move a few dozen files.
    images = tmp_path_factory.mktemp("shared-images")
    write_class_folders(images / "source", ["cat", "dog"], per_class=12)
    write_class_folders(images / "target", ["healthy", "sick"], per_class=12, seed=1)
    write_shrunk_params_yaml(root / "params.yaml", {"data.source_dir": str(images / "source"),
                                                    "data.target_dir": str(images / "target")})
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "repro"], root)
    _commit(root, "pipeline run")
    return root


def _publish(produced: Path, tmp_path: Path, remote: list[list[str]]) -> Path:
    """A copy of the produced repository with `remote` configured (dvc commands), committed, and pushed."""
    producer = tmp_path / "producer"
    shutil.copytree(produced, producer, symlinks=True)
    for command in remote:
        _run(["dvc", *command], producer)
    _commit(producer, "remote")
    pushed = _run(["dvc", "push"], producer)
    count = re.search(r"(\d+) files? pushed", pushed.stdout + pushed.stderr)
    assert count and int(count.group(1)) == len(_cache_objects(producer)), pushed.stdout + pushed.stderr
    return producer


def _pull_into_clone(producer: Path, tmp_path: Path, **env: str) -> Path:
    consumer = tmp_path / "consumer"
    _run(["git", "clone", "-q", str(producer), str(consumer)], tmp_path)
    assert not (consumer / "data").exists() and not (consumer / ".dvc" / "cache").exists()
    _run(["dvc", "pull"], consumer, **env)
    assert _outputs(consumer) == _outputs(producer), "pulled outputs differ from the pushed ones"
    return consumer


def _assert_up_to_date(repo: Path, **env: str) -> None:
    # ingest is `always_changed` (it checks the input folders on every run); every other stage is clean.
    status = json.loads(_run(["dvc", "status", "--json"], repo, **env).stdout)
    assert status == {"ingest": ["always changed"]}, status


def test_local_directory_remote_round_trip_reruns_nothing(produced: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    producer = _publish(produced, tmp_path, [["remote", "add", "-d", "shared", str(storage)]])
    assert {p.relative_to(storage / "files" / "md5").as_posix() for p in storage.rglob("*") if p.is_file()} \
        == _cache_objects(producer)

    consumer = _pull_into_clone(producer, tmp_path)
    before = _outputs(consumer)
    rerun = _run(["dvc", "repro"], consumer)
    output = rerun.stdout + rerun.stderr
    assert set(re.findall(r"Running stage '([\w-]+)'", output)) == {"ingest"}, output
    assert "nothing rewritten" in output, "ingest must find its pulled outputs current"
    assert _outputs(consumer) == before


def test_s3_compatible_remote_round_trip(produced: Path, tmp_path: Path, s3_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                      region_name="us-east-1")
    s3.create_bucket(Bucket="tlpipe-models")
    # As a user with S3 or MinIO: the URL and endpoint in git, the credentials in .dvc/config.local.
    producer = _publish(produced, tmp_path, [
        ["remote", "add", "-d", "s3remote", "s3://tlpipe-models/pipeline"],
        ["remote", "modify", "s3remote", "endpointurl", s3_server],
        ["remote", "modify", "--local", "s3remote", "access_key_id", KEY],
        ["remote", "modify", "--local", "s3remote", "secret_access_key", SECRET],
    ])
    committed = _run(["git", "show", "HEAD:.dvc/config"], producer).stdout
    assert "s3://tlpipe-models/pipeline" in committed and SECRET not in committed, committed

    listed = s3.get_paginator("list_objects_v2").paginate(Bucket="tlpipe-models", Prefix="pipeline/files/md5/")
    keys = {item["Key"].removeprefix("pipeline/files/md5/") for page in listed for item in page.get("Contents", [])}
    assert keys == _cache_objects(producer)

    # The other machine gives its credentials the other usual way, as AWS_* environment variables.
    aws = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    consumer = _pull_into_clone(producer, tmp_path, **aws)
    assert not (consumer / ".dvc" / "config.local").exists(), "credentials must not travel through git"
    _assert_up_to_date(consumer, **aws)


def test_push_to_a_missing_bucket_fails_loudly(produced: Path, tmp_path: Path, s3_server: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(produced, repo, symlinks=True)
    for command in (["remote", "add", "-d", "typo", "s3://no-such-bucket/pipeline"],
                    ["remote", "modify", "typo", "endpointurl", s3_server]):
        _run(["dvc", *command], repo)
    pushed = _run(["dvc", "push"], repo, check=False, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    assert pushed.returncode != 0, "a push that stored nothing must not exit 0 (a retraining job would go on)"
    assert "bucket does not exist" in pushed.stderr, pushed.stderr[-2000:]
