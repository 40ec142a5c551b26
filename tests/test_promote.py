"""Champion and challenger on real exported ONNX models: first champion, worse rejected, better promoted, kill-safe."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.apps.cli import main
from components.core.config import Params, load_params
from components.deploy.promote import run
from tests.conftest import REPO, shrunk_params, write_clean_dataset, write_shrunk_params_yaml

CLASSES = ["x", "y", "z"]
# Absolute gates the one-class-dead model (accuracy 2/3) and the two-classes-dead one (1/3) both
# pass, so the second is rejected by the regression gate alone.
GATES = {"evaluate.min_accuracy": 0.3, "evaluate.min_macro_f1": 0.0, "promote.max_regression": 0.0}


def kill_classes(model: Path, dead: int, out: Path) -> Path:
    """A copy of the ONNX model whose first `dead` classes are never predicted: their logits, the
    bias added just before the softmax, pushed down by 1000. A real model, damaged in its weights."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(model)
    nodes = {output: node for node in proto.graph.node for output in node.output}
    softmax = next(node for node in proto.graph.node if node.op_type == "Softmax")
    add = nodes[softmax.input[0]]
    assert add.op_type == "Add", f"expected the head's bias Add before the softmax, found {add.op_type}"
    bias = next(init for init in proto.graph.initializer if init.name in add.input)
    values = numpy_helper.to_array(bias).copy()
    values[:dead] -= 1000.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, out)
    return out


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real ONNX models from one trained, exported model: `best` (every class right), and
    `one_dead` / `two_dead` (one or two classes never predicted: test accuracy 2/3 and 1/3).

    Also leaves the clean target split and `best`'s export bundle under the fixture's root.
    """
    import keras

    from components import export
    from components.core.artifacts import write_json
    from components.data.dataset import load_split
    from components.training.models import build_model, save_model_dir

    root = tmp_path_factory.mktemp("models")
    params = shrunk_params(root, {"export.variants": []})
    splits = {"train": 30, "val": 6, "test": 10}
    write_clean_dataset(params.paths.clean, "target", CLASSES, splits, params.data.image_size, seed=3)
    write_json(params.paths.gates, {"passed": True, "gates": []})
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, params.data, len(CLASSES), bn_inference=True)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train, test = (load_split(params.paths.clean, "target", split) for split in ("train", "test"))
    model.fit(train.images(np.arange(len(train))), train.y, epochs=15, batch_size=16, verbose=0)
    accuracy = float((model.predict(test.images(np.arange(len(test))), verbose=0).argmax(axis=1) == test.y).mean())
    assert accuracy == 1.0, f"the fixture's model should learn the bars perfectly, got {accuracy}"
    save_model_dir(model, tuple(CLASSES), params.paths.finetuned_model)
    export.run(params)
    best = Path(shutil.copy(params.paths.onnx_model, root / "best.onnx"))
    return {
        "root": root,
        "best": best,
        "one_dead": kill_classes(best, 1, root / "one_dead.onnx"),
        "two_dead": kill_classes(best, 2, root / "two_dead.onnx"),
    }


def workspace(root: Path, models: dict[str, Path], extra: dict[str, object] | None = None) -> Params:
    """A repository-like folder: params.yaml (shrunk, gates above), the clean split; no model yet."""
    write_shrunk_params_yaml(root / "params.yaml", {**GATES, **(extra or {})})
    params = load_params(root / "params.yaml")
    shutil.copytree(models["root"] / "data" / "clean", params.paths.clean)
    return params


def challenge(params: Params, model: Path) -> None:
    params.paths.onnx_model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, params.paths.onnx_model)


def snapshot(params: Params) -> dict[str, object]:
    """What promotion may touch: where production points, and the sha256 of every file of every release."""
    releases = params.paths.releases
    files = {str(p.relative_to(releases)): sha256(p) for p in sorted(releases.rglob("*")) if p.is_file()}
    link = os.readlink(params.paths.production) if params.paths.production.is_symlink() else None
    return {"link": link, "files": files, "served": hashlib.sha256((params.paths.production / "model.onnx").read_bytes()).hexdigest()}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_first_champion_then_a_worse_challenger_is_rejected_and_a_better_one_promoted(
    tmp_path: Path, onnx_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    params = workspace(tmp_path, onnx_models)
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "code")
    commit = git(tmp_path, "rev-parse", "HEAD")

    # First run: no champion, absolute gates only, and the decision says so.
    challenge(params, onnx_models["one_dead"])
    first = run(params)
    assert first.decision == "promoted" and first.version == "v1"
    assert "no champion yet: absolute gates only" in first.reasons
    report = json.loads(params.paths.promotion_report.read_text())
    assert report["first_champion"] is True and report["champion"] is None
    assert [g["name"] for g in report["gates"]] == ["min_accuracy", "min_macro_f1"]
    assert report["challenger"]["metrics"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert os.readlink(params.paths.production) == "releases/v1"
    assert sha256(params.paths.production / "model.onnx") == sha256(onnx_models["one_dead"])
    assert git(tmp_path, "rev-parse", "model-v1^{commit}") == commit

    # A worse challenger: rejected by the regression gate, through the CLI (exit 0, said on stdout).
    before = snapshot(params)
    challenge(params, onnx_models["two_dead"])
    assert main(["promote", "--params", str(tmp_path / "params.yaml")]) == 0
    assert "challenger rejected (production is v1)" in capsys.readouterr().out
    assert snapshot(params) == before, "a rejected challenger must leave the champion byte-for-byte unchanged"
    report = json.loads(params.paths.promotion_report.read_text())
    assert report["decision"] == "rejected" and report["version"] == "v1"
    regression = next(g for g in report["gates"] if g["name"] == "max_accuracy_regression")
    assert regression["passed"] is False and regression["value"] == pytest.approx(1 / 3, abs=1e-6)
    assert any(r.startswith("max_accuracy_regression: 0.33") for r in report["reasons"])
    assert report["champion"]["sha256"] == sha256(onnx_models["one_dead"])
    assert "challenger rejected" in params.paths.promotion_summary.read_text()
    assert git(tmp_path, "tag", "--list") == "model-v1"

    # A better challenger: promoted as v2 with its lineage; v1 stays whole for a rollback.
    shutil.copytree(onnx_models["root"] / "models" / "bundle", params.paths.bundle)
    challenge(params, onnx_models["best"])
    (tmp_path / "uncommitted.txt").write_text("untracked files do not make the tree dirty\n")
    better = run(params)
    assert better.decision == "promoted" and better.version == "v2"
    assert os.readlink(params.paths.production) == "releases/v2"
    release = params.paths.releases / "v2"
    assert sorted(p.name for p in release.iterdir()) == ["MODEL_CARD.md", "labels.txt", "lineage.json", "model.onnx"]
    assert sha256(release / "model.onnx") == sha256(onnx_models["best"])
    assert (release / "labels.txt").read_text() == "x\ny\nz\n"
    lineage = json.loads((release / "lineage.json").read_text())
    assert lineage["version"] == "v2" and lineage["replaced"] == "v1" and lineage["tag"] == "model-v2"
    assert lineage["onnx_sha256"] == sha256(onnx_models["best"])
    assert lineage["code"] == {"commit": commit, "dirty": False}
    assert lineage["metrics"]["challenger"]["accuracy"] == 1.0
    assert lineage["metrics"]["champion"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert set(lineage["metrics"]["challenger"]["per_class"]) == set(CLASSES)
    assert {g["name"]: g["passed"] for g in lineage["gates"]} == {
        "min_accuracy": True, "min_macro_f1": True, "max_accuracy_regression": True, "max_macro_f1_regression": True
    }
    assert lineage["params"]["promote"] == {"max_regression": 0.0, "tag_prefix": "model-v"}
    assert lineage["params"]["evaluate"]["min_accuracy"] == 0.3
    assert "paths" not in lineage["params"], "machine-specific absolute paths stay out of the record"
    card = (release / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: tlpipe image classifier"), "the export bundle's card comes first"
    assert "Classes (3)" in card and "## Lineage: release v2" in card
    assert lineage["onnx_sha256"] in card and commit in card and "`model-v2`" in card and "Replaced: v1" in card
    assert sha256(params.paths.releases / "v1" / "model.onnx") == sha256(onnx_models["one_dead"])
    assert git(tmp_path, "rev-parse", "model-v2^{commit}") == commit

    # The same model again is kept: no new version, nothing rewritten.
    before = snapshot(params)
    again = run(params)
    assert again.decision == "kept" and again.version == "v2" and snapshot(params) == before


def test_a_first_challenger_below_the_absolute_gates_is_not_promoted(tmp_path: Path, onnx_models: dict[str, Path]) -> None:
    params = workspace(tmp_path, onnx_models, {"evaluate.min_accuracy": 0.9})
    challenge(params, onnx_models["one_dead"])

    result = run(params)

    assert result.decision == "rejected" and result.version is None
    assert result.reasons[0] == "no champion yet: absolute gates only"
    assert any(r.startswith("min_accuracy: 0.66") for r in result.reasons)
    assert not params.paths.production.exists() and not params.paths.releases.exists()


# A real `tlpipe promote` in a child process, killed with SIGKILL at a chosen point of its steps:
# right after the first file of the new release is written and fsynced (a half-written release
# folder), or right after one of promotion's steps returns for the new version v2.
KILLED_PROMOTE = """
import os, signal, sys
from components.apps.cli import main
from components.deploy import promote

