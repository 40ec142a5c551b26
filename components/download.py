"""Fetch pinned weight files: sha256-checked, retried on transient errors, cached atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from components.artifacts import atomic_path
from components.errors import PipelineError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRY_DELAYS = (1.0, 3.0, 9.0)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def _download(url: str, target: Path, expected: str) -> None:
    """Stream `url` into `target`, hashing as it goes; a mismatch leaves nothing behind."""
    digest = hashlib.sha256()
    with atomic_path(target) as temp:
        with urllib.request.urlopen(url, timeout=30) as response, open(temp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    log.info("downloading %s: %d%% of %.1f MB", url, 100 * done // total, total / 1e6)
                    next_report += 0.1
        actual = digest.hexdigest()
        if actual != expected:
            raise PipelineError(
                f"sha256 mismatch for {url}: expected {expected}, got {actual}; the file changed or is "
                "corrupt, so it was not kept. Check the URL, or pin the new digest in source.sha256"
            )


def fetch(location: str, sha256: str, cache_dir: Path) -> Path:
    """A verified local copy of `location` (a path or an http(s) URL) whose sha256 must equal `sha256`."""
    expected = sha256.lower()
    if not is_url(location):
        path = Path(location)
        if not path.is_file():
            raise PipelineError(f"weights file {path} not found: fix source.weights")
        actual = sha256_of(path)
        if actual != expected:
            raise PipelineError(f"sha256 mismatch for {path}: expected {expected}, got {actual}; fix source.sha256")
        return path
    name = Path(urlparse(location).path).name or "weights"
    cached = Path(cache_dir) / f"{expected[:16]}-{name}"
    if cached.is_file() and sha256_of(cached) == expected:
        log.info("using cached %s", cached)
        return cached
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            _download(location, cached, expected)
            return cached
        except urllib.error.HTTPError as error:
            if error.code < 500:  # a missing or forbidden file will not appear on retry
                raise PipelineError(f"cannot download {location}: HTTP {error.code} {error.reason}") from None
            problem = f"HTTP {error.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            problem = str(getattr(error, "reason", error))
        if delay is None:
            raise PipelineError(
                f"cannot download {location} after {attempt} tries ({problem}); check the network or "
                f"place the file at {cached} (sha256 {expected})"
            )
        log.warning("download of %s failed (%s); retrying in %.0f s", location, problem, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def cache_dir_from(setting: str) -> Path:
    return Path(os.path.expanduser(setting))
