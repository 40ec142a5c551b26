"""Multi-worker training: the cluster settings checked (fast), and real worker processes on 127.0.0.1 (slow).

Two JAX processes train together through jax.distributed and keras.distribution.DataParallel, each
reading its own share of every batch; process 0 alone writes.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from components import evaluate
from components.core.errors import PipelineError
from components.data.dataset import load_split
from components.data.stream import TrainFeed
from components.training import distributed
from tests.conftest import REPO, shrunk_params, stop_process, write_shrunk_params_yaml
from tests.test_resume import NO_AUGMENT, finetune_workspace, kill_after_epoch, run_stage, start_stage, \
    write_texture_task

KERAS = distributed.ADDRESSES, distributed.COUNT, distributed.PROCESS


def _keras_env(address: str, count: object, index: object, timeout: float | None = None) -> dict[str, str]:
    env = dict(zip(KERAS, (address, str(count), str(index))))
    if timeout is not None:
        env[distributed.TIMEOUT] = str(timeout)
    return env


def _tf_config(workers: list[str], index: int = 0) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}


@pytest.mark.parametrize(("env", "named"), [
    ({"TF_CONFIG": "{cluster: worker-0:7777"}, "TF_CONFIG"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}})}, "TF_CONFIG"),
    (_tf_config(["10.0.0.1:7777", "10.0.0.1:7777"]), "TF_CONFIG names 10.0.0.1:7777 twice"),
    (_tf_config(["10.0.0.1:7777", "10.0.0.2:7777"], index=2), "TF_CONFIG: task worker 2"),
    (_tf_config(["10.0.0.1", "10.0.0.2:7777"]), "TF_CONFIG: '10.0.0.1' is not host:port"),
    (_keras_env("10.0.0.1:7777,10.0.0.1:7777", 2, 0), "KERAS_DISTRIBUTION_JOB_ADDRESSES names 10.0.0.1:7777 twice"),
    (_keras_env("10.0.0.1:7777,10.0.0.2:7777", 3, 0), "lists 2 addresses but KERAS_DISTRIBUTION_NUM_PROCESSES=3"),
    (_keras_env("10.0.0.1:7777", 2, 2), "KERAS_DISTRIBUTION_PROCESS_ID=2 is outside 0..1"),
    (_keras_env("10.0.0.1:7777", "two", 0), "KERAS_DISTRIBUTION_NUM_PROCESSES='two' is not a whole number"),
    (_keras_env("10.0.0.1:port", 2, 0), "KERAS_DISTRIBUTION_JOB_ADDRESSES: '10.0.0.1:port' is not host:port"),
    ({distributed.ADDRESSES: "10.0.0.1:7777", distributed.COUNT: "2"}, "KERAS_DISTRIBUTION_PROCESS_ID not set"),
    (_keras_env("10.0.0.1:7777", 2, 0, timeout=0), "TLPIPE_CLUSTER_TIMEOUT='0' must be a number of seconds"),
])
def test_a_bad_cluster_setting_is_one_error_naming_it(env: dict[str, str], named: str) -> None:
    with pytest.raises(PipelineError, match=re.escape(named)):
        distributed.read_cluster(env)


def test_no_cluster_settings_is_one_process_that_is_the_chief() -> None:
    cluster = distributed.join({})
    assert cluster.count == 1 and cluster.is_chief


def test_a_multi_worker_tf_config_on_tensorflow_is_refused_before_any_work() -> None:
    # Keras 3's fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585): say so and what to use.
    with pytest.raises(PipelineError, match="TF_CONFIG names 2 workers.*20585.*KERAS_BACKEND=jax"):
        distributed.join(_tf_config(["127.0.0.1:7777", "127.0.0.1:7778"]))


def _closed_port() -> tuple[socket.socket, int]:
    """A port bound here but not listening: every connection to it is refused, and nobody else can take it."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()[1]


