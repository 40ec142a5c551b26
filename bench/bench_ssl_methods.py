"""Pick the self-supervised method by measurement: linear-probe and k-NN accuracy per CPU minute.

    KERAS_BACKEND=jax nice python bench/bench_ssl_methods.py [--epochs 10 20 40]

On the embedded default (digits 5-9 as the target, --labels per class to fit the probes on; the
unlabelled pool is its train split plus the images the label budget held back), in a temporary workspace: the probes of a random backbone, of
today's supervised source (digits 0-4), of SimCLR (the library's method) and of a rotation-
prediction pretext task (written here only, the method that lost), each with its CPU and wall time.
Results: docs/self-supervised.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.core.config import load_params, with_overrides  # noqa: E402
from components.data.dataset import load_split  # noqa: E402
from components.data.stream import TrainFeed  # noqa: E402
from components.training.models import build_model, load_model_dir  # noqa: E402
from components.training.probe import probe  # noqa: E402
from components.training.self_supervised import pretrain, unlabeled_pool  # noqa: E402


class Rotations(keras.utils.PyDataset):
    """Each batch of the pool four times, turned 0/90/180/270 degrees, labelled by the turn."""

    def __init__(self, feed: TrainFeed) -> None:
        super().__init__()
        self.feed = feed

    def __len__(self) -> int:
        return len(self.feed)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.feed[index][0]
        turned = np.concatenate([np.rot90(x, k, axes=(1, 2)) for k in range(4)])
        return turned, np.repeat(np.arange(4), len(x))


def rotation_pretrain(params, pool, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(params.seed)
    encoder = build_model(params.model, params.data, None, bn_inference=False)
    inputs = keras.Input(encoder.inputs[0].shape[1:], dtype="uint8")
    model = keras.Model(inputs, keras.layers.Dense(4)(encoder(inputs)))
    model.compile(optimizer=keras.optimizers.Adam(params.source.self_supervised.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    feed = TrainFeed(pool, params.source.self_supervised.batch_size // 2, seed=params.seed)
    model.fit(Rotations(feed), epochs=epochs, verbose=0)
    return encoder


def timed(work):
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, round(time.perf_counter() - wall, 1), round(time.process_time() - cpu, 1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--labels", type=int, default=5, help="labels per class the probes are fitted on")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    from components import clean, ingest, source, validate

    rows = []
    with tempfile.TemporaryDirectory(prefix="tlpipe-ssl-bench-") as workspace:
        params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", root=Path(workspace))
        params = with_overrides(params, {"clean.target_train_per_class": args.labels})
        for stage in (ingest, validate, clean):
            stage.run(params)
        train, val = (load_split(params.paths.clean, "target", name) for name in ("train", "val"))
        pool, counts = unlabeled_pool(params, Path(workspace) / "pool")
        print("pool:", counts, "probe: fit on", len(train), "scored on", len(val), flush=True)

        def record(name: str, model: keras.Model, wall: float, cpu: float) -> None:
            found = probe(model, train, val)
            rows.append({"method": name, "wall_s": wall, "cpu_s": cpu, **found})
            print(json.dumps(rows[-1]), flush=True)

        keras.utils.set_random_seed(params.seed)
        record("random init", build_model(params.model, params.data, None, bn_inference=False), 0.0, 0.0)
        _, wall, cpu = timed(lambda: source.run(params))
        record("supervised source (digits 0-4)", load_model_dir(params.paths.source_model)[0], wall, cpu)
        for epochs in args.epochs:
            run = with_overrides(params, {"source.self_supervised.epochs": epochs})
            (encoder, _), wall, cpu = timed(lambda: pretrain(run, pool))
            record(f"simclr {epochs} epochs", encoder, wall, cpu)
            encoder, wall, cpu = timed(lambda: rotation_pretrain(run, pool, epochs))
            record(f"rotation {epochs} epochs", encoder, wall, cpu)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
