"""Shared pieces of the pipeline-vs-plain-Keras benchmarks: temp repos, timed subprocesses, markdown.

Nothing here runs the pipeline inside the checkout: every run gets a fresh git + DVC repository
in a temporary folder holding a copy of components/, flows/, dvc.yaml and params.yaml.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


_BYTECODE: dict[str, str] = {}
# Imported once, untimed, to fill a fresh bytecode cache (see cache_bytecode).
WARM_UP = "import tensorflow, keras, great_expectations, prefect, tf2onnx, onnxruntime, sklearn, matplotlib, dvc.cli"


def env(**extra: str) -> dict[str, str]:
    """The Makefile's environment: quiet libraries, the venv's bin first (dvc.yaml calls `tlpipe`)."""
    return {**os.environ, **QUIET, **_BYTECODE, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def cache_bytecode(directory: Path | None) -> None:
    """Let every measured process write and reuse compiled bytecode under `directory`.

    A normal Python install caches .pyc files beside the sources after the first import. Where
    PYTHONDONTWRITEBYTECODE=1 is set and the venv was installed without compiling (uv's default),
    every process compiles TensorFlow and the rest from source again; this measures the other
    case without writing into the venv (PYTHONPYCACHEPREFIX), after one untimed warm-up import.
    """
    _BYTECODE.clear()
    if directory is None:
        return
    _BYTECODE.update(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(directory))
    subprocess.run([sys.executable, "-c", WARM_UP], env=env(), check=True, capture_output=True)


def add_common_arguments(parser: argparse.ArgumentParser, runs: bool = True,
                         pycache_help: str = "cache compiled bytecode here (see harness.cache_bytecode)") -> None:
    """The flags every benchmark takes: --runs (median of N), --ref, --pycache."""
    if runs:
        parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ref", help="benchmark this commit instead of the working tree")
    parser.add_argument("--pycache", type=Path, help=pycache_help)


def bytecode_note() -> str:
    if _BYTECODE:
        return f"bytecode cached in {_BYTECODE['PYTHONPYCACHEPREFIX']} (warmed before timing)"
    import importlib.util

    # A venv made by `make` (UV_COMPILE_BYTECODE=1) holds compiled bytecode beside every module.
    compiled = any((Path(importlib.util.find_spec("keras").origin).parent / "__pycache__").glob("*.pyc"))
    state = "set" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "not set"
    return (f"venv {'compiled to bytecode at install' if compiled else 'without compiled bytecode'} "
            f"(PYTHONDONTWRITEBYTECODE {state})")


PROJECT_FILES = ("components", "flows", "dvc.yaml", ".gitignore", "params.yaml")


def make_repo(dest: Path, overrides: dict[str, object] | None = None, ref: str | None = None) -> Path:
    """A committed git + DVC repository with the project's code and params.yaml (overrides applied).

    `ref`: take the files from that commit (`git archive`) instead of the working tree, which
    other people may be editing while a benchmark runs.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if ref:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, *PROJECT_FILES], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for name in PROJECT_FILES:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / name, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(with_keys(dest / "params.yaml", overrides or {}), sort_keys=False))
    init_repo(dest)
    return dest


def with_keys(params_yaml: Path, overrides: dict[str, object]) -> dict:
    """params.yaml's mapping with dotted keys set, sections made as needed: params.yaml holds only what
    the demo changes, so most keys live in the shipped defaults alone (each key is checked there)."""
    from components.core.config import effective_raw, set_dotted  # the checkout's

    set_dotted(effective_raw(params_yaml), overrides)  # an unknown key stops here
    raw = yaml.safe_load(params_yaml.read_text()) or {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = raw
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    return raw


def init_repo(root: Path) -> None:
    # Analytics off, as the project's own .dvc/config has it: else every dvc command leaves a
    # detached analytics process behind, competing for the cores with what is measured next.
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                    ["git", "add", "-A"],
                    ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=root, env=env(), check=True, capture_output=True)


@dataclass(frozen=True)
class Timed:
    seconds: float
    peak_rss_mib: float  # the largest single process of the tree (ru_maxrss of the waited child)
    load: tuple[float, float, float]  # 1, 5, 15 min load averages at the end
    stdout: str
    cpu_seconds: float = 0.0  # user + system time of the whole process tree (wait4)


def timed(command: Sequence[str], cwd: Path, extra_env: dict[str, str] | None = None,
          check: bool = True) -> Timed:
    """Wall time and peak RSS of one command run in the repository `cwd`; rusage from wait4 covers
    its whole process tree. PYTHONPATH makes `tlpipe` import the repository's own copy of the code
    (the editable install would otherwise import the checkout's)."""
    with open(cwd / ".bench-out.log", "w+") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env(**{"PYTHONPATH": str(cwd), **(extra_env or {})}), stdout=out,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if check and process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}) in {cwd}:\n{text[-4000:]}")
    return Timed(seconds, usage.ru_maxrss / 1024, os.getloadavg(), text, usage.ru_utime + usage.ru_stime)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def load_text(loads: Sequence[tuple[float, float, float]]) -> str:
    """The 1-minute load average over the measurements: min-max, so a reader sees how busy it was."""
    ones = [load[0] for load in loads]
    return f"{min(ones):.2f}-{max(ones):.2f}"


def header(title: str) -> str:
    """What every result table carries: machine, date, the exact command."""
    command = " ".join([".venv/bin/python", str(Path(sys.argv[0]).resolve().relative_to(REPO)), *sys.argv[1:]])
    cpu = platform.processor() or platform.machine()
    return "\n".join([
        f"### {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.system()} {platform.release()} {cpu}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average at start "
        f"(1/5/15 min): {'/'.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- Python: {bytecode_note()}",
        "",
    ])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_names() -> list[str]:
    """The stages in dvc.yaml order (the graph is written there only)."""
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
