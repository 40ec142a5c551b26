"""Image folders and image IO shared by ingest, validate and clean: listing, inspection, normalization."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

# The two tasks the pipeline reads, each a class-per-subfolder tree under paths.raw.
TASKS: tuple[str, ...] = ("source", "target")

# What Keras' image_dataset_from_directory and Pillow both read; compared lowercased.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Columns of the manifest validate writes and clean reads, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "task", "path", "label", "width", "height", "mode", "bytes", "sha256", "decodable", "error",
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


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
    root = Path(root)
    found: list[tuple[str, str]] = []
    for label in class_folders(root):
        for folder, _, files in os.walk(root / label):
            for name in files:
                path = Path(folder, name)
                if every_file or is_image_name(path):
                    found.append((path.relative_to(root).as_posix(), label))
    return sorted(found)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_image(path: Path, max_pixels: int) -> dict[str, Any]:
    """Header facts, file hash and whether the file fully decodes; never raises for a bad image.

    Keys: width, height, mode (None when the header is unreadable), bytes, sha256, decodable, error.
    """
    path = Path(path)
    facts: dict[str, Any] = {
        "width": None, "height": None, "mode": None,
        "bytes": path.stat().st_size, "sha256": sha256_file(path), "decodable": False, "error": "",
    }
    if not is_image_name(path):
        expected = ", ".join(sorted(IMAGE_SUFFIXES))
        facts["error"] = f"not an image file name (suffix '{path.suffix}'; expected one of {expected})"
        return facts
    try:
        # Pillow warns (and past twice its limit, refuses) on huge images; our own limit decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                facts.update(width=image.width, height=image.height, mode=image.mode)
                pixels = image.width * image.height
                if pixels > max_pixels:
                    facts["error"] = (f"{image.width}x{image.height} = {pixels} pixels, "
                                      f"over validate.max_pixels={max_pixels}")
                    return facts
                image.load()  # the full decode: catches truncated and corrupt data
    except Image.DecompressionBombError as error:
        facts["error"] = f"too many pixels for Pillow to open: {error}"
        return facts
    except Exception as error:  # Pillow raises many types for bad files; each is "undecodable"
        # Pillow names the absolute path; the manifest must not depend on where the repository is.
        facts["error"] = f"{type(error).__name__}: {error}".replace(str(path), path.name)
        return facts
    facts["decodable"] = True
    return facts


def _to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float single-channel modes as 8-bit "L", scaled rather than clipped."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = pixels / 257.0
    elif image.mode == "F" and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0  # float images in [0, 1]
    elif pixels.size and pixels.max() > 255:
        # Mode "I" holds 16-bit PNGs on some Pillow versions; beyond that range, stretch to the max.
        pixels = pixels / 257.0 if pixels.max() <= 65535 else pixels * (255.0 / pixels.max())
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency on white, so transparent pixels do not turn black."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_normalized(path: Path | IO[bytes], size: int, pil_mode: str) -> Image.Image:
    """The image as the model sees it: upright, `pil_mode` ("L" or "RGB"), `size` x `size` pixels."""
    if pil_mode not in ("L", "RGB"):
        raise ValueError(f"pil_mode must be 'L' or 'RGB', not {pil_mode!r}")
    with Image.open(path) as opened:
        opened.draft(None, (size, size))  # JPEG only: decode at a reduced scale, never below `size`
        image = ImageOps.exif_transpose(opened)  # phone photos store rotation in EXIF
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _to_8bit(image)
    elif image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        image = _on_white(image)
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P and 1 all have a defined RGB conversion
    image = image.convert(pil_mode)
    if image.size != (size, size):
        # Downscaling with Pillow's BILINEAR filter averages over the whole footprint (area-like).
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image
