"""The pipeline graph is written once, in dvc.yaml; the CLI and the Prefect flow read it from there."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import yaml

from components.core.errors import PipelineError

DVC_YAML = Path("dvc.yaml")


def stage_names(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """Stage names in the order dvc.yaml lists them (which is also an order their deps allow)."""
    if not Path(dvc_yaml).is_file():
        raise PipelineError(f"{dvc_yaml} not found: run tlpipe from the repository root")
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    return list(stages)


def stage_module(name: str, dvc_yaml: Path = DVC_YAML) -> ModuleType:
    """The component module that implements stage `name`."""
    names = stage_names(dvc_yaml)
    if name not in names:
        raise PipelineError(f"unknown stage '{name}': the stages are {', '.join(names)}")
    return importlib.import_module(f"components.{name}")
