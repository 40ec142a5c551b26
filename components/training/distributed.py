"""Multi-worker training: the cluster this process belongs to, read from the environment a launcher sets.

JAX backend (the multi-worker path): Keras' own variables, as `keras.distribution.initialize` reads
them, so any launcher that sets them works (a Kubernetes Indexed Job, Slurm, a shell loop):
- `KERAS_DISTRIBUTION_JOB_ADDRESSES`: `host:port`, the coordinator (process 0), or every process's
  address, comma-separated, the coordinator first;
- `KERAS_DISTRIBUTION_NUM_PROCESSES`: how many processes train together;
- `KERAS_DISTRIBUTION_PROCESS_ID`: this process, 0 to N-1 (0 is the chief).
`join` checks them, meets the others at the coordinator's address (a bounded handshake, so a missing
or doubled worker is one clear error, never a hang), then calls `jax.distributed.initialize`;
training then runs `keras.distribution.DataParallel` over every process's devices, gradients
all-reduced by XLA (gloo between CPU processes, NCCL between GPUs). `TLPIPE_CLUSTER_TIMEOUT`
(seconds, default 300) bounds the wait for the others, and JAX's heartbeat: a worker that dies
mid-run stops the others within it.

TensorFlow backend: a `TF_CONFIG` naming more than one worker is checked, then refused: Keras 3's
`fit` fails under `tf.distribute.MultiWorkerMirroredStrategy` (keras-team/keras#20585, reproduced
here with Keras 3.15.1 and TensorFlow 2.21), so such a run stops before any work instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import keras

from components.core.errors import PipelineError

log = logging.getLogger(__name__)

ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
COUNT = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS = "KERAS_DISTRIBUTION_PROCESS_ID"
TF_CONFIG = "TF_CONFIG"
TIMEOUT = "TLPIPE_CLUSTER_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
UPSTREAM_TF_BUG = "https://github.com/keras-team/keras/issues/20585"


@dataclass(frozen=True)
class Cluster:
    """The processes that train together; a single process is a cluster of one."""

    addresses: tuple[str, ...] = ()  # host:port; the first is the coordinator
    index: int = 0
    count: int = 1
    setting: str = ""  # the environment variable it was read from, for messages
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_chief(self) -> bool:
        """Process 0 alone writes checkpoints, curves, reports and the model."""
        return self.index == 0

    @property
    def coordinator(self) -> str:
        return self.addresses[0] if self.addresses else ""


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise PipelineError(f"{name}={environ[name]!r} is not a whole number: set it to an integer") from None


def _address(value: str, setting: str) -> tuple[str, int]:
    host, _, port = value.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PipelineError(f"{setting}: {value!r} is not host:port (e.g. worker-0.tlpipe:7777): fix the address")
    return host.strip("[]"), int(port)


def _unique(addresses: list[str], setting: str) -> None:
    seen = {}
    for i, address in enumerate(addresses):
        key = _address(address, setting)
        if key in seen:
            raise PipelineError(f"{setting} names {address} twice (as worker {seen[key]} and worker {i}): "
                                f"give every worker its own address")
        seen[key] = i


def read_cluster(environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster the environment describes (no network yet); a PipelineError naming a bad setting."""
    environ = os.environ if environ is None else environ
    timeout = DEFAULT_TIMEOUT
    if TIMEOUT in environ:
        try:
            timeout = float(environ[TIMEOUT])
        except ValueError:
            timeout = -1
        if not timeout > 0:
            raise PipelineError(f"{TIMEOUT}={environ[TIMEOUT]!r} must be a number of seconds above 0")
    if environ.get(TF_CONFIG):
        return _read_tf_config(environ[TF_CONFIG], timeout)
    if not any(environ.get(name) for name in (ADDRESSES, COUNT, PROCESS)):
        return Cluster(timeout=timeout)
    missing = [name for name in (ADDRESSES, COUNT, PROCESS) if not environ.get(name)]
    if missing:
        raise PipelineError(f"a multi-worker run needs {ADDRESSES}, {COUNT} and {PROCESS}; "
                            f"{', '.join(missing)} not set: set all three, or none for one process")
    count, index = _int(environ, COUNT), _int(environ, PROCESS)
    if count < 1:
        raise PipelineError(f"{COUNT}={count}: there must be at least one process")
    if not 0 <= index < count:
        raise PipelineError(f"{PROCESS}={index} is outside 0..{count - 1} ({COUNT}={count}): "
                            f"number the processes from 0")
    addresses = [a.strip() for a in environ[ADDRESSES].split(",")]
    if len(addresses) > 1 and len(addresses) != count:
        raise PipelineError(f"{ADDRESSES} lists {len(addresses)} addresses but {COUNT}={count}: "
                            f"list the coordinator alone, or every process")
    for address in addresses:
        _address(address, ADDRESSES)
    _unique(addresses, ADDRESSES)
    return Cluster(tuple(addresses), index, count, ADDRESSES, timeout)


