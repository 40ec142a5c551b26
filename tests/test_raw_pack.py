"""data/raw's packs: files kept byte for byte, read by offset, and every damaged pack or index named."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from components.core.errors import PipelineError
from components.data import raw_pack
from tests.conftest import pack_folder, raw_files, write_class_folders


def _files(count: int) -> dict[str, bytes]:
    # Sizes that do not fill tar's 512-byte blocks, and names tar's old formats could not hold.
    return {f"cat/{'deep/' * 30}{i:03d}-é.png" if i % 7 == 0 else f"cat/{i:03d}.jpg": bytes([i % 251]) * (700 + 37 * i)
            for i in range(count)}


def test_files_roll_over_into_bounded_packs_and_read_back_exactly(tmp_path: Path) -> None:
    files = _files(60)
    with raw_pack.PackWriter(tmp_path / "a", pack_bytes=16 << 10) as out:
        out.add_class("empty")
        for path, data in files.items():
            out.add(path, "cat", data)
    packs = sorted((tmp_path / "a").glob("pack-*.tar"))
    assert len(packs) > 3 and all(p.stat().st_size <= (16 << 10) + 20480 for p in packs)
    assert raw_files(tmp_path / "a") == files
    assert raw_pack.classes(tmp_path / "a") == ["cat", "empty"]
    # Standard tar: every file comes back with `tar -xf`, with its name.
    with tarfile.open(packs[0]) as pack:
        first = pack.getmembers()[0]
        assert pack.extractfile(first).read() == files[first.name]

    # The same files give the same bytes (no times or owners inside), so DVC sees the same hash.
    with raw_pack.PackWriter(tmp_path / "b", pack_bytes=16 << 10) as out:
        out.add_class("empty")
        for path, data in files.items():
            out.add(path, "cat", data)
    assert [p.read_bytes() for p in packs] == [p.read_bytes() for p in sorted((tmp_path / "b").glob("pack-*.tar"))]
    assert raw_pack.digest(tmp_path / "a") == raw_pack.digest(tmp_path / "b")


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    return pack_folder(write_class_folders(tmp_path / "mine", ["cat", "dog"], per_class=3), tmp_path / "raw" / "target")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / raw_pack.pack_name(0)).unlink(), r"pack-00000\.tar is missing \(the index names it\)"),
    (lambda f: (f / raw_pack.pack_name(0)).write_bytes(b"\0" * 512), r"pack-00000\.tar is shorter than the index says"),
    (lambda f: (f / raw_pack.INDEX_FILE).write_text("path,label\ncat/a.png,cat\n"), "does not start with the columns"),
    (lambda f: (f / raw_pack.INDEX_FILE).write_text(
        ",".join(raw_pack.INDEX_COLUMNS) + "\ncat/a.png,cat,0,x,5,abc\n"), r"line 2: malformed row"),
    (lambda f: (f / raw_pack.INDEX_FILE).unlink(), r"has no index\.csv"),
    (lambda f: (f / raw_pack.CLASSES_FILE).write_text("{oops"), r"classes\.json cannot be read"),
])
def test_a_damaged_pack_or_index_is_named_with_the_fix(packed: Path, damage, message: str) -> None:
    damage(packed)
    with pytest.raises(PipelineError, match=message) as caught:
        raw_pack.classes(packed)
        list(raw_pack.members(packed))
    assert "rerun `tlpipe stage ingest`" in str(caught.value)


def test_a_folder_per_image_from_an_older_tlpipe_is_refused_with_the_fix(tmp_path: Path) -> None:
    old = write_class_folders(tmp_path / "raw" / "target", ["cat"], per_class=2)
    with pytest.raises(PipelineError, match=r"a file per image, the layout of an older tlpipe; rerun `tlpipe stage ingest`"):
        list(raw_pack.members(old))
    with pytest.raises(PipelineError, match=r"not found; run `tlpipe stage ingest` first"):
        raw_pack.classes(tmp_path / "nowhere")


def test_validate_inspects_packed_files_the_same_in_worker_processes(packed: Path) -> None:
    """validate.workers > 1 spreads the decoding over processes: the same facts, in the same order."""
    from components.data.images import inspect_files

    with raw_pack.PackWriter(packed.parent / "bad") as out:
        out.add("cat/cut.png", "cat", raw_files(packed)["cat/cat_0000.png"][:40])
        out.add("cat/notes.txt", "cat", b"hello")
    jobs = [(str(folder / raw_pack.pack_name(m.pack)), m.offset, m.size, m.path)
            for folder in (packed, packed.parent / "bad") for m in raw_pack.members(folder)]
    here = list(inspect_files(jobs, 10**6, 8, 8192, workers=1))
    assert list(inspect_files(jobs, 10**6, 8, 8192, workers=2, chunk=2)) == here
    assert [facts["error"] == "" for facts in here] == [True] * 6 + [False, False]
    assert here[-1]["error"].startswith("not an image: file name suffix '.txt'") and here[0]["dhash"]
