"""The graph is written once, in dvc.yaml: commands, modules, order, params and paths all agree with it."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from components.core.config import effective_raw
from components.core.errors import PipelineError
from components.core.graph import stage_module
from tests.conftest import REPO

STAGES: dict[str, dict[str, Any]] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS: dict[str, Any] = effective_raw(REPO / "params.yaml")  # the shipped defaults, params.yaml over them
TEMPLATE = re.compile(r"\$\{([^}]*)\}")
OUTPUT_KINDS = ("outs", "metrics", "plots")
# Promotion runs after the graph, not in it (flows/retrain.py, `tlpipe promote`): the champion lives
# outside DVC, so its params section and the paths only it uses are not dvc.yaml's.
AFTER_THE_GRAPH = {"promote"}
PROMOTION_PATHS = set(re.findall(r"paths\.(\w+)", (REPO / "components/deploy/promote.py").read_text()))


def lookup(dotted: str) -> Any:
    value: Any = PARAMS
    for part in dotted.strip().split("."):
        value = value[part]
    return value


def resolve(text: str) -> PurePosixPath:
    return PurePosixPath(TEMPLATE.sub(lambda match: str(lookup(match.group(1))), text))


def raw_entries(stage: dict[str, Any], kind: str) -> Iterator[str]:
    """A stage's deps/outs/metrics/plots as written: a string, or the key of `{path: options}`."""
    for item in stage.get(kind) or []:
        yield next(iter(item)) if isinstance(item, dict) else item


def entries(stage: dict[str, Any], *kinds: str) -> list[PurePosixPath]:
    return [resolve(raw) for kind in kinds for raw in raw_entries(stage, kind)]


