"""paths.raw/<task>/ as packs: the task's files, byte for byte, in uncompressed tar archives of bounded
size, with an index naming each file.

Why not a file per image: DVC stats and looks up every file of a tracked folder each time it checks
it, and a no-op `dvc repro` checks data/raw four times (at 40,000 images, 7-18 s; docs/benchmarks-real.md).
A pack holds PACK_BYTES of images, so DVC sees a handful of files whatever the count. Tar because
any machine reads it (`tar -xf data/raw/target/pack-00000.tar` gives the files back) and it keeps
bytes and names exactly; ingest writes it deterministically (no times, owners or modes), so the same
images give the same packs and the same DVC hash on every machine.

The index (INDEX_FILE) has one row per file: its path under the task ("<class>/<path under the
class folder>", the name the manifest, quarantine, lineage and the report use), class, pack
number, the byte offset and length of its data in that pack, and its sha256. CLASSES_FILE lists
every class folder, empty ones too (validate reports those). Readers take a file's bytes by offset
(`os.pread`), never extracting the archive.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from components.core.errors import PipelineError

PACK_BYTES = 256 << 20  # a few hundred MB a file, as TFDS and WebDataset shard
INDEX_FILE = "index.csv"
CLASSES_FILE = "classes.json"
INDEX_COLUMNS = ("path", "label", "pack", "offset", "bytes", "sha256")
_RERUN = "rerun `tlpipe stage ingest` (or `dvc repro ingest`) to rewrite it"


def pack_name(number: int) -> str:
    return f"pack-{number:05d}.tar"


@dataclass(frozen=True)
class Member:
    """One file of a task: where its bytes are and what they hash to."""
    path: str
    label: str
    pack: int
    offset: int
    size: int
    sha256: str


class PackWriter:
    """Streams files into folder/pack-NNNNN.tar, then writes the index and the class list on close.

    The caller writes into a temporary folder (artifacts.atomic_dir), so a failed or killed ingest
    never replaces the packs in place. Memory: one file's bytes at a time.
    """

    def __init__(self, folder: Path, pack_bytes: int = PACK_BYTES) -> None:
        self.folder, self.pack_bytes = Path(folder), pack_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.classes: set[str] = set()
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_pack = 0
        self._packs = 0
        # Rows go to the index as files come (in the order added), so memory stays flat at any count.
        self._index = open(self.folder / INDEX_FILE, "w", newline="", encoding="utf-8")
        self._rows = csv.writer(self._index, lineterminator="\n")
        self._rows.writerow(INDEX_COLUMNS)

    def add_class(self, label: str) -> None:
        self.classes.add(label)

    def add(self, path: str, label: str, data: bytes) -> Member:
        if self._tar is None or (self._in_pack and self._tar.offset + len(data) > self.pack_bytes):
            self._close_pack()
            # PAX: long and non-ASCII names kept exactly; no user, group or time, so packs are reproducible.
            self._tar = tarfile.open(self.folder / pack_name(self._packs), "w", format=tarfile.PAX_FORMAT)
            self._packs += 1
        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))
        self._tar.members.clear()  # tarfile keeps every header for getmembers(); a writer never asks
        # The data ends the archive so far, padded to tar's 512-byte blocks (addfile sets the offset on a copy of info).
        offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        member = Member(path, label, self._packs - 1, offset, len(data), hashlib.sha256(data).hexdigest())
        self._rows.writerow((member.path, member.label, member.pack, member.offset, member.size, member.sha256))
        self._in_pack += 1
        self.count += 1
        self.classes.add(label)
        return member

    def _close_pack(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar, self._in_pack = None, 0

    def close(self) -> None:
        self._close_pack()
        self._index.close()
        (self.folder / CLASSES_FILE).write_text(json.dumps(sorted(self.classes)) + "\n", encoding="utf-8")

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is None:
            self.close()
        else:
            self._close_pack()
            self._index.close()


def is_packed(folder: Path) -> bool:
    return (Path(folder) / INDEX_FILE).is_file()


def _check_layout(folder: Path) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder} not found; run `tlpipe stage ingest` first")
    if not is_packed(folder) or not (folder / CLASSES_FILE).is_file():
        older = any(p.is_dir() for p in folder.iterdir())
        why = "holds a file per image, the layout of an older tlpipe" if older else f"has no {INDEX_FILE}"
        raise PipelineError(f"{folder} {why}; {_RERUN}")


def classes(folder: Path) -> list[str]:
    """Every class folder ingest found for this task, empty ones included, string-sorted."""
    _check_layout(folder)
    try:
        names = json.loads((Path(folder) / CLASSES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PipelineError(f"{Path(folder) / CLASSES_FILE} cannot be read ({error}); {_RERUN}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PipelineError(f"{Path(folder) / CLASSES_FILE} is not a list of class names; {_RERUN}")
    return sorted(names)


def members(folder: Path) -> Iterator[Member]:
    """The index's rows, in the order ingest added them, streamed (a million rows are never all in memory here).

    Each pack the index names must exist and hold the bytes it points to; a missing or short pack
    or a malformed row is an error naming the file, never a file silently left out.
    """
    folder = Path(folder)
    _check_layout(folder)
    sizes: dict[int, int] = {}
    with open(folder / INDEX_FILE, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        if tuple(next(reader, ())) != INDEX_COLUMNS:
            raise PipelineError(f"{folder / INDEX_FILE} does not start with the columns {','.join(INDEX_COLUMNS)}; {_RERUN}")
        for line, row in enumerate(reader, start=2):
            try:
                path, label, pack, offset, size, sha256 = row
                member = Member(path, label, int(pack), int(offset), int(size), sha256)
            except ValueError:
                raise PipelineError(f"{folder / INDEX_FILE}, line {line}: malformed row {row!r}; {_RERUN}") from None
            if member.pack not in sizes:
                try:
                    sizes[member.pack] = (folder / pack_name(member.pack)).stat().st_size
                except OSError:
                    raise PipelineError(f"{folder / pack_name(member.pack)} is missing (the index names it); "
                                        f"{_RERUN}") from None
            if member.offset < 0 or member.size < 0 or member.offset + member.size > sizes[member.pack]:
                raise PipelineError(f"{folder / pack_name(member.pack)} is shorter than the index says "
                                    f"({member.path} ends at byte {member.offset + member.size}); {_RERUN}")
            yield member


def read_at(pack: Path | str, offset: int, size: int) -> bytes:
    """`size` bytes of a pack from `offset`; a plain function of plain values, so worker processes can run it."""
    descriptor = os.open(pack, os.O_RDONLY)
    try:
        data = os.pread(descriptor, size, offset)
    finally:
        os.close(descriptor)
    if len(data) != size:
        raise PipelineError(f"{pack}: {size} bytes expected at byte {offset}, {len(data)} read; {_RERUN}")
    return data


def read(folder: Path, member: Member) -> bytes:
    return read_at(Path(folder) / pack_name(member.pack), member.offset, member.size)


def read_paths(folder: Path, paths: Iterable[str]) -> dict[str, bytes]:
    """The bytes of the named files (paths under the task); names not in the index are left out."""
    wanted = set(paths)
    if not wanted:
        return {}
    return {m.path: read(folder, m) for m in members(folder) if m.path in wanted}


def digest(folder: Path) -> str:
    """sha256 of the index and the class list: it covers every file's name, class and content hash."""
    hasher = hashlib.sha256()
    for name in (CLASSES_FILE, INDEX_FILE):
        hasher.update((Path(folder) / name).read_bytes())
    return hasher.hexdigest()
