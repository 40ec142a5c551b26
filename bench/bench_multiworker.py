"""Multi-worker step time: the finetune stage on one JAX process against two on 127.0.0.1, same global batch.

    .venv/bin/python bench/bench_multiworker.py [--runs 2] [--size 32] [--batch 64] [--images 512] [--epochs 3]

One workspace in a temporary folder: a cleaned 4-class target task of random-texture images (uint8
shards, components.data.dataset) and the default backbone (simple_cnn, width 32), built untrained;
fine-tuning does not care where its weights came from. Then, --runs times, alternating the order:

- 1 worker: `tlpipe stage finetune`, KERAS_BACKEND=jax, one process;
- 2 workers: the same command twice, with KERAS_DISTRIBUTION_* naming a cluster on 127.0.0.1
  (components/training/distributed.py); each reads half of every global batch.

Reported from the chief's reports/finetune.json: steady-state training images/s (after the first
epoch, validation excluded: trainer.Throughput) and the step time it implies (global batch / images/s),
and their ratio. On one machine the two processes share its cores, so this measures what the
multi-worker machinery costs, not a speed-up (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import harness

CLASSES = ["a", "b", "c", "d"]


def workspace(root: Path, size: int, images: int, batch: int, epochs: int) -> Path:
    import keras
    import yaml

    from components.core.config import load_params
    from components.data.dataset import write_split
    from components.training.models import save_model_dir, build_model

    overrides = {"data.image_size": size, "data.color_mode": "rgb", "finetune.head_epochs": 0,
                 "finetune.epochs": epochs, "finetune.patience": epochs, "finetune.batch_size": batch,
                 "finetune.min_steps_per_epoch": 0, "finetune.augment_rotation": 0.0, "finetune.augment_zoom": 0.0,
                 "finetune.augment_contrast": 0.0}
    raw: dict = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(root / "params.yaml", root=root)
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", images // 4), ("test", images // 4)):
        labels = [CLASSES[i % len(CLASSES)] for i in range(count)]
        pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
        for i, label in enumerate(labels):  # a learnable signal: a bright band per class
            row = CLASSES.index(label) * size // len(CLASSES)
            pixels[i, row : row + size // len(CLASSES)] //= 4
        (params.paths.clean / "target").mkdir(parents=True, exist_ok=True)
        (params.paths.clean / "target" / "classes.json").write_text(json.dumps(CLASSES))
        write_split(params.paths.clean / "target" / split, CLASSES, pixels, labels,
                    [f"target/{label}/{i:05d}.png" for i, label in enumerate(labels)])
    keras.utils.set_random_seed(params.seed)
    save_model_dir(build_model(params.model, params.data, len(CLASSES), bn_inference=True), CLASSES,
                   params.paths.transferred_model)
    return root / "params.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(params_yaml: Path, workers: int) -> dict:
    root = params_yaml.parent
    shutil.rmtree(root / "models" / "finetune_checkpoint", ignore_errors=True)  # fresh, never a resume
    command = [sys.executable, "-m", "components", "stage", "finetune", "--params", str(params_yaml)]
    port = free_port()
    processes = []
    for index in range(workers):
        cluster = {} if workers == 1 else {"KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
                                           "KERAS_DISTRIBUTION_NUM_PROCESSES": str(workers),
                                           "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}
        processes.append(subprocess.Popen(command, cwd=harness.REPO, env=harness.env(KERAS_BACKEND="jax", **cluster),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=3600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(output[-4000:])
    report = json.loads((root / "reports" / "finetune.json").read_text())
    phase = report["phases"]["unfrozen"]
    return {"workers": report["workers"], "images_per_second": phase["images_per_second"],
            "val_accuracy": report["val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(harness.header("Fine-tuning: 1 worker against 2 on one machine (JAX, CPU)"))
    with tempfile.TemporaryDirectory() as temp:
        params_yaml = workspace(Path(temp), args.size, args.images, args.batch, args.epochs)
        results: dict[int, list[dict]] = {1: [], 2: []}
        for i in range(args.runs):
            for workers in ((1, 2) if i % 2 == 0 else (2, 1)):
                results[workers].append(run(params_yaml, workers))
    rows = []
    for workers, found in results.items():
        speed = harness.median([r["images_per_second"] for r in found])
        rows.append([workers, args.batch, f"{speed:.0f}", f"{1000 * args.batch / speed:.1f}",
                     ", ".join(f"{r['val_accuracy']:.3f}" for r in found)])
    ratio = harness.median([r["images_per_second"] for r in results[2]]) / \
        harness.median([r["images_per_second"] for r in results[1]])
    print(f"{args.images} training images of {args.size}x{args.size}x3, simple_cnn width 32, {args.epochs} epochs "
          f"(steady state: epochs 2..{args.epochs}), {args.runs} runs each, alternating\n")
    print(harness.table(["workers", "global batch", "images/s (median)", "ms per step", "val accuracy per run"], rows))
    print(f"\n2 workers / 1 worker throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
