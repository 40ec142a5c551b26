"""params.yaml: every section loads from the real file, and mistakes fail before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.core.config import effective_raw, load_params
from components.core.errors import PipelineError
from tests.conftest import REPO


def _write(tmp_path: Path, edit) -> Path:
    raw = effective_raw(REPO / "params.yaml")
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_real_params_load_into_every_section(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", root=tmp_path)
    raw = effective_raw(REPO / "params.yaml")
    for section in raw:
        assert getattr(params, "validation" if section == "validate" else section) is not None
    assert params.paths.raw == tmp_path / raw["paths"]["raw"]
    with pytest.raises(Exception):
        params.finetune.epochs = 3  # frozen: nothing changes the params behind a stage's back


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["finetune"].update(epoch=3), "unknown key 'finetune.epoch'"),
        (lambda raw: raw.update(finetuen={}), "unknown key 'finetuen'"),
        (lambda raw: raw["data"].update(color_mode="sepia"), "'data.color_mode'"),
        (lambda raw: raw["clean"].update(val_fraction=1.5), "'clean.val_fraction'"),
        (lambda raw: raw["source"].update(mode="download", weights="http://x/w.keras"), "sha256"),
    ],
)
def test_mistakes_fail_naming_the_key(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(PipelineError) as error:
        load_params(_write(tmp_path, edit))
    assert message in str(error.value)


def test_relative_user_folders_are_taken_from_the_repository(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda raw: raw["data"].update(source_dir="mine/source"))
    assert load_params(path).data.source_dir == str(tmp_path / "mine/source")


def test_a_params_yaml_holds_only_what_it_changes_and_a_stage_records_the_effective_values(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  color_mode: rgb\n  image_size: 64\nfinetune:\n  epochs: 3\n")
    params = load_params(path)
    assert (params.data.color_mode, params.data.image_size, params.finetune.epochs) == ("rgb", 64, 3)
    defaults = effective_raw(REPO / "params.yaml")
    assert params.data.target_dir == defaults["data"]["target_dir"] == ""  # the rest: shipped defaults
    assert params.finetune.learning_rate == defaults["finetune"]["learning_rate"]
    assert not params.paths.effective_params.exists()
    load_params(path, record=True)
    recorded = yaml.safe_load(params.paths.effective_params.read_text())
    assert recorded["data"]["image_size"] == 64 and recorded["finetune"] == {**defaults["finetune"], "epochs": 3}
    assert recorded["paths"]["raw"] == "data/raw"  # relative, as written: the same on every machine
