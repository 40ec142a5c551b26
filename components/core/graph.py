"""The pipeline graph is written once, in dvc.yaml; the CLI and the Prefect flow read it from there."""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any


from components.core.artifacts import ForeignOutputError, owned, read_yaml
from components.core.errors import PipelineError

if TYPE_CHECKING:
    from components.core.config import Params

DVC_YAML = Path("dvc.yaml")

log = logging.getLogger(__name__)


def stage_names(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """Stage names in the order dvc.yaml lists them (which is also an order their deps allow)."""
    if not Path(dvc_yaml).is_file():
        raise PipelineError(f"{dvc_yaml} not found: run tlpipe from the repository root")
    stages = (read_yaml(dvc_yaml) or {}).get("stages") or {}
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


def run_stage(name: str, params: "Params") -> Any:
    """Run stage `name` (what the CLI and the Prefect flow call); a refused output names its paths.* key."""
    module = stage_module(name)
    try:
        return module.run(params)
    except ForeignOutputError as error:
        keys = [key for key, path in params.paths.model_dump().items() if Path(path) == error.path]
        if error.key or not keys:
            raise
        raise ForeignOutputError(error.path, keys[0]) from None


def _dvc_paths(graph: dict, dvc_yaml: Path) -> dict[str, str]:
    """The `paths:` values dvc.yaml's `vars:` files give DVC (relative to dvc.yaml's folder)."""
    found: dict[str, str] = {}
    for source in graph.get("vars") or []:
        file, _, key = str(source).partition(":") if isinstance(source, str) else ("", "", "")
        path = Path(dvc_yaml).parent / file
        if key == "paths" and path.is_file():
            found.update({k: str(Path(dvc_yaml).parent / v)
                          for k, v in ((read_yaml(path) or {}).get("paths") or {}).items()})
    return found


def check_outputs(params: "Params", dvc_yaml: Path = DVC_YAML) -> None:
    """Refuse, naming the key, when any stage's declared output folder holds files tlpipe did not write.

    The first stage calls this for the whole graph: `dvc repro` deletes a stage's outputs before
    running it, so a user's folder at paths.clean would be gone before clean itself could refuse.
    Both where the stages write (params) and where DVC will delete (dvc.yaml's vars) are checked.
    """
    if not Path(dvc_yaml).is_file():
        return  # a library call outside a pipeline repository: atomic_dir still refuses, per output
    graph = read_yaml(dvc_yaml) or {}
    ours, dvcs = params.paths.model_dump(), _dvc_paths(graph, Path(dvc_yaml))
    for stage in (graph.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            name = next(iter(out)) if isinstance(out, dict) else out
            key = re.fullmatch(r"\$\{paths\.(\w+)\}", str(name))
            for candidate in (ours.get(key[1]), dvcs.get(key[1])) if key else ():
                if candidate and Path(candidate).is_dir() and not owned(candidate):
                    raise ForeignOutputError(candidate, key[1])
