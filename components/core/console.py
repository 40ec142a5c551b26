"""The console a person reads: library noise silenced once, at the source, for every entry point
(the CLI and so every dvc stage, the Prefect flow, the tests), and each stage's warnings collected.

tlpipe's own loggers (`tlpipe`, `components`, `flows`) speak at INFO; a library's records reach the
console only at ERROR, and its Python warnings not at all (`tlpipe -v` shows everything).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from components.core.reports import WarningsReport, write_report

OWN_LOGGERS = ("tlpipe", "components", "flows")

# Read once by the libraries, so set before they are imported.
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's temporary server builds a fresh database in more than its 20 s default on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}

# Loggers that chatter below ERROR about their own internals: GX's docs registry (200 lines per
# import), TF's retracing advice, Prefect's HTTP client (a line per API call).
NOISY_LOGGERS = {"great_expectations": logging.ERROR, "tensorflow": logging.ERROR, "absl": logging.ERROR,
                 "tf2onnx": logging.ERROR, "httpx": logging.WARNING, "h5py": logging.ERROR}


class _QuietLoader(importlib.abc.Loader):
    """Runs a module's import with file descriptor 2 on /dev/null: native code's banners go nowhere."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        try:
            self.loader.exec_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """TensorFlow's native libraries print absl/oneDNN banners while loading, whatever TF_CPP_MIN_LOG_LEVEL
    says (measured: 2 lines per process, 20 per `make run`); they load during `import tensorflow`."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and find_spec below must not find this finder again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_libraries() -> None:
    """Environment, TensorFlow's import and library log levels: what every entry point calls first."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class _OwnOrError(logging.Filter):
    """tlpipe's records at their level; a library's only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN_LOGGERS or record.levelno >= logging.ERROR


def setup(verbose: bool = False) -> None:
    """The console of a tlpipe process: quiet libraries, tlpipe's own lines with the time."""
    quiet_libraries()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(_OwnOrError())
    # A no-op where the root logger has handlers already (main() called in-process, by pytest say).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # a library's Python warnings become records, so the filter applies


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in OWN_LOGGERS:
            self.messages.append(record.getMessage())


def warnings_file(folder: Path, stage: str) -> Path:
    return Path(folder) / f"{stage}.json"


@contextmanager
def stage_warnings(stage: str, folder: Path) -> Iterator[list[str]]:
    """Collect the warnings tlpipe logs while a stage runs; at its end, repeat them in one block and record
    them in <folder>/<stage>.json, which `tlpipe summary` reads back."""
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    started = time.perf_counter()
    try:
        yield collect.messages
    finally:
        root.removeHandler(collect)
        write_report(warnings_file(folder, stage), WarningsReport(stage=stage, warnings=collect.messages))
        if collect.messages:
            lines = "\n".join(f"  - {message}" for message in collect.messages)
            logging.getLogger("tlpipe").warning("%s: %d warning(s) in %.0f s:\n%s", stage, len(collect.messages),
                                                time.perf_counter() - started, lines)