def _read_tf_config(text: str, timeout: float) -> Cluster:
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        jobs = {job: list(cluster[job]) for job in ("chief", "worker") if job in cluster}
        kind, index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(f"{TF_CONFIG} is not valid: {error!s} (expected "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}})') \
            from None
    addresses = jobs.get("chief", []) + jobs.get("worker", [])
    if kind not in jobs or not 0 <= index < len(jobs[kind]):
        raise PipelineError(f"{TF_CONFIG}: task {kind} {index} is not in its cluster {jobs}: fix task.type/index")
    for address in addresses:
        _address(address, TF_CONFIG)
    _unique(addresses, TF_CONFIG)
    position = index + (len(jobs.get("chief", [])) if kind == "worker" else 0)
    return Cluster(tuple(addresses), position, len(addresses), TF_CONFIG, timeout)


def join(environ: Mapping[str, str] | None = None) -> Cluster:
    """Read the cluster and, with more than one process, join it; call before anything touches a device."""
    cluster = read_cluster(environ)
    if cluster.count == 1:
        return cluster
    backend = keras.backend.backend()
    if cluster.setting == TF_CONFIG or backend != "jax":
        raise PipelineError(
            f"{cluster.setting} names {cluster.count} workers, but multi-worker training runs on the JAX backend "
            f"only (Keras 3's fit fails under tf.distribute.MultiWorkerMirroredStrategy: {UPSTREAM_TF_BUG}): "
            f"run with KERAS_BACKEND=jax and {ADDRESSES}, {COUNT}, {PROCESS} (docs/scaling.md)")
    import jax

    if jax.distributed.is_initialized():
        return cluster
    rendezvous(cluster)
    # Cross-process collectives between CPU devices need gloo (jax 0.10.2's default; older JAX had none,
    # and a changed default would break CPU clusters silently); GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    seconds = max(int(cluster.timeout), 1)
    jax.distributed.initialize(cluster.coordinator, cluster.count, cluster.index, initialization_timeout=seconds,
                               heartbeat_timeout_seconds=seconds)
    # No device count here: listing devices would start XLA before prepare_backend sets its flags.
    log.info("joined a cluster of %d processes as process %d%s (coordinator %s)", cluster.count, cluster.index,
             " (chief)" if cluster.is_chief else "", cluster.coordinator)
    return cluster


def agree(value: int, what: str, fix: str) -> None:
    """Stop, naming `what`, unless every process holds the same `value` (one process: nothing to check)."""
    if process()[1] == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    chief = int(multihost_utils.broadcast_one_to_all(np.int64(value)))
    if chief != value:
        raise PipelineError(f"process {process()[0]} has {what} {value}, process 0 has {chief}: {fix}")


