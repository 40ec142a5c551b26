"""A messy user folder: every bad file gets its exact reason, unusual modes convert, nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import clean, ingest, validate
from components.data import raw_record
from components.core.config import Params
from components.core.errors import PipelineError
from tests.conftest import REPO, clean_images, raw_files, shrunk_params, write_class_folders, write_shrunk_params_yaml


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height but holds a few bytes of pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _smooth(size: int, phase: float) -> Image.Image:
    """A smooth RGB picture big enough for perceptual hashing; `phase` makes a different picture."""
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = 127 + 120 * np.sin(6 * x + phase) * np.cos(4 * y - phase)
    return Image.fromarray(np.stack([pixels, pixels[::-1], pixels.T], axis=-1).astype(np.uint8))


def _messy_target(root: Path, outside: Path) -> Path:
    target = write_class_folders(root, ["chat noir", "dog", "bird"], per_class=12, mode="RGB")
    Image.new("RGB", (12, 12), (9, 9, 9)).save(target / "chat noir" / "é 1.png")  # unicode and a space
    dog, bird = target / "dog", target / "bird"

    (dog / "zero.png").write_bytes(b"")
    buffer = target / "full.jpg"
    _smooth(48, 0).save(buffer, quality=90)
    (dog / "truncated.jpg").write_bytes(buffer.read_bytes()[:600])
    buffer.unlink()
    (dog / "notes.txt").write_text("a note, not a picture")
    (dog / "fake.png").write_text("text with an image's name")
    _png_header_only(dog / "bomb.png", 12000, 12000)  # 144 Mpixels > 89.5 M, yet Pillow only warns at this size
    Image.new("RGB", (4, 4)).save(dog / "tiny.png")
    (outside / "secret.png").parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12)).save(outside / "secret.png")
    (dog / "escape.png").symlink_to(outside / "secret.png")
    (dog / "broken.png").symlink_to(target / "nowhere.png")
    os.mkfifo(dog / "pipe.png")
    (dog / "inside.png").symlink_to(dog / "dog_0003.png")  # inside the root: followed, so a duplicate

    # Valid but unusual modes: converted, never dropped.
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(bird / "cmyk.tif")  # pure cyan
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(bird / "sixteen.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 16, 8))  # top half green; bottom half index 0, which is transparent
    palette.save(bird / "palette.gif", transparency=0)
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 8, 16, 16))  # bottom half fully transparent
    rgba.save(bird / "rgba.png")
    Image.new("L", (16, 16), 100).save(bird / "grey.png")
    stored = Image.new("RGB", (32, 16), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 16, 16))  # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": displayed, the top half is white
    stored.save(bird / "rotated.jpg", exif=exif, quality=95)

    # Duplicates and conflicts, exact and perceptual.
    (bird / "copy.png").write_bytes((bird / "bird_0000.png").read_bytes())
    (dog / "stolen.png").write_bytes((bird / "bird_0001.png").read_bytes())
    _smooth(64, 0).save(bird / "big.png")
    _smooth(64, 0).resize((60, 60)).save(bird / "big_resized.jpg", quality=85)
    _smooth(64, 2).save(bird / "wave.png")
    _smooth(64, 2).point(lambda v: min(255, v + 6)).save(target / "chat noir" / "wave_brighter.png")
    return target


def _run(params: Params) -> None:
    ingest.run(params)
    validate.run(params)
    clean.run(params)


def test_every_bad_file_has_its_reason_and_every_mode_converts(tmp_path: Path) -> None:
    target = _messy_target(tmp_path / "tgt", tmp_path / "elsewhere")
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=12, seed=1)
    params = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target),
                                      "data.color_mode": "rgb", "clean.target_train_per_class": None})
    _run(params)

    report = json.loads(params.paths.quarantine.read_text())
    reasons = {q["path"].removeprefix("target/"): q["reason"] for q in report["quarantined"] if q["task"] == "target"}
    near = reasons.pop("bird/big_resized.jpg")
    assert near.startswith("near-duplicate of target/bird/big.png (dHash distance ")
    assert reasons.pop("dog/truncated.jpg").startswith("truncated image: ")
    assert reasons == {
        "dog/zero.png": "zero-byte file",
        "dog/notes.txt": "not an image: file name suffix '.txt' (expected one of .bmp, .gif, .jpeg, .jpg, .png, "
                         ".tif, .tiff, .webp)",
        "dog/fake.png": "not an image: Pillow cannot identify the file's format",
        "dog/bomb.png": "decompression bomb: 12000x12000 = 144000000 pixels, over validate.max_pixels=89478485",
        "dog/tiny.png": "too small: 4x4, a side below validate.min_side=8",
        "dog/escape.png": "symlink escapes the data root (points outside tgt/)",
        "dog/broken.png": "unreadable: broken symlink",
        "dog/pipe.png": "unreadable: not a regular file (a pipe, socket or device)",
        "dog/inside.png": "duplicate of target/dog/dog_0003.png",
        "bird/copy.png": "duplicate of target/bird/bird_0000.png",
        "bird/bird_0001.png": "label conflict: same image under labels bird, dog",
        "dog/stolen.png": "label conflict: same image under labels bird, dog",
        "bird/wave.png": "label conflict: same near-duplicate image under labels bird, chat noir",
        "chat noir/wave_brighter.png": "label conflict: same near-duplicate image under labels bird, chat noir",
    }
    assert "dog/escape.png" not in raw_files(params.paths.raw / "target")  # nothing from outside the root was copied

    # Reconciliation: every file of the user's folder is kept or quarantined, per class and in total.
    counts = report["counts"]["target"]
    for label in ("chat noir", "dog", "bird"):
        on_disk = len(os.listdir(target / label))
        assert counts["per_class"][label]["input"] == on_disk
        assert on_disk == counts["per_class"][label]["kept"] + counts["per_class"][label]["quarantined"]
    assert counts["input"] == counts["kept"] + counts["quarantined"] and report["reconciled"] is True

    written = clean_images(params.paths.clean, "target")

    def output(label: str, name: str) -> np.ndarray:
        stem = Path(name).stem  # the source may be a .jpg or .tif; its name without the suffix
        (pixels,) = [pixels for path, (_, pixels) in written.items()
                     if Path(path).parent == Path("target", label) and Path(path).stem == stem]
        assert pixels.shape == (16, 16, 3)
        return pixels.astype(int)

    assert output("chat noir", "é 1.png")[0, 0].tolist() == [9, 9, 9]
    assert output("bird", "cmyk.png")[8, 8].tolist() == [0, 255, 255]
    assert output("bird", "sixteen.png")[8, 8].tolist() == [128, 128, 128]  # scaled from 16 bits, not clipped
    palette = output("bird", "palette.png")
    assert palette[2, 8].tolist() == [0, 255, 0] and palette[13, 8].tolist() == [255, 255, 255]
    rgba = output("bird", "rgba.png")
    assert rgba[2, 8].tolist() == [255, 0, 0] and rgba[13, 8].tolist() == [255, 255, 255]  # on white, not black
    assert output("bird", "grey.png")[8, 8].tolist() == [100, 100, 100]
    rotated = output("bird", "rotated.png")
    assert rotated[2, 8].min() > 200 and rotated[13, 8].max() < 50  # EXIF applied: the white half is on top


def _ingest_with_permissions_checked(params: Params, workspace: Path) -> None:
    """Ingest as a user file permissions bind.

    Root reads whatever the permissions say (CI runs as root), so there ingest runs as nobody
    (setpriv drops root's capabilities); the workspace is nobody's, what it locks stays root's.
    """
    if os.geteuid() != 0:
        ingest.run(params)
        return
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot drop the capability to read anything")
    for path in [workspace, *workspace.rglob("*")]:
        if path.stat().st_mode & 0o777:
            os.chown(path, 65534, 65534, follow_symlinks=False)
    yaml_path = write_shrunk_params_yaml(workspace / "params.yaml", {"data.source_dir": params.data.source_dir,
                                                                     "data.target_dir": params.data.target_dir})
    env = {**os.environ, "HOME": str(workspace), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "components", "stage", "ingest", "--params", str(yaml_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def open_workspace() -> Iterator[Path]:
    """A folder any user may enter (pytest's tmp_path is root's alone when run as root)."""
    folder = Path(tempfile.mkdtemp(prefix="tlpipe-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


def test_files_and_folders_nobody_may_read_are_quarantined_with_their_reason(open_workspace: Path) -> None:
    target = write_class_folders(open_workspace / "tgt", ["a", "b", "c"], per_class=12)
    locked = target / "a" / "locked.png"
    Image.new("L", (12, 12)).save(locked)
    locked.chmod(0)
    shut = target / "b" / "2024"
    write_class_folders(shut, ["inner"], per_class=3)
    shut.chmod(0)
    (target / "c").chmod(0)  # a whole class folder
    source = write_class_folders(open_workspace / "src", ["x", "y"], per_class=12, seed=1)
    params = shrunk_params(open_workspace, {"data.source_dir": str(source), "data.target_dir": str(target)})
    folder = "unreadable: folder cannot be listed (permission denied); its files were not copied"

    _ingest_with_permissions_checked(params, open_workspace)
    assert {r["path"]: r["reason"] for r in raw_record.rejected_files(params.paths.raw)["target"]} == {
        "a/locked.png": "unreadable: permission denied", "b/2024": folder, "c": folder}
    with pytest.raises(PipelineError, match=r"class 'c' of target has 0 usable images"):
        validate.run(params)

    (target / "c").chmod(0o755)
    shutil.rmtree(target / "c")
    _ingest_with_permissions_checked(params, open_workspace)
    validate.run(params)
    clean.run(params)
    quarantine = json.loads(params.paths.quarantine.read_text())
    reasons = {q["path"]: q["reason"] for q in quarantine["quarantined"]}
    assert reasons == {"target/a/locked.png": "unreadable: permission denied", "target/b/2024": folder}
    assert quarantine["reconciled"]


