"""`tlpipe init --source DIR --target DIR`: a params.yaml whose choices fit the user's image folders.

It looks at the folders (classes, counts per class, image sizes and colour) and writes only the
values that differ from the shipped defaults (components/core/defaults.yaml), printing each choice
and why. It never overwrites an existing params.yaml unless asked (--force).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from components.core.artifacts import write_text
from components.core.config import effective_raw, shipped_defaults
from components.core.errors import PipelineError
from components.data.csv_manifest import is_csv_manifest
from components.data.images import list_class_images
from components.training.backbones import BACKBONES
from components.training.download import cache_dir_from, imagenet_cache_path, imagenet_weights

# Images per class that make a validation (and test) split worth early stopping and gates on.
MIN_SPLIT_IMAGES = 5
# Image sides tried, smallest first; the largest not above the images' median short side wins.
SIZES = (16, 32, 64, 96, 128, 160, 224)
# Without pretrained weights the small CNN trains from the source folder: beyond this side it
# gets slower on a CPU without getting better on small data.
SCRATCH_MAX_SIZE = 64
PRETRAINED = "mobilenet_v3_small"  # the smallest Keras Applications backbone with ImageNet weights
SAMPLE = 200  # images per task opened for sizes and colour (the file count is exact)


@dataclass(frozen=True)
class Folder:
    """What init learns about one task's folder."""

    path: Path
    counts: dict[str, int]
    short_side: int  # median of min(width, height) over the sampled images
    colour: bool  # some sampled image has different channels (not grey stored as RGB)

    @property
    def smallest(self) -> int:
        return min(self.counts.values())


def _is_colour(image: Image.Image) -> bool:
    """True unless every pixel's channels (nearly) agree: grey saved as RGB is grey; JPEG adds a little chroma noise."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return False
    red, green, blue = (band.tobytes() for band in image.convert("RGB").resize((32, 32)).split())
    return any(abs(r - g) > 24 or abs(g - b) > 24 for r, g, b in zip(red, green, blue))


def inspect_folder(path: Path) -> Folder:
    if not path.is_dir():
        hint = " (init reads class folders; write a CSV project's params.yaml by hand)" if is_csv_manifest(str(path)) else ""
        raise PipelineError(f"{path} is not a folder{hint}: pass a folder with one subfolder per class")
    images = list_class_images(path)
    counts: dict[str, int] = {}
    for _, label in images:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        raise PipelineError(f"{path} has {len(counts)} class folder(s) with images; a classifier needs at least 2: "
                            "put each class's images in its own subfolder")
    step = max(1, len(images) // SAMPLE)
    sides: list[int] = []
    colour = False
    for rel, _ in images[::step]:
        try:
            with Image.open(path / rel) as image:
                sides.append(min(image.size))
                colour = colour or _is_colour(image)
        except (OSError, ValueError):
            continue  # validate reports unreadable files with their reasons
    if not sides:
        raise PipelineError(f"no readable image in {path}: check the files (png, jpg, ...)")
    return Folder(path, counts, int(statistics.median(sides)), colour)


def _pretrained_weights(defaults: dict[str, Any]) -> Path:
    """Where the pretrained backbone's ImageNet weights must lie for an offline run."""
    return imagenet_cache_path(PRETRAINED, cache_dir_from(defaults["source"]["cache_dir"]))


