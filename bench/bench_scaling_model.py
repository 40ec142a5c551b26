"""The data-parallel throughput model of docs/scaling.md: per-step compute measured here, all-reduce on paper.

    KERAS_BACKEND=jax .venv/bin/python bench/bench_scaling_model.py [--size 224] [--batch 8] [--steps 2]

For every backbone tlpipe ships (components/training/models.py), built with random weights at
--size px (simple_cnn at its default width): the parameters whose gradients are all-reduced (every
weight: fine-tuning unfreezes the whole backbone by default, finetune.unfreeze_top -1), and one
training step of --batch images timed here (jit-compiled, after a warm-up step; median of --steps).

Then the model. A ring all-reduce sends and receives 2(N-1)/N x the gradient bytes (float32 variables,
also under bf16 mixed precision) per worker per step; at B bits/s that takes
    t_comm = 2(N-1)/N x 4 P x 8 / B
and, with no overlap of communication and compute (the conservative case: XLA may overlap some),
scaling efficiency = t_step / (t_step + t_comm). It stays at 90% or more while t_step >= 9 t_comm.
Printed: t_comm per backbone, network and N; and, for resnet50 at a stated GPU rate (--gpu-rate, an
assumption until a GPU host measures it), the efficiency at per-GPU batches of 64, 128 and 256.
--steps 0 skips the timing (parameter counts and the model only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

import harness  # noqa: E402

BANDWIDTHS = {"10 Gb/s": 10e9, "25 Gb/s": 25e9, "100 Gb/s": 100e9}
WORKERS = (2, 4, 8, 16)
BATCHES = (64, 128, 256)


def measure(backbone: str, size: int, batch: int, steps: int) -> tuple[int, float]:
    """(parameters, seconds per training step of `batch` images) on this machine."""
    import keras

    from components.core.config import load_params, with_overrides
    from components.training.models import build_model
    from components.training.trainer import compile_model

    params = with_overrides(load_params(harness.REPO / "params.yaml", root=harness.REPO),
                            {"model.backbone": backbone, "data.image_size": size, "data.color_mode": "rgb"})
    keras.utils.set_random_seed(0)
    model = build_model(params.model, params.data, 10, bn_inference=True)
    compile_model(model, 1e-3, jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, size=batch)]
    if steps == 0:
        return model.count_params(), float("nan")
    model.train_on_batch(x, y)  # compiles
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        seconds.append(time.perf_counter() - start)
    return model.count_params(), statistics.median(seconds)


def main() -> None:
    from typing import get_args

    from components.core.config import Backbone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gpu-rate", type=float, default=2500.0,
                        help="assumed images/s of one GPU for resnet50 at 224 px, bf16; default: issue 19's "
                             "H200 target (not measured: no GPU host yet)")
    args = parser.parse_args()
    print(harness.header("Data-parallel scaling model: compute measured here, all-reduce on paper"))
    measured = {name: measure(name, args.size if name != "simple_cnn" else 64, args.batch, args.steps)
                for name in get_args(Backbone)}
    rows = []
    for name, (count, step) in measured.items():
        rows.append([name, 64 if name == "simple_cnn" else args.size, f"{count / 1e6:.2f}", f"{4 * count / 2**20:.1f}",
                     f"{1000 * step:.0f}", f"{args.batch / step:.1f}"])
    if args.steps:
        print(f"Measured: one training step, batch {args.batch}, float32, JAX on this CPU (median of {args.steps})\n")
        print(harness.table(["backbone", "px", "parameters (M)", "gradient MiB", "ms per step", "images/s"], rows))

    print("\nAll-reduce time per step, t_comm = 2(N-1)/N x 4 bytes x parameters / bandwidth; 90% efficiency "
          "needs a compute step of at least 9 t_comm\n")
    table = []
    for name, (count, _) in measured.items():
        for network, bits in BANDWIDTHS.items():
            times = [comm_seconds(count, n, bits) for n in WORKERS]
            table.append([name, f"{count / 1e6:.2f}", network, *[f"{1000 * t:.1f}" for t in times],
                          f"{9000 * times[-1]:.0f}"])
    print(harness.table(["backbone", "parameters (M)", "network", *[f"t_comm N={n} (ms)" for n in WORKERS],
                         f"90% needs a step of (ms, N={WORKERS[-1]})"], table))

    count = measured["resnet50"][0]
    print(f"\nresnet50 at an assumed {args.gpu_rate:.0f} images/s per GPU: scaling efficiency by per-GPU batch\n")
    table = []
    for network, bits in BANDWIDTHS.items():
        for n in WORKERS:
            step = [batch / args.gpu_rate for batch in BATCHES]
            table.append([network, n, *[f"{t / (t + comm_seconds(count, n, bits)):.0%}" for t in step]])
    print(harness.table(["network", "N", *[f"batch {b}" for b in BATCHES]], table))


def comm_seconds(parameters: int, workers: int, bits_per_second: float) -> float:
    """A ring all-reduce of float32 gradients: 2(N-1)/N x the gradient bytes through each worker's link."""
    return 2 * (workers - 1) / workers * 4 * parameters * 8 / bits_per_second


if __name__ == "__main__":
    main()
