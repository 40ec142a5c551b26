"""The cleaned dataset on disk: each split is uint8 array shards read by positional reads, plus an index.

Layout (written by the clean stage, docs/data-format.md says why this format):

    <clean>/<task>/classes.json
    <clean>/<task>/<split>/split.json          format, image shape, classes, and each shard's rows and probe hash
    <clean>/<task>/<split>/index.csv           one row per image: source path, label, source sha256, shard, row
    <clean>/<task>/<split>/shard-00000.npy     an (n, H, W, C) uint8 .npy array, up to SHARD_BYTES

The images are already resized, so reading is a copy of the rows asked for: no decode, no TensorFlow.
Nothing here loads a split whole; `Split` carries labels, paths and the open shards, and hands out
images by index or batch. Checks on open catch a missing, truncated or foreign shard and an index
that disagrees with its shards, and name the file and the fix (rerun clean).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.core.errors import PipelineError

SPLITS = ("train", "val", "test")
# <task>/held_back: the train images the label budget (clean.target_train_per_class) left out, labels
# kept in the index but read by no labelled consumer; self-supervised pretraining uses them unlabelled.
HELD_BACK = "held_back"
FORMAT = "tlpipe-uint8-shards/1"
META_FILE = "split.json"
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("path", "label", "sha256", "shard", "row")
SHARD_BYTES = 256 * 2**20  # a few hundred MB: few files for DVC to hash
RERUN = "rerun the clean stage (`dvc repro clean` or `tlpipe stage clean`)"
# Images per prediction batch over a split (evaluation, validation, promotion scoring): Keras's own
# `predict` default. A batch's activations, not the split, set inference memory: 256 images of 96 px
# through simple_cnn held 1 GB more at the peak than 32 (docs/benchmarks-real.md), and at 224 px with
# a bigger backbone it would be several GB. Training's batch (32 by default) needs more than this.
PREDICT_BATCH = 32


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


def _probe(first: np.ndarray, last: np.ndarray) -> str:
    """A cheap content check of a shard: its first and last image hashed (catches a shard from elsewhere)."""
    return hashlib.sha256(np.ascontiguousarray(first).tobytes() + np.ascontiguousarray(last).tobytes()).hexdigest()


class SplitWriter:
    """Write one split image by image into shards; `close` writes the index and split.json last.

    Memory stays flat: each image goes straight to its shard file. The caller writes into a
    temporary folder (artifacts.atomic_dir), so a failed or killed write never replaces a split.
    """

    def __init__(self, folder: Path, classes: Iterable[str], shape: tuple[int, int, int], count: int,
                 shard_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.classes, self.shape, self.count = Path(folder), tuple(classes), tuple(shape), count
        self.per_shard = max(1, shard_bytes // int(np.prod(shape)))
        self.rows: list[tuple[str, str, str, int, int]] = []
        self.shards: list[dict[str, object]] = []
        self._handle = None
        self._first: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self.folder.mkdir(parents=True, exist_ok=True)

    def _open_shard(self) -> None:
        number = len(self.shards)
        rows = min(self.per_shard, self.count - len(self.rows))
        self._handle = open(self.folder / shard_name(number), "wb")
        np.lib.format.write_array_header_1_0(self._handle, {"descr": "|u1", "fortran_order": False,
                                                             "shape": (rows, *self.shape)})
        self.shards.append({"file": shard_name(number), "rows": rows})
        self._filled = 0

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        self.shards[-1]["probe"] = _probe(self._first, self._last)

    def add(self, pixels: np.ndarray, label: str, path: str, sha256: str) -> None:
        if len(self.rows) >= self.count:
            raise ValueError(f"{self.folder}: more than the {self.count} images announced")
        if label not in self.classes:
            raise ValueError(f"{path}: label {label!r} is not one of {self.classes}")
        pixels = np.asarray(pixels, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.shape != self.shape:
            raise ValueError(f"{path}: image shape {pixels.shape}, the split holds {self.shape}")
        if self._handle is None or self._filled == self.shards[-1]["rows"]:
            self._close_shard()
            self._open_shard()
            self._first = pixels
        self._handle.write(np.ascontiguousarray(pixels).tobytes())
        self._last = pixels
        self.rows.append((path, label, sha256, len(self.shards) - 1, self._filled))
        self._filled += 1

    def close(self) -> None:
        self._close_shard()
        if len(self.rows) != self.count:
            raise ValueError(f"{self.folder}: {len(self.rows)} images written, {self.count} announced")
        with open(self.folder / INDEX_FILE, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(INDEX_COLUMNS)
            writer.writerows(self.rows)
        meta = {"format": FORMAT, "shape": list(self.shape), "dtype": "uint8", "classes": list(self.classes),
                "images": self.count, "shards": self.shards}
        (self.folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is None:
            self.close()
        elif self._handle is not None:
            self._handle.close()


def write_split(folder: Path, classes: Iterable[str], images: np.ndarray, labels: Iterable[str],
                paths: Iterable[str] | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write in-memory images as a split (for small data and tests; clean streams through SplitWriter)."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    labels = list(labels)
    paths = list(paths) if paths is not None else [f"{label}/{i:06d}" for i, label in enumerate(labels)]
    with SplitWriter(folder, classes, images.shape[1:], len(images), shard_bytes) as writer:
        for pixels, label, path in zip(images, labels, paths):
            writer.add(pixels, label, path, hashlib.sha256(pixels.tobytes()).hexdigest())
    return Path(folder)


def class_names(clean_dir: Path, task: str) -> tuple[str, ...]:
    path = Path(clean_dir) / task / "classes.json"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the clean stage first (dvc repro clean)")
    return tuple(json.loads(path.read_text()))


@dataclass(frozen=True)
class Shard:
    path: Path
    rows: int
    start: int  # the split position of its first row
    offset: int  # bytes before its first row (the .npy header)


@dataclass(frozen=True, eq=False)
class Split:
    """One split of one task, on disk: labels, source paths and hashes in memory, pixels read on demand."""

    folder: Path
    classes: tuple[str, ...]
    y: np.ndarray  # int32 label per image, in split order
    paths: tuple[str, ...]  # the source file of each image (relative to paths.raw), for lineage and reports
    sha256: tuple[str, ...]  # the source file's sha256, as the manifest has it
    shape: tuple[int, int, int]  # H, W, C
    shards: tuple[Shard, ...]
    _files: dict[int, int] = field(default_factory=dict, repr=False)  # shard number -> open descriptor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.shape))

    def _file(self, number: int) -> int:
        descriptor = self._files.get(number)
        if descriptor is None:
            descriptor = self._files[number] = os.open(self.shards[number].path, os.O_RDONLY)
            weakref.finalize(self, os.close, descriptor)
        return descriptor

    def images(self, indices: np.ndarray | Iterable[int]) -> np.ndarray:
        """The images at these split positions, in that order: a copy, reading only those rows.

        Positional reads (pread) straight into the batch, not a memory map: mapped pages would count
        in the process's resident memory and grow it to the split's size over an epoch. Runs of
        consecutive positions (in-order batches) are one read.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        if not len(indices):
            return out
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"split positions must be in [0, {len(self)})")
        row_bytes = int(np.prod(self.shape))
        starts = np.asarray([s.start for s in self.shards])
        owner = np.searchsorted(starts, indices, side="right") - 1
        flat = out.reshape(len(indices), row_bytes)
        run = 0
        for i in range(1, len(indices) + 1):
            if i < len(indices) and owner[i] == owner[run] and indices[i] == indices[i - 1] + 1:
                continue
            number = int(owner[run])
            offset = self.shards[number].offset + int(indices[run] - starts[number]) * row_bytes
            wanted = (i - run) * row_bytes
            if os.preadv(self._file(number), [memoryview(flat[run:i]).cast("B")], offset) != wanted:
                raise PipelineError(f"shard {self.shards[number].path} ended early: truncated since it was opened; "
                                    f"{RERUN}")
            run = i
        return out

    def batch(self, start: int, stop: int) -> np.ndarray:
        return self.images(np.arange(start, min(stop, len(self))))

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) in split order, `batch_size` at a time (the last one may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(start, start + batch_size), self.y[start : start + batch_size]

    def spread(self, count: int) -> np.ndarray:
        """`count` split positions spaced evenly over the split (it is sorted by class: every class shows)."""
        return np.unique(np.linspace(0, len(self) - 1, min(count, len(self))).round().astype(np.int64))

    def fingerprint(self) -> str:
        """What identifies the split's content cheaply: its index and its shards' probe hashes."""
        digest = hashlib.sha256()
        digest.update((self.folder / INDEX_FILE).read_bytes())
        digest.update((self.folder / META_FILE).read_bytes())
        return digest.hexdigest()


def _legacy(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and any(p.glob("*.png")) for p in root.iterdir())


def load_split(clean_dir: Path, task: str, split: str) -> Split:
    """Open data/clean/<task>/<split>: read its index, check its shards, load no pixels."""
    classes = class_names(clean_dir, task)
    root = Path(clean_dir) / task / split
    meta_path = root / META_FILE
    if not meta_path.is_file():
        if _legacy(root):
            raise PipelineError(f"{root} holds PNG folders, the split format of an older tlpipe: {RERUN}")
        raise PipelineError(f"{meta_path} not found: {RERUN}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise PipelineError(f"{meta_path} is not valid JSON ({error}): {RERUN}") from None
    if meta.get("format") != FORMAT:
        raise PipelineError(f"{meta_path} is format {meta.get('format')!r}, this tlpipe reads {FORMAT!r}: {RERUN}")
    if tuple(meta["classes"]) != classes:
        raise PipelineError(f"{meta_path} lists classes {meta['classes']}, {root.parent / 'classes.json'} "
                            f"{list(classes)}: {RERUN}")
    shape = tuple(int(n) for n in meta["shape"])
    shards, start = [], 0
    for number, entry in enumerate(meta["shards"]):
        path = root / entry["file"]
        offset = _check_shard(path, int(entry["rows"]), shape, entry.get("probe", ""))
        shards.append(Shard(path, int(entry["rows"]), start, offset))
        start += int(entry["rows"])
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise PipelineError(f"{index_path} not found: {RERUN}")
    with open(index_path, newline="") as handle:
        reader = csv.reader(handle)
        if tuple(next(reader, ())) != INDEX_COLUMNS:
            raise PipelineError(f"{index_path} lacks the columns {list(INDEX_COLUMNS)}: {RERUN}")
        rows = list(reader)
    label_of = {name: number for number, name in enumerate(classes)}
    expected = [(number, row) for number, shard in enumerate(shards) for row in range(shard.rows)]
    try:
        found = [(int(r[3]), int(r[4])) for r in rows]
        labels = np.asarray([label_of[r[1]] for r in rows], dtype=np.int32)
    except (IndexError, ValueError, KeyError) as error:
        raise PipelineError(f"{index_path} has a malformed row ({error!r}): {RERUN}") from None
    if found != expected or start != meta.get("images"):
        raise PipelineError(f"{index_path} lists {len(rows)} images but the shards of {root} hold {start}, or in "
                            f"another order: the index disagrees with its shards; {RERUN}")
    if not rows:
        raise PipelineError(f"no images in {root}: {RERUN}, or check the data")
    return Split(root, classes, labels, tuple(r[0] for r in rows), tuple(r[2] for r in rows), shape, tuple(shards))


def _check_shard(path: Path, rows: int, shape: tuple[int, ...], probe: str) -> int:
    """Header, size and probe hash against split.json: cheap (two images read), and enough to refuse
    a missing, truncated or foreign shard before an epoch silently comes up short. Returns the
    offset of the first row."""
    if not path.is_file():
        raise PipelineError(f"shard {path} is missing: {RERUN}")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header = read(handle)
            offset = handle.tell()
    except (ValueError, OSError, SyntaxError) as error:
        raise PipelineError(f"shard {path} is not a tlpipe shard ({error}): {RERUN}") from None
    got_shape, fortran, dtype = header
    if dtype != np.uint8 or fortran or tuple(got_shape) != (rows, *shape):
        raise PipelineError(f"shard {path} holds {dtype} {tuple(got_shape)}, split.json says uint8 "
                            f"{(rows, *shape)}: a foreign shard; {RERUN}")
    size, wanted = os.path.getsize(path), offset + rows * int(np.prod(shape))
    if size != wanted:
        raise PipelineError(f"shard {path} is {size} bytes, {wanted} expected: truncated or damaged; {RERUN}")
    row_bytes = int(np.prod(shape))
    with open(path, "rb") as handle:
        first = os.pread(handle.fileno(), row_bytes, offset)
        last = os.pread(handle.fileno(), row_bytes, offset + (rows - 1) * row_bytes)
    if probe != hashlib.sha256(first + last).hexdigest():
        raise PipelineError(f"shard {path} does not hold the images split.json describes (probe hash differs): "
                            f"a foreign shard; {RERUN}")
    return offset
