"""Shared fixtures: the real params.yaml, shrunk (outputs in tmp_path, tiny images, few epochs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.console import quiet_libraries

quiet_libraries()  # the same quiet libraries as the CLI, before any test imports them

from components.core.config import Params, effective_raw, load_params, set_dotted, with_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# What makes the real config small enough for a test on 2 cores.
SHRINK: dict[str, object] = {
    "data.image_size": 16,
    "model.width": 8,
    "source.epochs": 2,
    "source.batch_size": 64,
    "finetune.head_epochs": 1,
    "finetune.epochs": 1,
    "finetune.batch_size": 32,
    "clean.target_train_per_class": 20,
    "evaluate.min_accuracy": 0.0,
    "evaluate.min_macro_f1": 0.0,
    "export.parity_images": 16,
}


# The end-to-end run (tests/test_retrain_deployment.py, the bundled digits at the shrunk size): enough
# epochs to learn them, and gates that fail a model that did not. Measured on 2026-12-01 (2 cores
# shared with other work, same seed): test accuracy 0.934, macro F1 0.930; chance is 0.2 (5 classes).
# With SHRINK's epochs alone it reached 0.24, chance level, and the old gates of 0.0 passed it.
END_TO_END: dict[str, object] = {
    "source.epochs": 6,
    "finetune.head_epochs": 2,
    "finetune.epochs": 5,
    "evaluate.min_accuracy": 0.8,
    "evaluate.min_macro_f1": 0.75,
}


def shrunk_params(root: Path, extra: dict[str, object] | None = None) -> Params:
    """The repository's params.yaml with outputs under `root` and the SHRINK overrides applied."""
    params = load_params(REPO / "params.yaml", root=root)
    return with_overrides(params, {**SHRINK, **(extra or {})})


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return shrunk_params(tmp_path)


def write_class_folders(
    root: Path,
    classes: list[str],
    per_class: int,
    size: tuple[int, int] = (12, 12),
    mode: str = "L",
    seed: int = 0,
) -> Path:
    """Real PNG class folders a small CNN can learn: class k draws a bright bar at row k, plus noise."""
    for name, i, image in bar_images(classes, per_class, size, mode, seed):
        (root / name).mkdir(parents=True, exist_ok=True)
        image.save(root / name / f"{name}_{i:04d}.png")
    return root


def raw_files(task_folder: Path) -> dict[str, bytes]:
    """{path under the task ("<class>/..."): bytes} of every file ingest packed into paths.raw/<task>."""
    from components.data import raw_pack

    return {m.path: raw_pack.read(task_folder, m) for m in raw_pack.members(task_folder)}


def pack_folder(source: Path, task_folder: Path) -> Path:
    """Pack a class-per-subfolder tree into paths.raw/<task> as ingest does, for tests that build data/raw by hand."""
    from components.data import raw_pack
    from components.data.images import class_folders, list_class_images

    with raw_pack.PackWriter(task_folder) as out:
        for label in class_folders(source):
            out.add_class(label)
        for rel, label in list_class_images(source, every_file=True):
            out.add(rel, label, (source / rel).read_bytes())
    return task_folder