point, params_path = sys.argv[1:3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "release_file":
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "model.onnx":
            die()
    os.fsync = fsync
else:
    real = getattr(promote, point)
    def killed_after(*args):
        result = real(*args)
        if point != "_ensure_tag" or getattr(args[1], "version", None) == "v2":
            die()
        return result
    setattr(promote, point, killed_after)
sys.exit(main(["promote", "--params", params_path]))
"""


def promote_killed(params_yaml: Path, point: str) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_PROMOTE, point, str(params_yaml)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def test_a_promotion_killed_while_writing_the_release_leaves_production_whole(
    tmp_path: Path, onnx_models: dict[str, Path]
) -> None:
    params = workspace(tmp_path, onnx_models)
    challenge(params, onnx_models["one_dead"])
    assert run(params).version == "v1"
    before = snapshot(params)
    challenge(params, onnx_models["best"])

    promote_killed(tmp_path / "params.yaml", "release_file")

    leftovers = [p for p in params.paths.releases.iterdir() if p.name.startswith(".v2.")]
    assert [sorted(f.name for f in p.iterdir()) for p in leftovers] == [["model.onnx"]], "killed mid-release"
    assert snapshot(params)["link"] == before["link"] == "releases/v1"
    assert snapshot(params)["served"] == before["served"]
    assert not (params.paths.releases / "v2").exists()

    # The next run is unaffected by the leftover, removes it, and promotes normally.
    assert run(params).version == "v2"
    assert not [p.name for p in params.paths.releases.iterdir() if p.name.startswith(".")]
    assert sha256(params.paths.production / "model.onnx") == sha256(onnx_models["best"])


@pytest.mark.parametrize("point", ["_write_release", "_point_production", "_ensure_tag"])
def test_a_rerun_completes_a_promotion_killed_after_any_step(tmp_path: Path, onnx_models: dict[str, Path], point: str) -> None:
    """Killed after the release is written, after production moved to it, or after the tag: the rerun
    ends where an uninterrupted promotion ends (production v2, one release each, the lineage's tag real)."""
    params = workspace(tmp_path, onnx_models)
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "code")
    commit = git(tmp_path, "rev-parse", "HEAD")
    challenge(params, onnx_models["one_dead"])
    assert run(params).version == "v1"
    challenge(params, onnx_models["best"])

    promote_killed(tmp_path / "params.yaml", point)

    moved = point != "_write_release"
    assert os.readlink(params.paths.production) == ("releases/v2" if moved else "releases/v1")
    assert (git(tmp_path, "tag", "--list") == "model-v1\nmodel-v2") == (point == "_ensure_tag")
    # A commit made since must not move the tag the release's lineage names.
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "later")

    rerun = run(params)

    assert rerun.version == "v2" and rerun.decision == ("kept" if moved else "promoted")
    assert sorted(p.name for p in params.paths.releases.iterdir()) == ["v1", "v2"]
    assert os.readlink(params.paths.production) == "releases/v2"
    assert sha256(params.paths.production / "model.onnx") == sha256(onnx_models["best"])
    lineage = json.loads((params.paths.production / "lineage.json").read_text())
    assert lineage["tag"] == "model-v2" and lineage["code"]["commit"] == commit
    assert git(tmp_path, "tag", "--list") == "model-v1\nmodel-v2"
    assert git(tmp_path, "rev-parse", "model-v2^{commit}") == commit
    report = json.loads(params.paths.promotion_report.read_text())
    assert report["version"] == "v2" and report["tag"] == "model-v2"
    if point == "_point_production":
        assert any("created the git tag model-v2" in reason for reason in rerun.reasons)
    if point == "_write_release":
        assert any("an interrupted promotion's release" in reason for reason in rerun.reasons)


def test_a_re_export_of_the_champion_is_kept(tmp_path: Path, onnx_models: dict[str, Path]) -> None:
    """The same weights exported again are the same model: kept, not promoted as a new version."""
    from components import export
    from components.core.config import with_overrides

    params = workspace(tmp_path, onnx_models)
    challenge(params, onnx_models["best"])
    assert run(params).version == "v1"
    fixture = shrunk_params(onnx_models["root"], {"export.variants": []})
    again = with_overrides(fixture, {
        "paths.onnx_model": str(params.paths.onnx_model), "paths.export_report": str(tmp_path / "export.json"),
        "paths.bundle": str(tmp_path / "bundle"), "paths.onnx_variants": str(tmp_path / "variants"),
    })
    export.run(again)

    result = run(params)

    assert result.decision == "kept" and result.version == "v1"
    assert sorted(p.name for p in params.paths.releases.iterdir()) == ["v1"]
