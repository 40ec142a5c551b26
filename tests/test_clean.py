"""Clean: bad files and duplicates are quarantined with a reason, the rest normalized, split stably and reconciled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import clean, ingest, validate
from components.core.config import Params
from components.core.errors import PipelineError
from components.data import raw_pack
from components.data.images import load_normalized
from tests.conftest import clean_images, pack_folder, shrunk_params, write_class_folders

SPLITS = ("train", "val", "test")


def _pipeline(params: Params) -> clean.CleanResult:
    ingest.run(params)
    validate.run(params)
    return clean.run(params)


def _user_params(tmp_path: Path, target: Path, extra: dict[str, object] | None = None) -> Params:
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=12, seed=1)
    return shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target), **(extra or {})})


def _split_of(params: Params, task: str) -> dict[str, str]:
    """Source path -> split, for every image clean wrote for `task`."""
    return {path: split for path, (split, _) in clean_images(params.paths.clean, task).items()}


def test_bad_files_and_duplicates_are_quarantined_with_reasons(tmp_path: Path) -> None:
    target = write_class_folders(tmp_path / "tgt", ["a", "b", "c"], per_class=12)
    (target / "a" / "empty.png").write_bytes(b"")
    valid = (target / "a" / "a_0000.png").read_bytes()
    (target / "a" / "truncated.png").write_bytes(valid[: len(valid) // 2])
    (target / "b" / "notes.png").write_text("this is text, not a picture")
    (target / "c" / "copy.png").write_bytes((target / "c" / "c_0000.png").read_bytes())
    (target / "b" / "stolen.png").write_bytes((target / "a" / "a_0001.png").read_bytes())
    params = _user_params(tmp_path, target, {"clean.target_train_per_class": 4})

    result = _pipeline(params)

    report = json.loads(params.paths.quarantine.read_text())
    reasons = {q["path"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == {"target/a/empty.png", "target/a/truncated.png", "target/b/notes.png", "target/c/copy.png",
                            "target/a/a_0001.png", "target/b/stolen.png"}
    assert reasons["target/a/empty.png"] == "zero-byte file"
    assert reasons["target/a/truncated.png"].startswith("truncated image: ")
    assert reasons["target/b/notes.png"] == "not an image: Pillow cannot identify the file's format"
    assert reasons["target/c/copy.png"] == "duplicate of target/c/c_0000.png"
    conflict = "label conflict: same image under labels a, b"
    assert reasons["target/a/a_0001.png"] == reasons["target/b/stolen.png"] == conflict

    # Every input file is kept, quarantined or held back, exactly once, per task and per class.
    assert report["reconciled"] is True
    counts = report["counts"]["target"]
    assert counts["input"] == 41 and counts["quarantined"] == 6
    assert counts["input"] == counts["kept"] + counts["quarantined"] + counts["held_back"]
    for label, c in counts["per_class"].items():
        files = sum(m.label == label for m in raw_pack.members(params.paths.raw / "target"))
        assert c["input"] == c["kept"] + c["quarantined"] + c["held_back"] == files
        assert c["kept"] == c["train"] + c["val"] + c["test"]
        # The label budget caps target train images per class; the rest are held back, not lost.
        assert c["train"] == 4 == sum(p.split("/")[1] == label and s == "train" for p, s in _split_of(params, "target").items())
    assert len(report["held_back"]) == counts["held_back"] > 0
    assert result.kept["target"] == counts["kept"] and result.quarantined == 6
    assert report["counts"]["source"]["held_back"] == 0  # the budget is for the target task only

    assert json.loads((params.paths.clean / "target" / "classes.json").read_text()) == ["a", "b", "c"]
    written = [pixels for task in ("source", "target") for _, pixels in clean_images(params.paths.clean, task).values()]
    assert len(written) == counts["kept"] + report["counts"]["source"]["kept"]
    assert {p.shape for p in written} == {(16, 16, 1)}  # the configured size, grayscale

    (tmp_path / "tgt" / "a" / "late.png").write_bytes(valid)
    pack_folder(tmp_path / "tgt", params.paths.raw / "target")  # data/raw changed after validate
    with pytest.raises(PipelineError, match="rerun `tlpipe stage validate`"):
        clean.run(params)  # a manifest that no longer matches data/raw is not trusted


def test_rgba_and_palette_images_become_the_configured_mode_and_size(tmp_path: Path) -> None:
    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=12, mode="RGB")
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 10))  # left half fully transparent
    rgba.save(target / "a" / "rgba.png")
    palette = Image.new("P", (24, 24), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.paste(1, (0, 0, 24, 12))  # top half green, bottom half blue (index 0)...
    palette.save(target / "b" / "palette.png", transparency=0)  # ...and index 0 is transparent
    sixteen = Image.fromarray(np.full((12, 12), 65535, dtype=np.uint16))
    sixteen.save(target / "b" / "sixteen.png")
    params = _user_params(tmp_path, target, {"data.color_mode": "rgb"})

    _pipeline(params)

    written = clean_images(params.paths.clean, "target")

    def output(name: str) -> np.ndarray:
        (pixels,) = [pixels for path, (_, pixels) in written.items() if path.endswith(f"/{name}")]
        assert pixels.shape == (16, 16, 3)
        return pixels

    rgba_pixels = output("rgba.png")
    assert tuple(rgba_pixels[8, 1]) == (255, 255, 255)  # transparent composited on white, not black
    assert tuple(rgba_pixels[8, 14]) == (255, 0, 0)
    palette_pixels = output("palette.png")
    assert tuple(palette_pixels[1, 8]) == (0, 255, 0) and tuple(palette_pixels[14, 8]) == (255, 255, 255)
    assert (output("sixteen.png") == 255).all()  # 16-bit white stays white, not clipped noise


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("L", (20, 10), 0)
    image.paste(255, (0, 0, 10, 10))  # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = np.asarray(load_normalized(tmp_path / "photo.jpg", 10, "L"))
    assert upright.shape == (10, 10)
    assert upright[1, 5] > 200 and upright[8, 5] < 50  # displayed: top half white


def test_existing_images_keep_their_split_when_images_are_added(tmp_path: Path) -> None:
    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=20)
    params = _user_params(tmp_path, target, {"clean.target_train_per_class": None})
    _pipeline(params)
    before = _split_of(params, "target")

    more = write_class_folders(tmp_path / "more", ["a", "b"], per_class=15, seed=7)
    for path in more.glob("*/*.png"):
        shutil.copyfile(path, target / path.parent.name / f"new_{path.name}")
    _pipeline(params)
    after = _split_of(params, "target")

    assert len(after) == len(before) + 30
    counts = json.loads(params.paths.quarantine.read_text())["counts"]["target"]
    assert counts["leaked_across_splits"] == 0
    assert abs(counts["split_shares"]["test"] - params.clean.test_fraction) < 0.15  # 70 images: hash noise
    assert {name: after[name] for name in before} == before
    assert {split for split in after.values()} == set(SPLITS)


def test_small_classes_get_every_split_and_too_small_ones_fail(tmp_path: Path) -> None:
    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=12)
    for extra in sorted((target / "b").iterdir())[3:]:
        extra.unlink()
    params = _user_params(tmp_path, target, {"validate.min_images_per_class": 1})
    _pipeline(params)
    for split in SPLITS:
        assert sum(p.startswith("target/b/") and s == split for p, s in _split_of(params, "target").items()) == 1

    (target / "b" / "b_0002.png").unlink()
    with pytest.raises(PipelineError, match="class 'b' of target has 2 usable image"):
        _pipeline(params)


def _csv_target(tmp_path: Path, splits: dict[str, str], per_class: int = 12) -> Path:
    """A CSV manifest over two generated classes; `splits` names the split of some files (others left empty)."""
    root = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=per_class)
    rows = ["path,label,split"] + [f"{p.relative_to(root).as_posix()},{p.parent.name},{splits.get(p.name, '')}"
                                   for p in sorted(root.glob("*/*.png"))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_a_csv_split_column_is_honoured_and_the_rest_split_by_content(tmp_path: Path) -> None:
    chosen = {"a_0000.png": "test", "a_0001.png": "Validation", "b_0002.png": "train", "b_0003.png": "test"}
    params = _user_params(tmp_path, _csv_target(tmp_path, chosen), {"clean.target_train_per_class": None})

    _pipeline(params)

    split_of = {path.rsplit("/", 1)[-1]: split for path, split in _split_of(params, "target").items()}
    assert split_of["a_0000.png"] == "test" and split_of["a_0001.png"] == "val"
    assert split_of["b_0002.png"] == "train" and split_of["b_0003.png"] == "test"
    assert len(split_of) == 24 and set(split_of.values()) == set(SPLITS)  # unassigned rows still fill every split


def test_a_csv_split_that_starves_a_class_or_names_no_split_is_refused(tmp_path: Path) -> None:
    everything_train = {f"{label}_{i:04d}.png": "train" for label in "ab" for i in range(12)}
    params = _user_params(tmp_path, _csv_target(tmp_path, everything_train))
    with pytest.raises(PipelineError, match=r"class 'a' of target has no test image: the split column"):
        _pipeline(params)

    bad = tmp_path / "bad"
    params = _user_params(bad, _csv_target(bad, {"a_0000.png": "holdout"}))
    with pytest.raises(PipelineError, match=r"split values \['holdout'\] on line\(s\) \[2\] are not train, val or test"):
        ingest.run(params)


def test_the_split_suite_and_a_readable_summary_are_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = write_class_folders(tmp_path / "tgt", ["a", "b"], per_class=12)
    (target / "b" / "copy.png").write_bytes((target / "b" / "b_0000.png").read_bytes())
    # A tolerance no hash split of 24 images meets: reported as a warning, the stage still passes.
    params = _user_params(tmp_path, target, {"clean.split_share_tolerance": 0.001})

    _pipeline(params)

    checks = {e["kwargs"]["column"]: e for e in json.loads(params.paths.quarantine.read_text())["expectations"]}
    assert checks["splits"]["success"] and checks["splits"]["severity"] == "critical"  # no leakage
    assert checks["labels"]["success"] and checks["labels"]["severity"] == "critical"  # no label conflict
    assert not checks["share_error"]["success"] and checks["share_error"]["severity"] == "warning"
    assert "split shares off their fractions" in caplog.text
    summary = params.paths.quarantine_summary.read_text()
    assert "| target | b | 13 | 12 |" in summary  # input 13, kept 12
    assert "| duplicate | 1 |" in summary and "| target | target/b/copy.png | b | duplicate of target/b/b_0000.png |" in summary
    assert "No leakage" in summary and "FAILED" in summary