@pytest.mark.timeout(60)
def test_an_unreachable_coordinator_is_an_error_within_the_timeout() -> None:
    holder, port = _closed_port()
    try:
        cluster = distributed.read_cluster(_keras_env(f"127.0.0.1:{port}", 2, 1, timeout=2))
        with pytest.raises(PipelineError, match=f"no coordinator answered at 127.0.0.1:{port} within 2 s"):
            distributed.rendezvous(cluster)
    finally:
        holder.close()
    unresolvable = distributed.read_cluster(_keras_env("no-such-host.invalid:7777", 2, 1, timeout=30))
    with pytest.raises(PipelineError, match="cannot resolve no-such-host.invalid"):
        distributed.rendezvous(unresolvable)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(60)
def test_a_worker_that_never_comes_stops_the_coordinator_within_the_timeout() -> None:
    cluster = distributed.read_cluster(_keras_env(f"127.0.0.1:{_free_port()}", 2, 0, timeout=2))
    with pytest.raises(PipelineError, match=r"process\(es\) \[1\] of 2 never reached the coordinator"):
        distributed.rendezvous(cluster)


@pytest.mark.timeout(60)
def test_two_workers_claiming_one_process_id_are_refused() -> None:
    address = f"127.0.0.1:{_free_port()}"
    errors: dict[str, Exception] = {}

    def run(name: str, index: int) -> None:
        try:
            distributed.rendezvous(distributed.read_cluster(_keras_env(address, 3, index, timeout=5)))
        except PipelineError as error:
            errors[name] = error

    threads = [threading.Thread(target=run, args=(name, index))
               for name, index in (("chief", 0), ("first", 1), ("second", 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    assert "two processes have KERAS_DISTRIBUTION_PROCESS_ID=1" in str(errors["chief"])
    assert set(errors) == {"chief", "first", "second"}  # nobody went on to train


def test_the_workers_shares_of_each_batch_make_the_one_process_batch(params) -> None:
    write_texture_task(params.paths.clean, {"train": 10, "val": 2, "test": 2}, params.data.image_size)
    train = load_split(params.paths.clean, "target", "train")
    whole = TrainFeed(train, 8, seed=3, multiple=2)
    shares = [TrainFeed(train, 8, seed=3, multiple=2, shard=(index, 2)) for index in range(2)]
    for feed in (whole, *shares):
        feed.epoch = 1
    assert len(whole) == len(shares[0]) == len(shares[1])
    for step in range(len(whole)):
        x, y = whole[step][:2]
        parts = [share[step] for share in shares]
        assert all(len(part[0]) == 4 for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[0] for part in parts]), x)
        np.testing.assert_array_equal(np.concatenate([part[1] for part in parts]), y)


# Slow: real worker processes ---------------------------------------------------------------------

RECIPE = {"finetune.head_epochs": 2, "finetune.epochs": 6, "finetune.learning_rate": 0.003,
          "finetune.batch_size": 8, "finetune.patience": 8, **NO_AUGMENT}
STAGE_TIMEOUT = 600  # two stages share 2 busy cores: 4-6 minutes each alone (tests/test_finetune_backends.py)
DIGEST = re.compile(r"(\w+) epoch (\d+) weights sha256 (\w+) \(process (\d)\)")


def _worker_root(chief: Path, root: Path, extra: dict[str, object]) -> Path:
    """A second machine's checkout: the same inputs (copied), the chief's checkpoint folder shared."""
    params = shrunk_params(chief, extra)
    for folder in ("data/clean", "models/transferred"):
        shutil.copytree(chief / folder, root / folder)
    return write_shrunk_params_yaml(root / "params.yaml",
                                    {**extra, "paths.finetune_checkpoint": str(params.paths.finetune_checkpoint)})


def _start_workers(yamls: list[Path], port: int) -> list:
    return [start_stage("finetune", path, {"KERAS_BACKEND": "jax", distributed.TIMEOUT: "120",
                                           **_keras_env(f"127.0.0.1:{port}", len(yamls), index)})
            for index, path in enumerate(yamls)]


def _finish(processes: list, timeout: float) -> list[str]:
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                stop_process(process, grace=5)
    return outputs


@pytest.mark.slow
@pytest.mark.timeout(3 * STAGE_TIMEOUT)
def test_two_jax_workers_train_as_one_and_only_the_chief_writes(tmp_path: Path) -> None:
    params, chief_yaml = finetune_workspace(tmp_path / "chief", RECIPE)
    worker_yaml = _worker_root(tmp_path / "chief", tmp_path / "worker", RECIPE)
    outputs = _finish(_start_workers([chief_yaml, worker_yaml], _free_port()), STAGE_TIMEOUT)
    assert all("joined a cluster of 2 processes" in output for output in outputs), outputs

    digests = [{m[:3] for m in DIGEST.findall(output)} for output in outputs]
    assert digests[0] and digests[0] == digests[1], "the workers' weights differ after an epoch"
    report = json.loads(params.paths.finetune_report.read_text())
    assert report["workers"] == 2 and report["backend"] == "jax"

    written = shrunk_params(tmp_path / "worker", RECIPE).paths
    assert not written.finetuned_model.exists() and not written.finetune_report.exists()
    assert not (written.training_curves / "finetune").exists()
    assert params.paths.finetuned_model.is_dir() and (params.paths.training_curves / "finetune").is_dir()

    # The same recipe and global batch on one process: test accuracy within one test image.
    single, single_yaml = finetune_workspace(tmp_path / "single", RECIPE)
    run_stage("finetune", single_yaml, {"KERAS_BACKEND": "jax"}, STAGE_TIMEOUT)
    together, alone = evaluate.run(params), evaluate.run(single)
    test_images = len(load_split(params.paths.clean, "target", "test"))
    assert round(abs(together.accuracy - alone.accuracy) * test_images) <= 1, (together, alone)


@pytest.mark.slow
@pytest.mark.timeout(4 * STAGE_TIMEOUT)
def test_a_worker_killed_mid_epoch_fails_the_job_and_a_rerun_resumes(tmp_path: Path) -> None:
    extra = {**RECIPE, "finetune.head_epochs": 8, "finetune.epochs": 1}
    params, chief_yaml = finetune_workspace(tmp_path / "chief", extra)
    worker_yaml = _worker_root(tmp_path / "chief", tmp_path / "worker", extra)
    state_file = params.paths.finetune_checkpoint / "state.json"
    port = _free_port()
    processes = _start_workers([chief_yaml, worker_yaml], port)
    try:
        # The worker dies once the chief has checkpointed epoch 2: mid-way through a later epoch.
        epoch, _ = kill_after_epoch(processes[1], state_file, 2, within=STAGE_TIMEOUT)
        assert epoch >= 2, "no checkpoint of epoch 2 within the deadline"
        # The chief stops on its own, within JAX's heartbeat timeout: no hang.
        output, _ = processes[0].communicate(timeout=STAGE_TIMEOUT)
        assert processes[0].returncode != 0, output
    finally:
        for process in processes:
            if process.poll() is None:
                stop_process(process, grace=5)
    assert not params.paths.finetuned_model.exists()
    done = json.loads(state_file.read_text())["epoch"]

    outputs = _finish(_start_workers([chief_yaml, worker_yaml], _free_port()), STAGE_TIMEOUT)
    assert all(f"head: resuming after epoch {done} of 8" in output for output in outputs), outputs
    report = json.loads(params.paths.finetune_report.read_text())
    assert report["resumed"] is True and report["phases"]["head"]["resumed_from_epoch"] == done



# Launchers, checked without a cluster -----------------------------------------------------------

MANIFEST = REPO / "deploy" / "k8s" / "finetune-multiworker.yaml"


def _kubernetes_object(value: object, kind: str, where: str) -> object:
    """`value` built into the kubernetes package's typed model `kind`: an unknown field, a wrong type or
    a missing required field fails, naming where (the models are generated from Kubernetes' OpenAPI schema)."""
    import kubernetes.client as k8s

    if kind.lower().startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        return [_kubernetes_object(item, kind[5:-1], f"{where}[{i}]") for i, item in enumerate(value)]
    if kind.lower().startswith(("dict(", "dict[")):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        inner = kind[5:-1].split(", ", 1)[1]
        return {key: _kubernetes_object(item, inner, f"{where}.{key}") for key, item in value.items()}
    if kind in {"str", "int", "bool", "float", "object", "datetime"}:
        expected = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}[kind]
        assert isinstance(value, expected), f"{where}: {value!r} is not {kind}"
        return value
    model = getattr(k8s, kind)
    assert isinstance(value, dict), f"{where}: expected a {kind} mapping"
    fields = {json_name: name for name, json_name in model.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    assert not unknown, f"{where}: {unknown} are not fields of {kind}"
    return model(**{fields[key]: _kubernetes_object(item, model.openapi_types[fields[key]], f"{where}.{key}")
                    for key, item in value.items()})


def test_the_kubernetes_manifest_fits_the_kubernetes_schema_and_wires_n_workers_together() -> None:
    import yaml

    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}
    assert set(documents) == {"Service", "PersistentVolumeClaim", "Job"}
    for kind, doc in documents.items():
        _kubernetes_object(doc, f"V1{kind}", kind)

    service, job = documents["Service"]["spec"], documents["Job"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    workers = int(env["KERAS_DISTRIBUTION_NUM_PROCESSES"]["value"])
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == workers
    assert service["clusterIP"] == "None" and pod["subdomain"] == documents["Service"]["metadata"]["name"]
    host, port = env["KERAS_DISTRIBUTION_JOB_ADDRESSES"]["value"].split(":")
    assert host == f"{documents['Job']['metadata']['name']}-0.{pod['subdomain']}"  # pod 0's DNS name
    assert int(port) == service["ports"][0]["port"] == container["ports"][0]["containerPort"]
    assert env["KERAS_DISTRIBUTION_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["KERAS_BACKEND"]["value"] == "jax"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {mount["name"] for mount in container["volumeMounts"]}
    claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") ==
              documents["PersistentVolumeClaim"]["metadata"]["name"]}
    assert claims and claims <= mounts


@pytest.mark.slow  # a Prefect server and four CLI calls: about two minutes on 2 busy cores
@pytest.mark.timeout(600)
def test_the_docker_and_kubernetes_deployments_register_on_a_real_prefect_server(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness
    from prefect.utilities.asyncutils import run_coro_as_sync

    for name in ("prefect.yaml", "flows", "components", "deploy", "params.yaml", "dvc.yaml"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    cli = [str(Path(sys.executable).parent / "prefect")]
    with temporary_settings(updates={PREFECT_HOME: tmp_path / "prefect-home"}):
        with prefect_test_harness(server_startup_timeout=180):
            env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
                   "PREFECT_HOME": str(tmp_path / "prefect-home")}

            def prefect(*args: str) -> str:
                done = subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=240)
                assert done.returncode == 0, done.stdout + done.stderr
                return done.stdout

            prefect("work-pool", "create", "tlpipe-process", "--type", "process")
            prefect("work-pool", "create", "tlpipe-docker", "--type", "docker")
            prefect("work-pool", "create", "tlpipe-kubernetes", "--type", "kubernetes",
                    "--base-job-template", "deploy/prefect/kubernetes-gpu.json")
            prefect("deploy", "--all")

            async def read() -> dict:
                async with get_client() as client:
                    pools = {pool.name: pool for pool in await client.read_work_pools()}
                    deployments = {d.name: d for d in await client.read_deployments()}
                return {"pools": pools, "deployments": deployments}

            found = run_coro_as_sync(read())
    pools, deployments = found["pools"], found["deployments"]
    assert pools["tlpipe-docker"].type == "docker" and pools["tlpipe-kubernetes"].type == "kubernetes"
    assert set(deployments) == {"retrain", "retrain-docker", "retrain-kubernetes"}
    kubernetes = deployments["retrain-kubernetes"]
    assert kubernetes.work_pool_name == "tlpipe-kubernetes" and kubernetes.job_variables["gpus"] == 1
    template = pools["tlpipe-kubernetes"].base_job_template
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    docker = deployments["retrain-docker"]
    assert docker.work_pool_name == "tlpipe-docker" and docker.job_variables["image"].endswith(":gpu")
    assert set(docker.job_variables) <= set(pools["tlpipe-docker"].base_job_template["variables"]["properties"])
    assert set(kubernetes.job_variables) <= set(template["variables"]["properties"])