def choose(source: Folder, target: Folder, root: Path) -> tuple[dict[str, Any], list[str]]:
    """The params that differ from the defaults, and one line per choice saying why."""
    defaults = shipped_defaults()
    changes: dict[str, dict[str, Any]] = {"data": {}, "validate": {}, "clean": {}, "model": {}, "source": {}}
    why: list[str] = []

    def shown(path: Path) -> str:
        """Relative to the params file's folder when inside it (the project moves with it), else absolute."""
        path, base = path.resolve(), root.resolve()
        return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)

    changes["data"].update(source_dir=shown(source.path), target_dir=shown(target.path))
    why.append(f"data: source {shown(source.path)} ({len(source.counts)} classes, {sum(source.counts.values())} images), "
               f"target {shown(target.path)} ({len(target.counts)} classes, {sum(target.counts.values())} images)")

    colour = source.colour or target.colour
    changes["data"]["color_mode"] = "rgb" if colour else "grayscale"
    why.append(f"data.color_mode: {changes['data']['color_mode']}: "
               + ("some images have colour" if colour else "every sampled image is grey"))

    weights = _pretrained_weights(defaults)
    pretrained = weights.is_file()
    side = min(source.short_side, target.short_side)
    fitting = [size for size in SIZES if size <= side] or [SIZES[0]]
    cap = SIZES[-1] if pretrained else SCRATCH_MAX_SIZE
    size = min(fitting[-1], cap)
    if pretrained:
        size = max(size, BACKBONES[PRETRAINED].min_side)
    changes["data"]["image_size"] = size
    why.append(f"data.image_size: {size}: the images' median short side is {side} px"
               + (f"; capped at {cap} px, enough for a CNN trained from scratch on a CPU" if fitting[-1] > cap else ""))

    if pretrained:
        changes["model"]["backbone"] = PRETRAINED
        changes["source"].update(mode="download", weights="imagenet")
        why.append(f"model.backbone: {PRETRAINED} with ImageNet weights (found {weights}); the source folder "
                   "then only checks the data, the weights come pretrained")
    else:
        changes["model"]["backbone"] = "simple_cnn"
        file, md5 = imagenet_weights(PRETRAINED)
        why.append(f"model.backbone: simple_cnn, trained on the source folder: no pretrained weights at {weights}. "
                   f"For {PRETRAINED}'s ImageNet weights offline, place them once: "
                   f"curl -fL --create-dirs -o {weights} {defaults['source']['mirror'].rstrip('/')}/{file} "
                   f"(md5 {md5}), then rerun tlpipe init --force")

    smallest = min(source.smallest, target.smallest)
    # Content-hash splits give each class about fraction x count images; leave every class a
    # validation and a test split of MIN_SPLIT_IMAGES, and never less than the defaults' share.
    fraction = max(defaults["clean"]["val_fraction"], MIN_SPLIT_IMAGES / max(smallest, 1))
    fraction = round(min(fraction, 0.3), 2)
    test_fraction = max(defaults["clean"]["test_fraction"], fraction)
    changes["clean"].update(val_fraction=fraction, test_fraction=test_fraction)
    why.append(f"clean.val_fraction: {fraction}, clean.test_fraction: {test_fraction}: the smallest class has "
               f"{smallest} images, so each class keeps about {int(smallest * fraction)}+ for validation and "
               f"{int(smallest * test_fraction)}+ for testing")
    if smallest * fraction < MIN_SPLIT_IMAGES:
        why.append(f"  warning: {smallest} images in the smallest class leave a validation split under "
                   f"{MIN_SPLIT_IMAGES} images; add images for steadier early stopping and gates")

    train_left = int(target.smallest * (1 - fraction - test_fraction))
    changes["clean"]["target_train_per_class"] = None
    why.append(f"clean.target_train_per_class: null (every labelled image): the target's smallest class leaves "
               f"about {train_left} to train on")

    minimum = defaults["validate"]["min_images_per_class"]
    if smallest < minimum:
        changes["validate"]["min_images_per_class"] = max(1, smallest)
        why.append(f"validate.min_images_per_class: {smallest}: your smallest class has fewer than the default "
                   f"{minimum}; results on so few images are uncertain")
    if set(source.counts) & set(target.counts):
        changes["validate"]["allow_class_overlap"] = True
        why.append(f"validate.allow_class_overlap: true: the tasks share class names "
                   f"{sorted(set(source.counts) & set(target.counts))}")

    # Only values that differ from the shipped defaults go to the user's file.
    written = {section: {key: value for key, value in values.items() if defaults[section].get(key) != value
                         or section == "data" and key.endswith("_dir")}
               for section, values in changes.items()}
    return {section: values for section, values in written.items() if values}, why


def init(source: Path, target: Path, output: Path, force: bool = False) -> str:
    """Write `output` (a params.yaml) for the two folders; returns the lines to print."""
    if output.exists() and not force:
        raise PipelineError(f"{output} exists: pass --force to replace it (or --output to write another file)")
    changes, why = choose(inspect_folder(source), inspect_folder(target), output.parent)
    header = ("# Written by `tlpipe init` for your folders: only what differs from the shipped defaults\n"
              "# (components/core/defaults.yaml, where every key is explained). `tlpipe params` prints the rest.\n")
    write_text(output, header + yaml.safe_dump(changes, sort_keys=False))
    effective_raw(output)  # the file reads back
    return "\n".join([*why, f"wrote {output}; next: dvc repro (or make run)"])