def rendezvous(cluster: Cluster) -> None:
    """Meet every process at the coordinator's address before JAX does, within `cluster.timeout`.

    jax.distributed.initialize aborts the process (no Python exception) when a worker is missing,
    so the common mistakes are caught first, with the setting named: a coordinator nobody reaches,
    a worker that never comes, two processes with one id, processes told different counts. Process 0
    listens on the coordinator's port, each other process says `id count`, and process 0 answers `go`
    once all have come; then the port is freed for JAX's coordination service.
    """
    host, port = _address(cluster.coordinator, cluster.setting)
    deadline = time.monotonic() + cluster.timeout
    if cluster.is_chief:
        _gather(cluster, port, deadline)
    else:
        _report(cluster, host, port, deadline)


def _gather(cluster: Cluster, port: int, deadline: float) -> None:
    server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
        if socket.has_dualstack_ipv6() else socket.create_server(("", port))
    peers: dict[int, socket.socket] = {}
    try:
        while len(peers) < cluster.count - 1:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                peer, _ = server.accept()
            except TimeoutError:
                absent = sorted(set(range(1, cluster.count)) - set(peers))
                raise PipelineError(
                    f"process(es) {absent} of {cluster.count} never reached the coordinator at {cluster.coordinator} "
                    f"within {cluster.timeout:g} s ({cluster.setting}, {COUNT}): start every worker with the same "
                    f"settings, or raise {TIMEOUT}") from None
            peer.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                index, count = (int(part) for part in peer.recv(64).decode().split())
            except (ValueError, OSError):
                peer.close()  # not a tlpipe worker (a port scan, a health probe): ignore it
                continue
            problem = (f"{COUNT}={count} there, {cluster.count} here" if count != cluster.count else
                       f"two processes have {PROCESS}={index}" if index in peers else "")
            if problem:
                peer.sendall(f"no {problem}\n".encode())
                peer.close()
                raise PipelineError(f"the workers disagree: {problem}: give each worker its own {PROCESS} "
                                    f"(0..{cluster.count - 1}) and the same {COUNT}")
            peers[index] = peer
        for peer in peers.values():
            peer.sendall(b"go\n")
    finally:
        for peer in peers.values():
            peer.close()
        server.close()


def _report(cluster: Cluster, host: str, port: int, deadline: float) -> None:
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01)) as peer:
                peer.sendall(f"{cluster.index} {cluster.count}\n".encode())
                peer.settimeout(max(deadline - time.monotonic(), 0.01))
                answer = peer.recv(256).decode().strip()
        except socket.gaierror as error:
            raise PipelineError(f"{cluster.setting}: cannot resolve {host} ({error.strerror}): fix the "
                                f"coordinator's address") from None
        except OSError as error:  # not listening yet, or timed out: retry until the deadline
            last = error
            time.sleep(0.2)
            continue
        if answer == "go":
            return
        if answer.startswith("no "):
            raise PipelineError(f"the coordinator at {cluster.coordinator} refused this worker: {answer[3:]}: give "
                                f"each worker its own {PROCESS} and the same {COUNT}")
        last = OSError(f"the coordinator closed the connection ({answer or 'no answer'})")
    raise PipelineError(f"no coordinator answered at {cluster.coordinator} within {cluster.timeout:g} s "
                        f"({cluster.setting}; last: {last}): start process 0 there, or fix the address")


def process() -> tuple[int, int]:
    """(this process's index, the process count) of the joined cluster; (0, 1) on one process."""
    if keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return (jax.process_index(), jax.process_count()) if jax.distributed.is_initialized() else (0, 1)


_LOCAL_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def process_local(model: keras.Model) -> Iterator[keras.Model]:
    """`model` as a copy on this process's devices alone, with the same weights, for predictions.

    Over several processes the model's variables span devices this process cannot read, and
    Keras's `predict` cannot return such outputs; each process therefore evaluates a local copy
    (the same weights, so every process reaches the same early-stopping decisions). One process:
    the model itself.
    """
    if process()[1] == 1:
        yield model
        return
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        copy = _LOCAL_COPIES.get(model)
        if copy is None:
            copy = _LOCAL_COPIES[model] = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        yield copy
    finally:
        keras.distribution.set_distribution(previous)