def strings(node: Any) -> Iterator[str]:
    """Every string in a YAML document, mapping keys included (outs with options are keyed by path)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def outputs(name: str) -> list[PurePosixPath]:
    return entries(STAGES[name], *OUTPUT_KINDS)


def overlap(a: PurePosixPath, b: PurePosixPath) -> bool:
    """The same path, or one inside the other (DVC tracks folders whole)."""
    return a == b or a in b.parents or b in a.parents


def module_file(name: str) -> Path | None:
    """The file of module `name` when it lives in components/ (a module or a package), else None."""
    if name.split(".")[0] != "components":
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def runs_code(path: Path) -> bool:
    """Whether importing the file runs more than its docstring and `from __future__` lines."""
    body = ast.parse(path.read_text()).body
    return any(
        not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
        for node in body
    )


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count: they run too)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1] if path.name != "__init__.py" else path.relative_to(REPO).parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) - node.level + 1], node.module or ""] if node.level else [node.module or ""])
            base = base.strip(".")
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from package import module`
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def code_closure(stage: str) -> set[str]:
    """components/<stage>.py and every file in components/ it imports, directly or not, whose import runs code."""
    start = REPO / "components" / f"{stage}.py"
    seen, todo = {start}, [start]
    while todo:
        for name in imported_modules(todo.pop()):
            found = module_file(name)
            if found is not None and found not in seen:
                seen.add(found)
                todo.append(found)
    return {str(path.relative_to(REPO)) for path in seen if path == start or runs_code(path)}


def tlpipe(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "components", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_calls_the_cli_with_its_own_name(name: str) -> None:
    assert STAGES[name]["cmd"] == f"tlpipe stage {name}"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_a_component_with_run_params_and_depends_on_it(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    module = stage_module(name)  # the same lookup `tlpipe stage` and the flow use
    assert Path(module.__file__) == REPO / "components" / f"{name}.py"
    assert callable(module.run)
    inspect.signature(module.run).bind("params")  # callable as run(params)
    assert PurePosixPath(f"components/{name}.py") in entries(STAGES[name], "deps"), "a code change must rerun the stage"


def test_every_code_dependency_exists() -> None:
    code = {dep for stage in STAGES.values() for dep in entries(stage, "deps") if dep.parts[0] == "components"}
    assert code, "dvc.yaml lists no code dependencies"
    assert sorted(str(dep) for dep in code if not (REPO / dep).is_file()) == []


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_depends_on_exactly_the_code_it_imports(name: str) -> None:
    """A library a stage imports, directly or through another, is a dep: editing it reruns the stage.

    Computed from the stage module's imports with ast (nothing is imported), for any stage dvc.yaml names.
    """
    listed = {str(dep) for dep in entries(STAGES[name], "deps") if dep.parts[0] == "components"}
    closure = code_closure(name)
    missing, extra = sorted(closure - listed), sorted(listed - closure)
    assert not missing and not extra, (
        f"dvc.yaml stage {name}: its code deps differ from what components/{name}.py imports.\n"
        + "".join(f"  add:    - {path}\n" for path in missing)
        + "".join(f"  remove: - {path}\n" for path in extra)
    )


def test_the_import_closure_follows_imports_at_any_depth_and_skips_docstring_only_packages() -> None:
    # The scratch stage imports its trainer only inside a function; the trainer then imports models.
    closure = code_closure("scratch")
    assert {"components/scratch.py", "components/training/scratch.py", "components/training/models.py"} <= closure
    assert "components/__init__.py" not in closure and "components/training/__init__.py" not in closure
    assert all((REPO / path).is_file() for path in closure)


def test_every_template_resolves_to_a_value_in_params_yaml() -> None:
    used = {match for text in strings(STAGES) for match in TEMPLATE.findall(text)}
    assert used
    for dotted in sorted(used):
        try:
            value = lookup(dotted)
        except (KeyError, TypeError):
            pytest.fail(f"dvc.yaml uses ${{{dotted}}}, which params.yaml does not define")
        assert isinstance(value, (str, int, float)), f"${{{dotted}}} is a {type(value).__name__}, not a value"


def test_every_path_is_written_once_in_params_yaml_and_used_by_dvc_yaml() -> None:
    used = {match.strip() for text in strings(STAGES) for match in TEMPLATE.findall(text)}
    unused = [f"paths.{key}" for key in PARAMS["paths"] if f"paths.{key}" not in used and key not in PROMOTION_PATHS]
    assert unused == []
    for name, stage in STAGES.items():
        for kind in ("deps", *OUTPUT_KINDS):
            for raw in raw_entries(stage, kind):
                is_code = raw.startswith("components/")
                assert is_code or raw.startswith("${paths."), f"{name} {kind}: '{raw}' is hard-coded, not from params.yaml paths:"


def test_no_two_outputs_overlap() -> None:
    declared = [(output, name) for name in STAGES for output in outputs(name)]
    for i, (a, first) in enumerate(declared):
        for b, second in declared[i + 1 :]:
            assert not overlap(a, b), f"{first} writes {a} and {second} writes {b}"


def test_dvc_yaml_order_is_a_topological_order_of_deps_and_outs() -> None:
    names = list(STAGES)
    for index, name in enumerate(names):
        for dep in entries(STAGES[name], "deps"):
            if dep.parts[0] == "components":
                continue
            writers = [other for other in names if any(overlap(dep, output) for output in outputs(other))]
            assert writers, f"{name} depends on {dep}, which no stage writes"
            assert all(names.index(writer) < index for writer in writers), f"{name} depends on {dep}, written by {writers}, which run later"


def sections(stage: dict[str, Any]) -> list[str]:
    """The params sections a stage lists, all read from the effective params file (defaults + params.yaml)."""
    entries = stage.get("params") or []
    assert all(isinstance(entry, dict) and list(entry) == ["${paths.effective_params}"] for entry in entries), \
        "params are read from ${paths.effective_params}, which holds every effective value"
    return [section for entry in entries for section in entry["${paths.effective_params}"]]


def test_every_params_section_a_stage_lists_exists_and_every_section_is_tracked() -> None:
    listed = {section for stage in STAGES.values() for section in sections(stage)}
    assert all(isinstance(section, str) for section in listed), "params entries are whole params sections"
    assert sorted(listed - set(PARAMS)) == [], "a stage lists a section the defaults do not have"
    assert sorted(set(PARAMS) - listed - {"paths"} - AFTER_THE_GRAPH) == [], "a section no stage lists never reruns anything when it changes"
    for name, stage in STAGES.items():
        if name in PARAMS:
            assert name in sections(stage), f"stage {name} does not list its own params section"


def test_the_flow_runs_the_dvc_yaml_stages_in_dvc_yaml_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import stage_order

    monkeypatch.chdir(REPO)
    assert stage_order() == list(STAGES)
    first, *_, last = STAGES
    assert stage_order([last, first]) == [first, last]
    with pytest.raises(PipelineError, match="nosuch") as error:
        stage_order([first, "nosuch"])
    assert all(name in str(error.value) for name in STAGES)


def test_tlpipe_stages_prints_the_dvc_yaml_stages_in_order() -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "tlpipe"), "stages"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == list(STAGES)


def test_an_unknown_stage_exits_1_listing_the_stages() -> None:
    result = tlpipe("stage", "nosuch")
    assert result.returncode == 1
    assert "unknown stage 'nosuch'" in result.stderr
    assert all(name in result.stderr for name in STAGES)


def test_an_unknown_params_key_fails_fast_naming_it(tmp_path: Path) -> None:
    raw = {"validate": {}}
    raw["validate"]["min_images_per_clas"] = 5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    result = tlpipe("stage", "validate", "--params", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    assert "unknown key 'validate.min_images_per_clas'" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.yaml"], "no work before the params are checked"


STAGE_MODULES = {f"components.{name}" for name in STAGES}
LIBRARIES = ("core", "data", "training", "deploy")


def test_no_stage_or_library_imports_a_stage() -> None:
    """Shared contracts live in libraries: a stage module imports only libraries, never another stage."""
    found = {}
    for path in [*(REPO / "components").glob("*.py"), *(f for lib in LIBRARIES for f in (REPO / "components" / lib).rglob("*.py"))]:
        own = f"components.{path.stem}"
        upward = sorted(imported_modules(path) & STAGE_MODULES - {own})
        if upward:
            found[str(path.relative_to(REPO))] = upward
    assert found == {}, f"move what these import into a library: {found}"


def test_only_the_applications_import_the_cli_and_the_flows() -> None:
    found = {}
    for path in (REPO / "components").rglob("*.py"):
        if (REPO / "components" / "apps") in path.parents or path.name == "__main__.py":  # entry points
            continue
        wrong = sorted(n for n in imported_modules(path) if n.startswith(("components.apps", "flows")))
        if wrong:
            found[str(path.relative_to(REPO))] = wrong
    assert found == {}


def test_dvc_reruns_only_the_stages_whose_params_changed_and_a_gate_never_retrains_the_baseline(tmp_path: Path) -> None:
    """DVC itself, on a copy of the graph whose outputs are recorded as they are (nothing trains):
    a gate threshold makes evaluate and report out of date, never the scratch baseline; the recipe does."""
    shutil.copytree(REPO / "components", tmp_path / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    for name, stage in STAGES.items():  # every declared input and output, as a file or a folder holding one
        for path in entries(stage, "deps", *OUTPUT_KINDS):
            target = tmp_path / path
            if path.parts[0] == "components" or target.exists():
                continue
            folder = target if not path.suffix else target.parent
            folder.mkdir(parents=True, exist_ok=True)
            (target / "x" if not path.suffix else target).write_text(name)
    effective = tmp_path / lookup("paths.effective_params")
    effective.write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    dvc = str(Path(sys.executable).with_name("dvc"))

    def out_of_date(changes: dict[str, Any]) -> set[str]:
        raw = yaml.safe_load(effective.read_text())
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            raw[section][key] = value
        effective.write_text(yaml.safe_dump(raw, sort_keys=False))
        done = subprocess.run([dvc, "status", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return {name for name, why in json.loads(done.stdout or "{}").items() if why != ["always changed"]}

    for command in (["init", "--no-scm", "-q"], ["commit", "--force", "-q"]):
        done = subprocess.run([dvc, *command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert out_of_date({}) == set()
    assert out_of_date({"evaluate.min_accuracy": 0.5}) == {"evaluate", "report"}
    restored = {"evaluate.min_accuracy": lookup("evaluate.min_accuracy")}
    assert out_of_date({**restored, "finetune.learning_rate": 0.001}) == {"scratch", "finetune", "report"}
