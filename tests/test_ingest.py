"""Ingest: the embedded digits or the user's folders are packed into data/raw, and an unchanged input rewrites nothing."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import ingest
from components.data import raw_pack, raw_record
from components.core.config import Params
from components.core.errors import PipelineError
from tests.conftest import raw_files, shrunk_params, write_class_folders


def _files(root: Path) -> dict[str, int]:
    """Relative path -> mtime_ns of every file under root, the ingest record included."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_embedded_digits_are_written_once(params: Params) -> None:
    from sklearn.datasets import load_digits

    first = ingest.run(params)
    raw = params.paths.raw
    digits = load_digits()
    assert first.rewritten
    assert raw_pack.classes(raw / "source") == ["0", "1", "2", "3", "4"]
    assert raw_pack.classes(raw / "target") == ["5", "6", "7", "8", "9"]
    for task in ("source", "target"):
        labels = [m.label for m in raw_pack.members(raw / task)]
        for label in set(labels):
            assert labels.count(label) == int((digits.target == int(label)).sum())
    assert sum(first.images.values()) == 1797
    # The file is the sklearn sample of that index, scaled from 0..16 to 0..255.
    index = int(np.flatnonzero(digits.target == 7)[3])
    pixels = np.asarray(Image.open(io.BytesIO(raw_files(raw / "target")[f"7/digit_{index:05d}.png"])))
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8)
    np.testing.assert_array_equal(pixels, np.rint(digits.images[index] * 255 / 16).astype(np.uint8))

    before = _files(raw)
    second = ingest.run(params)
    assert not second.rewritten
    assert _files(raw) == before  # DVC sees identical outputs, so no later stage reruns


def test_changed_classes_rewrite_the_tree(tmp_path: Path) -> None:
    params = shrunk_params(tmp_path, {"data.embedded_source_classes": [0, 1], "data.embedded_target_classes": [2]})
    ingest.run(params)
    changed = shrunk_params(tmp_path, {"data.embedded_source_classes": [0, 1], "data.embedded_target_classes": [2, 3]})
    result = ingest.run(changed)
    assert result.rewritten
    assert raw_pack.classes(changed.paths.raw / "target") == ["2", "3"]
    assert not list(tmp_path.glob("data/.raw.*"))  # no temporary folders left behind


def test_user_folders_are_copied_whole(tmp_path: Path) -> None:
    user = write_class_folders(tmp_path / "mine", ["cat", "dog"], per_class=3)
    (user / "dog" / "puppies").mkdir()
    (user / "dog" / "puppies" / "p1.jpg").write_bytes(b"not really a jpeg")  # bad files are copied too
    (user / "empty").mkdir()
    (user / "README.txt").write_text("outside any class folder")
    params = shrunk_params(tmp_path, {"data.target_dir": str(user), "data.embedded_source_classes": [0, 1]})

    result = ingest.run(params)
    target = params.paths.raw / "target"
    copied = raw_files(target)
    assert sorted(copied) == ["cat/cat_0000.png", "cat/cat_0001.png", "cat/cat_0002.png",
                              "dog/dog_0000.png", "dog/dog_0001.png", "dog/dog_0002.png", "dog/puppies/p1.jpg"]
    assert all(data == (user / path).read_bytes() for path, data in copied.items())  # byte for byte
    assert copied["dog/puppies/p1.jpg"] == b"not really a jpeg"
    assert raw_pack.classes(target) == ["cat", "dog", "empty"]  # the empty class folder too: validate reports it
    assert result.images["target"] == 7 and result.classes["target"] == 3
    assert raw_pack.classes(params.paths.raw / "source") == ["0", "1"]
    # Any machine reads the packs without tlpipe: `tar -xf` gives the user's files back.
    with tarfile.open(target / raw_pack.pack_name(0)) as pack:
        assert sorted(pack.getnames()) == sorted(copied)
        assert pack.extractfile("cat/cat_0001.png").read() == (user / "cat/cat_0001.png").read_bytes()

    assert not ingest.run(params).rewritten
    (user / "cat" / "cat_0003.png").write_bytes((user / "cat" / "cat_0000.png").read_bytes())
    assert ingest.run(params).rewritten
    assert "cat/cat_0003.png" in raw_files(target)

    pack = target / raw_pack.pack_name(0)
    pack.write_bytes(pack.read_bytes()[:-2048])  # a pack cut short by hand is noticed
    assert ingest.run(params).rewritten
    assert raw_files(target)["cat/cat_0003.png"] == (user / "cat" / "cat_0000.png").read_bytes()


