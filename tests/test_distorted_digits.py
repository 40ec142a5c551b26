"""bench/distorted_digits.py: issue 18's harder target is every bundled digit once, distorted, reproducible."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bench.distorted_digits import write_folders


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_every_digit_once_per_file_distorted_and_reproducible(tmp_path: Path) -> None:
    assert write_folders(tmp_path / "a", side=24) == {"source": 901, "target": 896}  # scikit-learn's 1,797 digits
    files = _files(tmp_path / "a")
    assert {name.split("/")[1] for name in files if name.startswith("source/")} == {"0", "1", "2", "3", "4"}
    assert {name.split("/")[1] for name in files if name.startswith("target/")} == {"5", "6", "7", "8", "9"}
    assert len(set(files.values())) == len(files)  # no two files alike: clean has no duplicates to drop
    image = Image.open(tmp_path / "a" / "target" / "7" / "7_0000.png")
    assert image.mode == "L" and image.size == (24, 24)
    write_folders(tmp_path / "b", side=24)
    assert _files(tmp_path / "b") == files
    other = _files(write_folders(tmp_path / "c", side=24, seed=1) and tmp_path / "c")
    assert other.keys() == files.keys() and sum(other[k] != files[k] for k in files) > 0.99 * len(files)
