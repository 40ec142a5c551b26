"""The pipeline graph is written once, in dvc.yaml; the CLI and the Prefect flow read it from there."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

from components.core.errors import PipelineError

DVC_YAML = Path("dvc.yaml")

log = logging.getLogger(__name__)


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


def record_in_dvc(stages: list[str], params_path: Path) -> None:
    """Record stages that ran outside `dvc repro` (the Prefect flow, `tlpipe stage X` by hand) in dvc.lock
    (`dvc commit`), so `dvc status` agrees with what ran and `dvc repro` does not redo it.

    Only for the project's own params.yaml in a DVC project: dvc.yaml's stages read that one.
    Never inside `dvc repro` (DVC_STAGE is set there; DVC records the stage itself).
    """
    root = Path.cwd()
    if (not stages or os.environ.get("DVC_STAGE") or not (root / ".dvc").is_dir()
            or Path(params_path).resolve() != (root / "params.yaml").resolve()):
        return
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    result = subprocess.run([dvc, "commit", "--force", "--quiet", *stages], cwd=root, capture_output=True, text=True)
    if result.returncode == 0:
        log.info("recorded %s in dvc.lock: `dvc status` agrees with what ran", ", ".join(stages))
    else:
        said = (result.stderr or result.stdout).strip().splitlines() or [f"exit {result.returncode}"]
        log.warning("could not record %s in dvc.lock, so `dvc repro` may redo them: dvc commit: %s",
                    ", ".join(stages), said[-1])