def test_missing_user_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    params = shrunk_params(tmp_path, {"data.source_dir": str(missing)})
    with pytest.raises(PipelineError, match=r"data\.source_dir '.*nowhere' does not exist"):
        ingest.run(params)
    assert not params.paths.raw.exists()


def test_folder_without_class_subfolders_is_refused(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (12, 12)).save(flat / "a.png")
    params = shrunk_params(tmp_path, {"data.target_dir": str(flat)})
    with pytest.raises(PipelineError, match="has no class subfolders"):
        ingest.run(params)


def test_a_csv_manifest_labels_files_and_its_bad_rows_are_recorded(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "photos", ["all"], per_class=6)  # one folder; labels come from the CSV
    (tmp_path / "outside.png").write_bytes((root / "all" / "all_0000.png").read_bytes())
    rows = ["path,label,split", "all/all_0000.png,cat,", "all/all_0001.png,cat,", "all/all_0002.png,dog,",
            "all/all_0003.png,dog,", "all/all_0000.png,dog,",  # the same image under two labels: clean decides
            "all/gone.png,dog,", "../outside.png,cat,", "all/all_0001.png,cat,"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    params = shrunk_params(tmp_path, {"data.target_dir": str(root / "labels.csv"),
                                      "data.embedded_source_classes": [0, 1]})

    result = ingest.run(params)
    copied = raw_files(params.paths.raw / "target")
    assert sorted(copied) == ["cat/all/all_0000.png", "cat/all/all_0001.png", "dog/all/all_0000.png",
                              "dog/all/all_0002.png", "dog/all/all_0003.png"]
    assert copied["dog/all/all_0002.png"] == (root / "all" / "all_0002.png").read_bytes()
    assert result.images["target"] == 5 and result.classes["target"] == 2
    assert raw_record.rejected_files(params.paths.raw)["target"] == [
        {"path": "dog/all/gone.png", "label": "dog", "reason": "unreadable: listed in the CSV manifest but not found"},
        {"path": "cat/outside.png", "label": "cat",
         "reason": "manifest path escapes the data root (the folder of labels.csv)"},
        {"path": "cat/all/all_0001.png", "label": "cat", "reason": "listed twice in the CSV manifest under the same label"},
    ]
    assert not ingest.run(params).rewritten
    (root / "labels.csv").write_text("\n".join(rows[:-1]) + "\n")
    assert ingest.run(params).rewritten  # the manifest is an input like the files


def test_a_csv_manifest_without_its_columns_is_refused(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,class\na.png,cat\n")
    params = shrunk_params(tmp_path, {"data.target_dir": str(tmp_path / "labels.csv")})
    with pytest.raises(PipelineError, match=r"needs a header with columns path,label"):
        ingest.run(params)


def test_the_same_images_keep_data_raw_as_it_is_wherever_they_come_from(tmp_path: Path) -> None:
    """A fresh clone after `dvc pull`, or inputs touched or copied anew: same images, same data/raw, nothing reruns."""
    user = write_class_folders(tmp_path / "mine", ["cat", "dog"], per_class=3)
    params = shrunk_params(tmp_path, {"data.target_dir": str(user)})
    assert ingest.run(params).rewritten
    raw = params.paths.raw
    before = _files(raw)

    image = user / "cat" / "cat_0000.png"
    os.utime(image, ns=(1, 1))  # same bytes, new mtime: the cheap fingerprint changes
    assert not ingest.run(params).rewritten
    assert _files(raw) == before

    moved = tmp_path / "elsewhere"
    user.rename(moved)  # the same folder on another mount, as on another machine
    elsewhere = shrunk_params(tmp_path, {"data.target_dir": str(moved)})
    assert not ingest.run(elsewhere).rewritten
    assert _files(raw) == before

    (moved / "cat" / "cat_0000.png").write_bytes((moved / "dog" / "dog_0001.png").read_bytes())
    assert ingest.run(elsewhere).rewritten  # new bytes are new data
    assert _files(raw) != before


def test_a_checked_out_older_tree_is_noticed_under_an_unchanged_fingerprint(params: Params) -> None:
    ingest.run(params)
    raw = params.paths.raw
    record = raw / raw_record.FINGERPRINT_FILE
    # What `dvc checkout` of another version looks like: other packs and record, same inputs.
    before = raw_files(raw / "target")
    (raw / "target" / raw_pack.pack_name(0)).write_bytes(b"\0" * 10240)
    record.write_text(record.read_text().replace('"content_sha256": "', '"content_sha256": "0'))
    result = ingest.run(params)
    assert result.rewritten and raw_files(raw / "target") == before
