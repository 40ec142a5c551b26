"""Image folders and image IO shared by ingest, validate and clean: listing, inspection, normalization."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, ImageStat

from components.data.raw_pack import read_at

# The two tasks the pipeline reads, each a class-per-subfolder tree under paths.raw.
TASKS: tuple[str, ...] = ("source", "target")

# What Keras' image_dataset_from_directory and Pillow both read; compared lowercased.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Per-image colour statistics (of the RGB rendering, 0..255) that the drift check aggregates.
STAT_COLUMNS: tuple[str, ...] = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")

# Columns of the manifest validate writes and clean reads, in order. `error` is why clean must
# quarantine the file ("" when usable); `dhash` is its 64-bit perceptual hash, in hex.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "task", "path", "label", "width", "height", "mode", "bytes", "sha256", "decodable", "error", "dhash",
    *STAT_COLUMNS,
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}

# 16-bit value -> 8-bit, rounded: the same numbers as rint(x / 257), without a float copy of the image.
_SIXTEEN_TO_EIGHT = np.clip(np.rint(np.arange(65536) / 257.0), 0, 255).astype(np.uint8)
_BLOCK_PIXELS = 1 << 20  # float work on other modes goes a block of rows at a time, so its copies stay small


class ImageTooLarge(ValueError):
    """An image refused from its header, before any pixel is decoded; the message says why."""

    def __init__(self, message: str, header: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.header = header or {}  # width, height and mode, when Pillow read the header


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Bytes Pillow allocates to decode an image: 1 per pixel for 1/L/P, 2 for 16-bit, else 4."""
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode in _SIXTEEN_BIT_MODES else 4
    return width * height * per_pixel


@contextlib.contextmanager
def open_guarded(
    source: Path | IO[bytes], max_pixels: int, max_bytes: int | None = None, setting: str = "max_pixels"
) -> Iterator[Image.Image]:
    """Image.open (which reads the header only), refusing a decompression bomb before any decoding.

    Raises ImageTooLarge past `max_pixels` pixels or `max_bytes` decoded bytes (`setting` names the
    limit in the message, e.g. "validate.max_pixels"), and for Pillow's own bomb limit. Every other
    open error (not an image, corrupt header) propagates as Pillow raised it.
    """
    with warnings.catch_warnings():
        # Pillow warns (and past twice its limit, refuses) on huge images; our own limit decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(f"decompression bomb: {error}") from None
    with image:
        header = {"width": image.width, "height": image.height, "mode": image.mode}
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise ImageTooLarge(
                f"decompression bomb: {image.width}x{image.height} = {pixels} pixels, over {setting}={max_pixels}",
                header,
            )
        size = decoded_bytes(image.width, image.height, image.mode)
        if max_bytes is not None and size > max_bytes:
            raise ImageTooLarge(
                f"decompression bomb: {image.width}x{image.height} {image.mode} decodes to {size} bytes, "
                f"over the limit of {max_bytes}",
                header,
            )
        yield image


