"""Fetch pinned weight files: digest-checked, retried on transient errors, cached atomically.

Keras Applications ImageNet weights come through here too (not Keras's own downloader), so a
mirror, the retries, the offline message and the cache are the same for every download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from components.core.artifacts import atomic_path
from components.core.errors import PipelineError
from components.training.backbones import BACKBONES

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRY_DELAYS = (1.0, 3.0, 9.0)


def sha256_of(path: Path) -> str:
    return digest_of(path, "sha256")


def digest_of(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def _download(url: str, target: Path, expected: str, algorithm: str, pin_key: str) -> None:
    """Stream `url` into `target`, hashing as it goes; a mismatch leaves nothing behind."""
    digest = hashlib.new(algorithm)
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
                f"{algorithm} mismatch for {url}: expected {expected}, got {actual}; the file changed or is "
                f"corrupt, so it was not kept. Check the URL, or pin the new digest in {pin_key}"
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
    return _fetch_url(location, Path(cache_dir) / f"{expected[:16]}-{name}", expected, "sha256", "source.sha256")


def imagenet_weights(backbone: str) -> tuple[str, str]:
    """(file under the mirror, Keras's md5) of a backbone's ImageNet weights, from the backbone registry."""
    spec = BACKBONES.get(backbone)
    if spec is None or spec.imagenet_file is None or spec.imagenet_md5 is None:
        published = sorted(name for name, b in BACKBONES.items() if b.imagenet_file)
        raise PipelineError(f"no ImageNet weights for backbone {backbone}; choose one of {published}")
    return spec.imagenet_file, spec.imagenet_md5


def imagenet_cache_path(backbone: str, cache_dir: Path) -> Path:
    """Where a backbone's ImageNet weights lie in the cache (placed there by hand on offline machines)."""
    return Path(cache_dir) / "imagenet" / Path(imagenet_weights(backbone)[0]).name


def fetch_imagenet(backbone: str, mirror: str, sha256: str, cache_dir: Path) -> Path:
    """The ImageNet weights (no top) of a Keras Applications backbone, from `mirror` or the cache.

    Checked against `sha256` when given (a private mirror may re-host other bytes), else against
    Keras's published md5. A file placed in the cache by hand (offline machines) is used as is
    once its digest checks.
    """
    relative, md5 = imagenet_weights(backbone)
    expected, algorithm = (sha256.lower(), "sha256") if sha256 else (md5, "md5")
    url = f"{mirror.rstrip('/')}/{relative}"
    return _fetch_url(url, imagenet_cache_path(backbone, cache_dir), expected, algorithm, "source.sha256")


def _fetch_url(url: str, cached: Path, expected: str, algorithm: str, pin_key: str) -> Path:
    if cached.is_file() and digest_of(cached, algorithm) == expected:
        log.info("using cached %s", cached)
        return cached
    attempts = len(RETRY_DELAYS) + 1
    for attempt in range(1, attempts + 1):
        try:
            _download(url, cached, expected, algorithm, pin_key)
            return cached
        except urllib.error.HTTPError as error:
            if error.code < 500:  # a missing or forbidden file will not appear on retry
                raise PipelineError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
            problem = f"HTTP {error.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            problem = str(getattr(error, "reason", error))
        if attempt < attempts:
            delay = RETRY_DELAYS[attempt - 1]
            log.warning("download of %s failed (%s); retrying in %.0f s", url, problem, delay)
            time.sleep(delay)
    raise PipelineError(
        f"cannot download {url} after {attempts} tries ({problem}); check the network, or "
        f"place the file at {cached} ({algorithm} {expected})"
    )


def cache_dir_from(setting: str) -> Path:
    return Path(os.path.expanduser(setting))
