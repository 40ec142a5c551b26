"""Validate: a manifest of every raw file, a Great Expectations verdict, and reports a person and a tool can read."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from components import ingest, validate
from components.core.config import Params
from components.core.errors import PipelineError
from components.data.images import MANIFEST_COLUMNS
from tests.conftest import raw_files, shrunk_params, write_class_folders


def _manifest(params: Params) -> list[dict[str, str]]:
    with open(params.paths.manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def test_digits_pass_and_every_report_is_written(tmp_path: Path) -> None:
    # Four digit classes keep this fast; test_ingest covers all ten.
    params = shrunk_params(tmp_path, {"data.embedded_source_classes": [0, 1], "data.embedded_target_classes": [2, 3]})
    files = ingest.run(params).images
    result = validate.run(params)

    assert result.success and result.images == files["source"] + files["target"]
    rows = _manifest(params)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert len(rows) == result.images
    first = rows[0]
    assert first["path"].startswith("source/0/digit_") and first["label"] == "0"
    assert (first["width"], first["height"], first["mode"], first["decodable"]) == ("8", "8", "L", "True")
    packed = raw_files(params.paths.raw / "source")[first["path"].removeprefix("source/")]
    assert first["sha256"] == hashlib.sha256(packed).hexdigest()

    report = json.loads(params.paths.validation.read_text())
    assert report["success"] is True
    assert report["tasks"]["target"]["images"] == files["target"]
    assert set(report["tasks"]["target"]["classes"]) == {"2", "3"}
    assert report["unusable"] == 0 and report["duplicates"] == 0
    assert all(e["success"] for e in report["expectations"])
    assert {e["expectation"] for e in report["expectations"]} >= {
        "expect_column_values_to_be_in_set", "expect_column_values_to_be_between",
        "expect_column_values_to_not_be_null"}

    index = (params.paths.data_docs / "index.html").read_text()
    assert "PASSED" in index and "https://" not in index  # readable offline
    gx_pages = list(params.paths.data_docs.glob("validations/*/*/*/*.html"))
    assert {p.parents[2].name for p in gx_pages} == {"manifest", "class_counts", "informational"}
    for page in gx_pages:
        assert page.relative_to(params.paths.data_docs).as_posix() in index


def test_too_few_images_fail_naming_the_class(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "src", ["a", "b"], per_class=10)
    target = write_class_folders(tmp_path / "tgt", ["cat", "dog"], per_class=10)
    for extra in sorted((target / "dog").iterdir())[3:]:
        extra.write_bytes(b"")  # 3 decodable dog images remain
    params = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target)})
    ingest.run(params)

    with pytest.raises(PipelineError) as failure:
        validate.run(params)
    message = str(failure.value)
    assert "class 'dog' of target has 3 usable images, fewer than validate.min_images_per_class=10" in message
    assert "cat" not in message
    assert str(params.paths.data_docs / "index.html") in message
    # The reports are still written, so the failure can be inspected.
    assert json.loads(params.paths.validation.read_text())["success"] is False
    assert "FAILED" in (params.paths.data_docs / "index.html").read_text()
    assert len(_manifest(params)) == 40


def test_bad_files_are_reported_not_failed(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "src", ["a", "b"], per_class=10)
    target = write_class_folders(tmp_path / "tgt", ["cat", "dog"], per_class=10)
    (target / "cat" / "empty.png").write_bytes(b"")
    (target / "dog" / "copy.png").write_bytes((target / "dog" / "dog_0000.png").read_bytes())
    Image.new("L", (4, 20)).save(target / "dog" / "thin.png")
    params = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target)})
    ingest.run(params)

    result = validate.run(params)
    assert result.success and result.unusable == 2 and result.duplicates == 1
    rows = {r["path"]: r for r in _manifest(params)}
    assert rows["target/cat/empty.png"]["decodable"] == "False"
    assert rows["target/cat/empty.png"]["error"] == "zero-byte file"
    assert rows["target/dog/thin.png"]["error"] == "too small: 4x20, a side below validate.min_side=8"
    assert all(str(tmp_path) not in r["error"] for r in rows.values())  # the manifest does not depend on the checkout
    expectations = json.loads(params.paths.validation.read_text())["expectations"]
    informational = [e for e in expectations if e["severity"] == "info"]
    assert not all(e["success"] for e in informational)


@pytest.mark.parametrize(
    ("layout", "extra", "message"),
    [
        ({"a": 10, "b": 10, "empty": 0}, {},
         "class 'empty' of target is an empty folder; add images to it or remove the folder"),
        ({"only": 10}, {}, "target has 1 class folder(s); a classifier needs at least 2: add another class folder"),
        ({"a": 10, "x": 10}, {},
         "target classes ['x'] are also source classes: the target task should be new classes; rename or remove "
         "them, or set validate.allow_class_overlap: true if this is intended"),
        ({"a": 40, "b": 10}, {"validate.max_imbalance_ratio": 3},
         "class 'b' of target has 10 usable images, over validate.max_imbalance_ratio=3 times fewer than its "
         "largest class"),
    ],
    ids=["empty-class", "single-class", "overlap", "imbalance"],
)
def test_class_problems_fail_naming_class_and_fix(tmp_path: Path, layout: dict[str, int], extra: dict[str, object],
                                                  message: str) -> None:
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=10)
    target = tmp_path / "tgt"
    for name, count in layout.items():
        (target / name).mkdir(parents=True)
        write_class_folders(target, [name], per_class=count, seed=len(name))
    params = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target), **extra})
    ingest.run(params)
    with pytest.raises(PipelineError) as failure:
        validate.run(params)
    assert message in str(failure.value)


def test_overlap_passes_when_allowed(tmp_path: Path) -> None:
    source = write_class_folders(tmp_path / "src", ["x", "y"], per_class=10)
    target = write_class_folders(tmp_path / "tgt", ["x", "z"], per_class=10)
    params = shrunk_params(tmp_path, {"data.source_dir": str(source), "data.target_dir": str(target),
                                      "validate.allow_class_overlap": True})
    ingest.run(params)
    assert validate.run(params).success


def test_missing_raw_data_says_to_ingest(params: Params) -> None:
    with pytest.raises(PipelineError, match="run `tlpipe stage ingest` first"):
        validate.run(params)
