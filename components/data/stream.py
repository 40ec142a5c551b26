"""The one input pipeline: Keras feeds over on-disk splits (dataset.Split), on every Keras backend.

- `TrainFeed`: seeded shuffled batches for `model.fit`. The order of an epoch is a function of
  (seed, epoch) only, so a run resumed after `kill -9` sees the epochs it has left in the order
  an unbroken run would. Steps per epoch come from the index order, not from copying the data.
  Every batch is full (the last one wraps around), so its size divides the device count.
- `predict`: the model's outputs over a split in order, batch by batch; the last batch is padded
  to a multiple of the data-parallel device count and the padding is cut off the outputs, so no
  image is dropped or counted twice.

Batches are positional reads from the shards (no decode), made in the calling thread: on
TensorFlow, Keras runs the feed inside tf.data with prefetch, so reading overlaps the step; on JAX
it is synchronous, like `fit` on in-memory arrays (docs/data-format.md compares the two). Keras's
thread workers are not used: each epoch starts new threads, and each new thread's malloc arena
kept its batches, growing resident memory with every epoch (measured: +150 MB evaluating 12,800
64-px images). Augmentation stays in the model.
"""

from __future__ import annotations

import math
import threading

import keras
import numpy as np

from components.data.dataset import PREDICT_BATCH, Split



def replicas() -> int:
    """How many devices each batch is split between: the JAX data-parallel mesh, else 1.

    (TensorFlow's MirroredStrategy splits uneven batches itself.)
    """
    if keras.backend.backend() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    return int(np.prod(mesh.shape)) if mesh is not None else 1


class TrainFeed(keras.utils.PyDataset):
    """Shuffled (x uint8, y one-hot[, sample weight]) batches of one split for `fit`.

    `min_steps`: an epoch of a tiny split is repeated (each pass shuffled afresh) until it has this
    many steps. `epoch` must be set before each epoch (trainer's callback does), as Keras's own
    epoch hook runs after the reading threads have started. `shard` (index, count): in a multi-worker
    run, each process reads its own slice of every global batch (`batch_size` is the global batch),
    so the processes together train on exactly the batches one process would.
    """

    def __init__(self, split: Split, batch_size: int, *, seed: int, min_steps: int = 0,
                 class_weight: dict[int, float] | None = None, multiple: int = 1,
                 shard: tuple[int, int] = (0, 1)) -> None:
        super().__init__()
        n = len(split)
        batch = min(batch_size, n)
        # A multiple of the device count, at least one image per device.
        self.batch_size = max(multiple, batch // multiple * multiple)
        self.repeats = max(1, math.ceil(min_steps * self.batch_size / n))
        self.steps = math.ceil(n * self.repeats / self.batch_size)
        self.split, self.seed, self.epoch = split, seed, 0
        index, count = shard
        if self.batch_size % count:
            raise ValueError(f"the global batch of {self.batch_size} does not divide between {count} processes")
        self.rows = slice(index * self.batch_size // count, (index + 1) * self.batch_size // count)
        self.targets = np.eye(len(split.classes), dtype="float32")
        self.weights = None if class_weight is None else \
            np.asarray([class_weight[k] for k in range(len(split.classes))], dtype="float32")
        self._lock = threading.Lock()
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The split positions of one epoch, in the order trained: fixed by (seed, epoch)."""
        with self._lock:
            if self._order is None or self._order[0] != epoch:
                rng = np.random.default_rng([self.seed, epoch])
                shuffled = rng.permutation(np.tile(np.arange(len(self.split)), self.repeats))
                self._order = epoch, np.resize(shuffled, self.steps * self.batch_size)  # wraps to full batches
            return self._order[1]

    @property
    def num_batches(self) -> int:
        return self.steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        chosen = self.order(self.epoch)[index * self.batch_size : (index + 1) * self.batch_size][self.rows]
        labels = self.split.y[chosen]
        batch = (self.split.images(chosen), self.targets[labels])
        return batch if self.weights is None else (*batch, self.weights[labels])


class _InOrder(keras.utils.PyDataset):
    """A split's images at `positions` (default: all) in that order, the last batch padded (repeating its
    last image) to `multiple`."""

    def __init__(self, split: Split, batch_size: int, multiple: int, positions: np.ndarray | None = None) -> None:
        super().__init__()
        self.split, self.multiple = split, multiple
        self.positions = np.arange(len(split)) if positions is None else np.asarray(positions, dtype=np.int64)
        self.batch_size = max(multiple, min(batch_size, len(self.positions)) // multiple * multiple)

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[np.ndarray]:
        positions = self.positions[index * self.batch_size : (index + 1) * self.batch_size]
        short = -len(positions) % self.multiple
        if short:
            positions = np.concatenate([positions, np.full(short, positions[-1])])
        return (self.split.images(positions),)


def predict(model: keras.Model, split: Split, batch_size: int = PREDICT_BATCH,
            positions: np.ndarray | None = None) -> np.ndarray:
    """The model's outputs for the split's images at `positions` (default: every one, in split order),
    read a batch at a time (never the split in memory)."""
    feed = _InOrder(split, batch_size, replicas(), positions)
    outputs = model.predict(feed, verbose=0)
    return np.asarray(outputs)[: len(feed.positions)]