def is_image_name(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def class_folders(root: Path) -> list[str]:
    """Names of the class subfolders of `root`, string-sorted (the order Keras gives class indices)."""
    return sorted(entry.name for entry in Path(root).iterdir() if entry.is_dir())


def list_class_images(root: Path, *, every_file: bool = False) -> list[tuple[str, str]]:
    """(path relative to `root` in posix form, class name) for the images in a class-per-subfolder tree.

    The class is the first-level subfolder; deeper folders belong to it. Files directly in `root`
    belong to no class and are not listed. With `every_file`, files of any suffix are listed too,
    so callers that must account for every file (ingest, the manifest) skip nothing.
    """
    # Strings, not Path objects: ingest lists your folders on every run, and at 40,000 files pathlib's
    # parsing was most of a no-op ingest (docs/benchmarks-real.md).
    top = os.path.join(os.fspath(root), "")
    found: list[tuple[str, str]] = []
    for label in class_folders(root):
        unlisted: list[str] = []
        for folder, dirs, files in os.walk(top + label, onerror=lambda error: unlisted.append(error.filename)):
            # os.walk does not follow linked folders; listing them lets ingest say so instead of losing them.
            links = [name for name in dirs if every_file and os.path.islink(os.path.join(folder, name))]
            prefix = folder[len(top):].replace(os.sep, "/") + "/"
            found += [(prefix + name, label) for name in [*files, *links] if every_file or is_image_name(name)]
        if every_file:  # a folder that cannot be listed is an entry too: ingest quarantines it with its reason
            found += [(Path(name).relative_to(root).as_posix(), label) for name in unlisted]
    return sorted(found)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dhash(image: Image.Image) -> str:
    """64-bit difference hash: is each pixel of a 9x8 grey thumbnail brighter than its left neighbour.

    Robust to resizing, recompression and small brightness changes, so near-duplicates land within
    a few bits of each other (Hamming distance).
    """
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _channel_stats(image: Image.Image, side: int = 256) -> dict[str, float]:
    """Per-channel mean and std of the RGB rendering, on a copy at most `side` pixels wide and tall
    (a photo's full-size float copy would cost gigabytes; drift compares like with like)."""
    rgb = _as_rgb(image)
    if max(rgb.size) > side:
        rgb.thumbnail((side, side), Image.Resampling.BOX)
    # From each channel's 256-bin histogram (computed in C): the same numbers as numpy's float64 mean
    # and std of the pixels, at a fifth of validate's per-image cost (docs/benchmarks-real.md, round 5).
    stats = ImageStat.Stat(rgb)
    return {**{f"mean_{c}": round(float(m), 3) for c, m in zip("rgb", stats.mean)},
            **{f"std_{c}": round(float(v), 3) for c, v in zip("rgb", stats.stddev)}}


# (pack file, offset, length, file name): one file of paths.raw for an inspecting worker.
PackedFile = tuple[str, int, int, str]


def _inspect_packed(job: PackedFile, max_pixels: int, min_side: int, max_side: int) -> dict[str, Any]:
    pack, offset, length, name = job
    return inspect_image(name, read_at(pack, offset, length), max_pixels, min_side, max_side)


def inspect_files(jobs: Iterable[PackedFile], max_pixels: int, min_side: int, max_side: int, workers: int,
                  chunk: int = 32) -> Iterator[dict[str, Any]]:
    """`inspect_image` of each packed file, in order, in `workers` processes (<= 1: here).

    Jobs are taken a bounded batch at a time (Pool.imap alone would queue all of them), so memory
    stays flat however many files there are.
    """
    work = functools.partial(_inspect_packed, max_pixels=max_pixels, min_side=min_side, max_side=max_side)
    # spawn, not fork: forking a process that has loaded TensorFlow or opened threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        yield from ordered_map(work, jobs, pool, chunk)


def ordered_map(work: Callable[[Any], Any], jobs: Iterable[Any], pool: Pool | None, chunk: int) -> Iterator[Any]:
    """`work` of each job, in order, in `pool` (None: here), taking jobs `chunk * 8` at a time: Pool.imap
    alone would queue every job at once, and its results would wait in memory for a slow reader."""
    if pool is None:
        yield from map(work, jobs)
        return
    jobs = iter(jobs)
    while batch := list(itertools.islice(jobs, chunk * 8)):
        yield from pool.imap(work, batch, chunksize=chunk)


def inspect_image(name: str, data: bytes, max_pixels: int, min_side: int, max_side: int) -> dict[str, Any]:
    """Header facts, hash, whether the bytes fully decode, and why the file is unusable; never raises.

    `name` is the file's name (its suffix is checked). Keys: MANIFEST_COLUMNS less task, path and
    label. `error` starts with a fixed category ("zero-byte file", "not an image", "truncated image",
    "corrupt image", "decompression bomb", "too small", "too large") and is "" for a usable image.
    """
    path = Path(name)
    facts: dict[str, Any] = {
        "width": None, "height": None, "mode": None, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "decodable": False, "error": "", "dhash": "", **{c: None for c in STAT_COLUMNS},
    }
    if facts["bytes"] == 0:
        facts["error"] = "zero-byte file"
        return facts
    if not is_image_name(path):
        expected = ", ".join(sorted(IMAGE_SUFFIXES))
        facts["error"] = f"not an image: file name suffix '{path.suffix}' (expected one of {expected})"
        return facts
    try:
        with open_guarded(io.BytesIO(data), max_pixels, setting="validate.max_pixels") as image:
            facts.update(width=image.width, height=image.height, mode=image.mode)
            image.load()  # the full decode: catches truncated and corrupt data
            facts["dhash"] = dhash(image)
            facts.update(_channel_stats(image))
    except ImageTooLarge as error:
        facts.update(error.header, error=str(error))
        return facts
    except Image.UnidentifiedImageError:
        facts["error"] = "not an image: Pillow cannot identify the file's format"
        return facts
    except Exception as error:  # Pillow raises many types for bad files; each is "undecodable"
        message = f"{type(error).__name__}: {error}"
        kind = "truncated image" if "truncated" in message.lower() else "corrupt image"
        facts["error"] = f"{kind}: {message}"
        return facts
    facts["decodable"] = True
    width, height = facts["width"], facts["height"]
    if min(width, height) < min_side:
        facts["error"] = f"too small: {width}x{height}, a side below validate.min_side={min_side}"
    elif max(width, height) > max_side:
        facts["error"] = f"too large: {width}x{height}, a side above validate.max_side={max_side}"
    return facts


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float single-channel modes as 8-bit "L", scaled rather than clipped.

    A strip of rows at a time, so no copy of the whole image is made besides the 8-bit result (a
    float64 copy of a 6300x6300 16-bit PNG alone is 320 MB); 16-bit modes go through a lookup table.
    """
    width, height = image.size
    rows = max(1, _BLOCK_PIXELS // max(1, width))

    def strips() -> Iterator[tuple[int, np.ndarray]]:
        for top in range(0, height, rows):
            yield top, np.asarray(image.crop((0, top, width, min(height, top + rows))))

    out = np.empty((height, width), dtype=np.uint8)
    if image.mode in _SIXTEEN_BIT_MODES:
        for top, strip in strips():
            out[top : top + rows] = _SIXTEEN_TO_EIGHT[strip]
        return Image.fromarray(out, mode="L")
    peak = np.max([strip.max() for _, strip in strips()]) if width and height else 0
    if image.mode == "F" and width and height and peak <= 1.0:
        scale = 255.0  # float images in [0, 1]
    elif width and height and peak > 255:
        # Mode "I" holds 16-bit PNGs on some Pillow versions; beyond that range, stretch to the max.
        scale = 1 / 257.0 if peak <= 65535 else 255.0 / peak
    else:
        scale = 1.0
    for top, strip in strips():
        values = strip.astype(np.float64)
        out[top : top + rows] = np.clip(np.rint(values * scale if scale != 1.0 else values), 0, 255)
    return Image.fromarray(out, mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency on white, so transparent pixels do not turn black."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _as_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit "L" or "RGB": 16-bit scaled, transparency on white, CMYK/palette converted."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _to_8bit(image)
    if image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _on_white(image)
    if image.mode not in ("L", "RGB"):
        return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P and 1 all have a defined RGB conversion
    return image


def _as_rgb(image: Image.Image) -> Image.Image:
    return _as_l_or_rgb(image).convert("RGB")


def load_normalized(path: Path | IO[bytes], size: int, pil_mode: str) -> Image.Image:
    """The image as the model sees it: upright, `pil_mode` ("L" or "RGB"), `size` x `size` pixels."""
    with Image.open(path) as opened:
        return normalize(opened, size, pil_mode)


def normalize(opened: Image.Image, size: int, pil_mode: str) -> Image.Image:
    """`load_normalized` of an image already opened (e.g. by `open_guarded`); returns a new image."""
    if pil_mode not in ("L", "RGB"):
        raise ValueError(f"pil_mode must be 'L' or 'RGB', not {pil_mode!r}")
    opened.draft(None, (size, size))  # JPEG only: decode at a reduced scale, never below `size`
    opened.load()
    ImageOps.exif_transpose(opened, in_place=True)  # phone photos store rotation in EXIF; no copy
    image = _as_l_or_rgb(opened).convert(pil_mode)  # a new image even when the mode is already right
    if image.size != (size, size):
        # Downscaling with Pillow's BILINEAR filter averages over the whole footprint (area-like).
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


# (source file, its expected sha256, destination PNG): one unit of clean's decode-and-resize work.
Job = tuple[Path, str, Path]


def _normalize_one(job: Job, size: int, pil_mode: str) -> str:
    """Write one normalized PNG; return the source path if its bytes no longer match the hash, else ""."""
    source, sha256, dest = job
    data = Path(source).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        return str(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    load_normalized(io.BytesIO(data), size, pil_mode).save(dest)
    return ""


def normalize_files(jobs: Iterable[Job], size: int, pil_mode: str, workers: int, chunk: int = 64) -> list[str]:
    """Decode, normalize and write every job, in `workers` processes; return sources that changed on disk.

    Streaming: jobs are taken from the iterable a bounded batch at a time (Pool.imap alone would
    queue all of them at once) and each worker holds one image at a time, so memory stays flat
    however many images there are. `workers` <= 1 runs in this process (no start-up cost).
    """
    work = functools.partial(_normalize_one, size=size, pil_mode=pil_mode)
    if workers <= 1:
        return [bad for bad in map(work, jobs) if bad]
    changed: list[str] = []
    jobs = iter(jobs)
    # spawn, not fork: forking a process that has loaded TensorFlow or opened threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        while batch := list(itertools.islice(jobs, workers * chunk * 8)):
            changed += [bad for bad in pool.imap_unordered(work, batch, chunksize=chunk) if bad]
    return changed


def workers_for(setting: int, images: int, per_worker: int = 500) -> int:
    """Processes worth starting: `setting` (0 = one per core), but none beyond one per `per_worker` images."""
    cores = setting or os.cpu_count() or 1
    return max(1, min(cores, images // per_worker))
