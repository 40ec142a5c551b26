"""Atomic writes: a killed run never leaves a half-written file that DVC or a later stage would trust."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    return Path(name)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file next to `path`; it replaces `path` only if the block succeeds.

    The temporary name keeps `path`'s suffix, for writers that check it (Keras wants `.keras`).
    """
    path = Path(path)
    temp = _temp_sibling(path, suffix=path.suffix)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; it replaces `path` whole if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield temp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