def bar_images(classes: list[str], per_class: int, size: tuple[int, int], mode: str,
               seed: int) -> Iterator[tuple[str, int, Image.Image]]:
    """(class, number, image) of write_class_folders' images, class by class."""
    rng = np.random.default_rng(seed)
    width, height = size
    for index, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(height, width), dtype=np.uint8)
            row = (index * height) // len(classes)
            pixels[row : row + max(1, height // len(classes)), :] = 255 - rng.integers(0, 30)
            yield name, i, Image.fromarray(pixels).convert(mode)


def write_clean_split(clean_dir: Path, task: str, split: str, classes: list[str], images: list, labels: list[str]) -> None:
    """One split in the clean stage's format (uint8 shards + index) and <task>/classes.json."""
    import json

    from components.data.dataset import write_split

    (clean_dir / task).mkdir(parents=True, exist_ok=True)
    (clean_dir / task / "classes.json").write_text(json.dumps(sorted(classes)))
    paths = [f"{task}/{label}/{i:04d}.png" for i, label in enumerate(labels)]
    write_split(clean_dir / task / split, sorted(classes), np.stack([np.asarray(x) for x in images]), labels, paths)


def clean_images(clean_dir: Path, task: str) -> dict[str, tuple[str, np.ndarray]]:
    """Source path -> (split, uint8 H x W x C pixels) of every image the clean stage wrote for `task`."""
    from components.data.dataset import SPLITS, load_split

    found = {}
    for split in SPLITS:
        opened = load_split(clean_dir, task, split)
        for position, path in enumerate(opened.paths):
            found[path] = (split, opened.images([position])[0])
    return found


def write_clean_dataset(
    clean_dir: Path,
    task: str,
    classes: list[str],
    per_split: dict[str, int],
    size: int,
    mode: str = "L",
    seed: int = 0,
) -> Path:
    """What the clean stage writes (shards, index, classes.json) for every split, with learnable images."""
    for offset, (split, count) in enumerate(per_split.items()):
        made = list(bar_images(sorted(classes), count, (size, size), mode, seed + offset))
        write_clean_split(clean_dir, task, split, classes, [image for _, _, image in made], [name for name, _, _ in made])
    return clean_dir


@pytest.fixture
def clean_dataset(params: Params) -> Params:
    """A small cleaned source task (4 classes) and target task (3 classes) at the shrunk image size."""
    splits = {"train": 24, "val": 8, "test": 8}
    write_clean_dataset(params.paths.clean, "source", ["a", "b", "c", "d"], splits, params.data.image_size)
    write_clean_dataset(params.paths.clean, "target", ["x", "y", "z"], splits, params.data.image_size, seed=7)
    return params


@pytest.fixture
def file_server(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base_url)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # keep test output clean
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def stop_process(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds: no test leaves a process behind."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_shrunk_params_yaml(dest: Path, extra: dict[str, object] | None = None) -> Path:
    """params.yaml as the repository has it (only what it changes), with the SHRINK overrides added."""
    import yaml

    overrides = {**SHRINK, **(extra or {})}
    set_dotted(effective_raw(REPO / "params.yaml"), overrides)  # every key must exist
    raw = yaml.safe_load((REPO / "params.yaml").read_text()) or {}
    for dotted, value in overrides.items():  # a params.yaml holds only what it changes
        *parents, leaf = dotted.split(".")
        section = raw
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def export_tiny_model(root: Path, classes: list[str]) -> Path:
    """A real tiny model exported by the export stage (its metadata is what users get), head sharpened.

    Untrained, the head gives about 1/N to every class whatever the image; a sharper head makes
    different images get visibly different answers.
    """
    import json

    import keras

    from components import export
    from components.core.artifacts import write_json
    from components.training.models import build_model, save_model_dir

    params = shrunk_params(root, {"export.variants": []})
    size = params.data.image_size
    write_clean_dataset(params.paths.clean, "target", classes, {"test": 2}, size)
    write_json(params.paths.gates, {"passed": True, "gates": []})
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, len(classes), bn_inference=True)
    kernel, bias = model.get_layer("head").get_weights()
    model.get_layer("head").set_weights([kernel * 100, bias])
    save_model_dir(model, tuple(classes), params.paths.finetuned_model)
    export.run(params)
    return params.paths.onnx_model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (moto's, a subprocess) on 127.0.0.1; yields its endpoint URL.

    Buckets are per test: create them with boto3 against the endpoint (any credentials work).
    """
    import sys
    import time
    import urllib.request

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its request log goes to a file: a pipe nobody reads fills up and blocks the server.
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError as error:
                if server.poll() is not None:
                    pytest.fail(f"moto_server exited with {server.returncode}: {log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 60 s: {error}")
                time.sleep(0.2)
        yield endpoint
    finally:
        stop_process(server, grace=10)
        log.close()
