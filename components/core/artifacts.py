"""Atomic writes: a killed run never leaves a half-written file that DVC or a later stage would trust.

Every temporary is named `.<output>.<pid>-<random>.tmp` (or `.old`) beside its output, so the next
writer of that output removes what a killed process left (`sweep_temporaries`). Every folder
written here holds OWNER_MARKER: only such a folder (or an empty one) is ever replaced, so an
output path pointed at a user's own folder is refused instead of deleting their files.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.core.errors import PipelineError

log = logging.getLogger(__name__)

# Inside every folder atomic_dir writes; its content never changes, so DVC hashes stay stable.
OWNER_MARKER = ".tlpipe-output"
_MARKER_TEXT = "Written by tlpipe: the next run replaces this folder whole. Keep your own files elsewhere.\n"


class ForeignOutputError(PipelineError):
    """An output path holds a folder (or file) tlpipe did not write: replacing it would delete the user's data."""

    def __init__(self, path: Path, key: str = "") -> None:
        self.path, self.key = Path(path), key
        named = f"paths.{key} = {path}" if key else str(path)
        super().__init__(
            f"{named} already exists and was not written by tlpipe (no {OWNER_MARKER} inside), so tlpipe will "
            f"not replace it and delete what is there: point {f'paths.{key}' if key else 'that output path'} at "
            f"a new folder in params.yaml; if it is an output of an earlier tlpipe version, remove it "
            f"(rm -r '{path}') and rerun")


@functools.cache
def _umask() -> int:
    # Reading the umask means setting it for an instant; do that once per process.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _temp_pattern(name: str) -> re.Pattern[str]:
    """Names of the temporaries of output `name` (any output: ""), as tempfile makes them here or made them before."""
    output = re.escape(name) if name else ".+?"
    return re.compile(rf"^\.{output}\.(?:(?P<pid>\d+)-)?[a-z0-9_]{{8}}\.(?:tmp|old)(?:\.\w+)?$")


def sweep_temporaries(folder: Path, name: str = "") -> list[Path]:
    """Remove the temporaries that killed writers left in `folder` for output `name` (of any output: "").

    A temporary whose writer still runs is left alone; one without a pid in its name was left by an
    earlier tlpipe version. Returns the removed paths.
    """
    pattern = _temp_pattern(name)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match:
            continue
        pid = match["pid"]
        if pid is not None and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by a killed run in %s", len(removed), folder)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def temp_dir(path: Path) -> Path:
    """A new empty folder named as a temporary of `path` (beside it), after sweeping stale ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, path.name)
    temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(temp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should read like any other folder
    return temp


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, path.name)
    handle, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any other file
    return Path(name)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file next to `path`; it replaces `path` only if the block succeeds.

    The temporary name keeps `path`'s suffix, for writers that check it (Keras wants `.keras`).
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise PipelineError(f"{path} is a folder where tlpipe writes a file: point that output path at a file name")
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


def read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, with libyaml's C parser (every stage reads dvc.yaml and params at start:
    the pure-Python parser was a tenth of a no-op ingest)."""
    import yaml

    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def owned(path: Path) -> bool:
    """Whether tlpipe may replace `path`: absent, an empty folder, or a folder holding OWNER_MARKER."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / OWNER_MARKER).is_file() or not any(path.iterdir())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; it replaces `path` whole if the block succeeds.

    Refuses (ForeignOutputError) before any work when `path` is a folder tlpipe did not write.
    """
    path = Path(path)
    if not owned(path):
        raise ForeignOutputError(path)
    temp = temp_dir(path)
    try:
        (temp / OWNER_MARKER).write_text(_MARKER_TEXT)
        yield temp
        if os.path.lexists(path):
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
