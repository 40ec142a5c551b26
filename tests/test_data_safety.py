"""The user's data is never lost: outputs never replace a folder tlpipe did not write, killed runs leave no litter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from components import clean, ingest, validate
from components.apps.cli import main
from components.core import artifacts
from components.core.config import Paths, effective_raw
from components.core.errors import PipelineError
from tests.conftest import REPO, shrunk_params, write_class_folders, write_shrunk_params_yaml

# Every folder output a stage replaces whole, and the stage that writes it; the stages before it
# run first so it has its inputs.
FOLDER_OUTPUTS = {
    "raw": "ingest",
    "data_docs": "validate",
    "clean": "clean",
    "source_model": "source",
    "transferred_model": "transfer",
    "finetune_checkpoint": "finetune",
    "finetuned_model": "finetune",
    "explained_errors": "evaluate",
    "onnx_variants": "export",
    "bundle": "export",
}
# Folders that are not replaced whole: the production link, releases (one new folder per version,
# never an existing one), the training curves (one file per metric, rewritten file by file) and the
# stages' warnings (one file per stage).
NOT_REPLACED_WHOLE = {"production", "releases", "training_curves", "warnings"}
STAGES = ["ingest", "validate", "clean", "source", "transfer", "finetune", "evaluate", "report", "export"]


def test_every_folder_output_is_in_the_refusal_table() -> None:
    folders = {key for key, value in Paths.model_fields.items() if "." not in Path(_default(key)).name}
    assert folders - NOT_REPLACED_WHOLE == set(FOLDER_OUTPUTS)


def _default(key: str) -> str:
    import yaml

    return effective_raw(REPO / "params.yaml")["paths"][key]


def _stage(root: Path, name: str, extra: dict[str, object] | None = None) -> int:
    params_yaml = write_shrunk_params_yaml(root / "params.yaml", {"export.variants": ["optimized"], **(extra or {})})
    return main(["stage", name, "--params", str(params_yaml)])


def _users_folder(root: Path) -> Path:
    folder = root / "my_photos"
    folder.mkdir(exist_ok=True)
    (folder / "holiday.jpg").write_bytes(b"the only copy")
    return folder


def _assert_refused(root: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _users_folder(root)
    capsys.readouterr()
    assert _stage(root, FOLDER_OUTPUTS[key], {f"paths.{key}": str(folder)}) == 1
    error = capsys.readouterr().err
    assert (folder / "holiday.jpg").read_bytes() == b"the only copy"
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]  # nothing added, nothing left behind
    assert f"paths.{key}" in error and str(folder) in error and "was not written by tlpipe" in error, error


@pytest.mark.parametrize("key", ["raw", "data_docs", "clean"])
def test_a_data_output_pointed_at_a_users_folder_is_refused_and_the_folder_kept(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    for stage in STAGES[: STAGES.index(FOLDER_OUTPUTS[key])]:
        assert _stage(tmp_path, stage) == 0
    _assert_refused(tmp_path, key, capsys)


def test_dvc_repro_never_deletes_a_users_folder_at_a_later_stages_output(tmp_path: Path) -> None:
    """`dvc repro` deletes a stage's outputs before it runs: the first stage refuses for the whole graph."""
    import shutil

    import yaml

    for name in ("components", "flows"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    graph = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"vars": graph["vars"],
                                                       "stages": {s: stages[s] for s in STAGES[:3]}}))
    folder = _users_folder(tmp_path)
    # DVC takes the paths from the defaults file dvc.yaml names (a params.yaml may not redefine them):
    # the user edited it to point paths.clean at their folder.
    defaults = tmp_path / "components/core/defaults.yaml"
    defaults.write_text(defaults.read_text().replace("  clean: data/clean", f"  clean: {folder.name}"))
    write_shrunk_params_yaml(tmp_path / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert (folder / "holiday.jpg").read_bytes() == b"the only copy"
    assert "paths.clean" in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        for stage in STAGES:
            assert _stage(root, stage) == 0, stage
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("key", ["source_model", "transferred_model", "finetune_checkpoint", "finetuned_model",
                                 "onnx_variants", "bundle"])
def test_a_model_output_pointed_at_a_users_folder_is_refused_and_the_folder_kept(
    pipeline_outputs: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    _assert_refused(pipeline_outputs, key, capsys)


def test_outputs_tlpipe_wrote_are_replaced_and_an_older_unmarked_one_is_named_with_the_fix(tmp_path: Path) -> None:
    params = shrunk_params(tmp_path)
    ingest.run(params)
    assert (params.paths.raw / artifacts.OWNER_MARKER).is_file()
    (params.paths.raw / "target" / "pack-00000.tar").write_bytes(b"x")  # a changed tree is rebuilt, not refused
    assert ingest.run(params).rewritten
    assert (params.paths.raw / "target" / "pack-00000.tar").stat().st_size > 1

    (params.paths.raw / artifacts.OWNER_MARKER).unlink()  # what an earlier tlpipe version left
    (params.paths.raw / "target" / "extra.png").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"if it is an output of an earlier tlpipe version, remove it"):
        ingest.run(params)
    assert (params.paths.raw / "target" / "extra.png").is_file()


def _kill_clean_midway(params_yaml: Path, at: str) -> int:
    """Run the real clean stage in a child and `kill -9` it at `at`: "tmp" while the new folder is
    still a temporary, "old" between the swap and the removal of the previous output."""
    code = f"""
import os, shutil, sys
real_replace, real_rmtree = os.replace, shutil.rmtree
def wait_for_the_kill():
    print("ready", flush=True)
    sys.stdin.read()
def replace(src, dst):
    if {at!r} == "tmp" and os.path.basename(str(src)).startswith(".clean.") and str(src).endswith(".tmp"):
        wait_for_the_kill()
    return real_replace(src, dst)
def rmtree(path, *args, **kwargs):
    # Only this run's own .old folder: the sweep of an earlier run's leftovers (same suffix) must go on.
    if {at!r} == "old" and str(path).endswith(".old") and f".{{os.getpid()}}-" in os.path.basename(str(path)):
        wait_for_the_kill()
    return real_rmtree(path, *args, **kwargs)
os.replace, shutil.rmtree = replace, rmtree
from components.apps.cli import main
sys.exit(main(["stage", "clean", "--params", {str(params_yaml)!r}]))
"""
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return child.pid


def test_temporaries_of_a_killed_clean_are_swept_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    for stage in ("ingest", "validate", "clean"):
        assert _stage(tmp_path, stage) == 0
    params = shrunk_params(tmp_path)
    data = params.paths.clean.parent
    def left() -> list[str]:
        return sorted(p.name.rsplit(".", 1)[-1] for p in data.iterdir() if p.name.startswith(".clean."))

    first = _kill_clean_midway(tmp_path / "params.yaml", "old")
    assert left() == ["old"]  # killed after the swap, while removing the previous output
    second = _kill_clean_midway(tmp_path / "params.yaml", "tmp")
    assert left() == ["old", "tmp"]  # killed between moving the old folder aside and moving the new one in
    # ...and both are the second run's own: it removed the first run's leftover before it was killed.
    assert all(f".{second}-" in p.name for p in data.iterdir() if p.name.startswith(".clean.")), (first, second)
    live = data / f".clean.{os.getppid()}-abcdefgh.tmp"  # a writer that still runs: not ours to remove
    live.mkdir()

    clean.run(params)
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".clean.")) == [live.name]
    assert json.loads((params.paths.clean / "target" / "classes.json").read_text()) == ["5", "6", "7", "8", "9"]


def test_a_header_only_csv_manifest_says_it_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\n")
    params = shrunk_params(tmp_path, {"data.target_dir": str(tmp_path / "labels.csv")})
    with pytest.raises(PipelineError, match=r"labels.csv has a header but no rows"):
        ingest.run(params)


def test_a_repeated_csv_row_is_quarantined_as_a_repeat_and_validate_passes(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "photos", ["cat", "dog"], per_class=12)
    rows = ["path,label", *(f"{label}/{label}_{i:04d}.png,{label}" for label in ("cat", "dog") for i in range(12)),
            "cat/cat_0003.png,cat"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    params = shrunk_params(tmp_path, {"data.target_dir": str(root / "labels.csv")})
    ingest.run(params)
    assert validate.run(params).success
    clean.run(params)
    quarantine = json.loads(params.paths.quarantine.read_text())
    target = [q for q in quarantine["quarantined"] if q["task"] == "target"]
    assert target == [{"task": "target", "path": "target/cat/cat/cat_0003.png", "label": "cat",
                       "reason": "listed twice in the CSV manifest under the same label"}]
    assert quarantine["reconciled"]
