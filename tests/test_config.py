"""params.yaml: every section loads from the real file, and mistakes fail before any work, naming the key."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from components.core.config import Params, effective_raw, load_params, set_dotted
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


@pytest.mark.parametrize(("section", "key", "value", "replacement"), [
    ("transfer", "freeze", "all", "finetune.unfreeze_top"),
    ("evaluate", "compare_scratch", True, "scratch.enabled"),
])
def test_a_removed_key_fails_naming_the_key_and_what_replaced_it(
        tmp_path: Path, section: str, key: str, value: object, replacement: str) -> None:
    # An older params.yaml still setting it: the same error from the file and from an override.
    with pytest.raises(PipelineError) as error:
        load_params(_write(tmp_path, lambda raw: raw[section].update({key: value})))
    assert f"'{section}.{key}' was removed" in str(error.value) and replacement in str(error.value)
    with pytest.raises(PipelineError, match=f"'{section}.{key}' was removed.*{replacement}"):
        set_dotted(effective_raw(REPO / "params.yaml"), {f"{section}.{key}": value})


def test_relative_user_folders_are_taken_from_the_repository(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda raw: raw["data"].update(source_dir="mine/source"))
    assert load_params(path).data.source_dir == str(tmp_path / "mine/source")


def _numeric_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(dotted key, is a list of numbers) for every int/float field of the params models, nested sections included."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _numeric_keys(annotation, key + ".")
            continue
        kinds = set(typing.get_args(annotation)) | {annotation}
        is_list = typing.get_origin(annotation) is tuple
        inner = {typing.get_origin(k) or k for k in kinds}
        flattened = set(inner)
        for kind in kinds:  # tuple[Annotated[int, ...], ...] and Annotated[...] | None
            for arg in typing.get_args(kind):
                flattened |= {arg} | set(typing.get_args(arg))
        if bool in flattened:
            continue  # a real bool setting (or jit_compile: auto | bool)
        if flattened & {int, float}:
            yield key, is_list


def test_every_numeric_setting_refuses_a_bool(tmp_path: Path) -> None:
    keys = list(_numeric_keys(Params))
    assert {"seed", "source.epochs", "finetune.epochs", "clean.val_fraction", "data.embedded_source_classes"} <= {
        key for key, _ in keys
    }
    for key, is_list in keys:
        bad = [True] if is_list else True
        path = _write(tmp_path, lambda raw, key=key, bad=bad: set_dotted(raw, {key: bad}))
        with pytest.raises(PipelineError) as error:
            load_params(path)
        assert f"'{key}" in str(error.value), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": -5}, "'seed': Input should be greater than or equal to 0"),
        ({"seed": 2**40}, "'seed': Input should be less than 4294967296"),
        ({"seed": "42"}, "'seed': Input should be a valid integer"),
        ({"source.epochs": True}, "'source.epochs': must be a whole number, not true"),
        ({"finetune.epochs": 2.5}, "'finetune.epochs': Input should be a valid integer"),
        ({"finetune.learning_rate": float("inf")}, "'finetune.learning_rate': Input should be a finite number"),
        ({"finetune.learning_rate": float("nan")}, "'finetune.learning_rate'"),
        ({"validate.drift_gate": "false"}, "'validate.drift_gate': Input should be a valid boolean"),
        ({"source.sha256": "g" * 64}, "'source.sha256': String should match pattern"),
        ({"source.sha256": "0" * 63}, "'source.sha256': String should match pattern"),
        ({"validate.min_side": 600, "validate.max_side": 500},
         "validate.min_side (600) is above validate.max_side (500)"),
        ({"clean.val_fraction": 0.5, "clean.test_fraction": 0.4}, "val_fraction + test_fraction must be below 0.9"),
        ({"data.embedded_source_classes": [1, 1]}, "data.embedded_source_classes must list one or more different"),
        ({"data.embedded_target_classes": []}, "data.embedded_target_classes must list one or more different"),
        ({"data.embedded_target_classes": [10]}, "'data.embedded_target_classes.0': Input should be less than or equal to 9"),
        ({"evaluate.min_transfer_gain": 0.05}, "evaluate.min_transfer_gain gates a comparison that scratch.enabled"),
        ({"source.mode": "download", "source.weights": "w.keras"}, "set source.sha256 to the file's 64-hex digest"),
    ],
)
def test_ranges_types_and_rules_between_keys_fail_naming_the_keys(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(PipelineError) as error:
        load_params(_write(tmp_path, lambda raw: set_dotted(raw, overrides)))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"seed": 0},
        {"seed": 2**32 - 1},
        {"source.sha256": "AB" * 32},
        {"finetune.learning_rate": 1},  # a whole number is a fine float
        {"validate.min_side": 500, "validate.max_side": 500},
        {"evaluate.min_transfer_gain": 0.05, "scratch.enabled": True},
        {"finetune.jit_compile": True},
    ],
)
def test_edge_values_inside_the_ranges_load(tmp_path: Path, overrides: dict[str, object]) -> None:
    params = load_params(_write(tmp_path, lambda raw: set_dotted(raw, overrides)), root=tmp_path)
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        holder = getattr(params, "validation" if section == "validate" else section) if section else params
        assert getattr(holder, leaf) == value


def test_every_relative_path_setting_is_taken_from_the_params_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "conf"
    folder.mkdir(parents=True)
    raw = effective_raw(REPO / "params.yaml")
    set_dotted(raw, {
        "data.source_dir": "photos/source", "data.target_dir": "~/photos/target",
        "source.cache_dir": "cache/weights", "source.mode": "download", "source.weights": "backbones/b.keras",
        "source.sha256": "0" * 64, "paths.raw": "data/raw", "paths.clean": str(tmp_path / "elsewhere"),
    })
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not the params file's folder: where the command runs must not matter

    params = load_params(Path("project/conf/params.yaml"))
    assert Path(params.data.source_dir).resolve() == folder / "photos/source"
    assert Path(params.source.cache_dir).resolve() == folder / "cache/weights"
    assert Path(params.source.weights).resolve() == folder / "backbones/b.keras"
    assert params.paths.raw.resolve() == folder / "data/raw"
    assert params.paths.clean == tmp_path / "elsewhere"  # absolute stays
    assert params.data.target_dir == str(Path.home() / "photos/target")  # ~ is the home folder

    url = load_params(_write(tmp_path, lambda raw: set_dotted(raw, {
        "source.mode": "download", "source.weights": "https://example.org/b.keras", "source.sha256": "0" * 64,
    })))
    assert url.source.weights == "https://example.org/b.keras"  # a URL is not a path


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


def test_backbone_and_variant_names_are_checked_against_their_registries(tmp_path: Path) -> None:
    from components.deploy.variant_registry import VARIANTS
    from components.training.backbones import BACKBONES

    def unknown(raw: dict) -> None:
        raw["model"]["backbone"] = "resnet18"
        raw["export"]["variants"] = ["fp16"]

    with pytest.raises(PipelineError) as error:
        load_params(_write(tmp_path, unknown))
    lines = str(error.value).splitlines()
    backbone = next(line for line in lines if "'model.backbone'" in line)
    variant = next(line for line in lines if "'export.variants.0'" in line)
    assert all(repr(name) in backbone for name in BACKBONES)
    assert all(repr(name) in variant for name in VARIANTS)
