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
scaling efficiency = t_step / (t_step + t_comm). It stays at 90% or more while t_step >= 9 t_comm:
the table gives, per backbone, network and N, the per-worker batch needed for that, at this machine's
measured images/s and at a stated GPU rate (given by --gpu-rate, an assumption until measured).
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
                        help="assumed images/s of one GPU for resnet50 at 224 px, bf16 (scaled by measured "
                             "step time for the other backbones); default: issue 19's H200 target")
    args = parser.parse_args()
    print(harness.header("Data-parallel scaling model: compute measured here, all-reduce on paper"))
    measured = {name: measure(name, args.size if name != "simple_cnn" else 64, args.batch, args.steps)
                for name in get_args(Backbone)}
    rows = []
    for name, (count, step) in measured.items():
        rows.append([name, 64 if name == "simple_cnn" else args.size, f"{count / 1e6:.2f}", f"{4 * count / 2**20:.1f}",
                     f"{1000 * step:.0f}", f"{args.batch / step:.1f}"])
    print(f"Measured: one training step, batch {args.batch}, float32, JAX on this CPU (median of {args.steps})\n")
    print(harness.table(["backbone", "px", "parameters (M)", "gradient MiB", "ms per step", "images/s"], rows))

    resnet_rate = args.batch / measured["resnet50"][1]
    for label, rate_of in (("this CPU (measured)", lambda name: args.batch / measured[name][1]),
                           (f"one GPU at an assumed {args.gpu_rate:.0f} images/s for resnet50 (others scaled "
                            f"by their measured step time relative to resnet50)",
                            lambda name: args.gpu_rate * (args.batch / measured[name][1]) / resnet_rate)):
        print(f"\nPer-worker batch for 90% scaling efficiency, compute rate of {label}\n")
        table = []
        for name, (count, _) in measured.items():
            rate = rate_of(name)
            for network, bits in BANDWIDTHS.items():
                needed = []
                for n in WORKERS:
                    comm = 2 * (n - 1) / n * 4 * count * 8 / bits
                    needed.append(f"{int(np.ceil(9 * comm * rate))}")  # t_step = batch / rate >= 9 t_comm
                table.append([name, f"{rate:.0f}", network, *needed])
        print(harness.table(["backbone", "images/s per worker", "network", *[f"N={n}" for n in WORKERS]], table))


if __name__ == "__main__":
    main()
