"""The backbone and export-variant registries are the only lists of their names and facts.

Adding a backbone or a variant must touch one registry module (and, for a variant, its builder),
never a second list that silently falls behind: config validates against the registries, models,
download and export read them, and so do the tests. This test reads the code (nothing is imported
but the registries) and fails naming the file and line of any other list. Prose in docs/ and the
README may name them freely.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from components.deploy.variant_registry import NAMES as VARIANT_NAMES
from components.training.backbones import BACKBONES
from tests.conftest import REPO

REGISTRY_FILES = {"components/training/backbones.py", "components/deploy/variant_registry.py"}
NAME_SETS = {"backbone": frozenset(BACKBONES), "export variant": frozenset(VARIANT_NAMES)}
# Facts of a backbone that only its registry entry may spell out.
FACTS = {fact for spec in BACKBONES.values() for fact in (spec.imagenet_file, spec.imagenet_md5) if fact}
FACTS |= {Path(spec.imagenet_file).name for spec in BACKBONES.values() if spec.imagenet_file}


def scanned_files() -> list[Path]:
    code = [p for folder in ("components", "flows", "tests") for p in sorted((REPO / folder).rglob("*.py"))]
    return code + [REPO / "components/core/defaults.yaml", REPO / "params.yaml"]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9_]+", text))


def _names_in_one_line(text: str) -> list[str]:
    """A registry's names, two or more of them, in one line of text: a list of them."""
    words = _words(text)
    return [f"{kind} names {sorted(words & names)}" for kind, names in NAME_SETS.items() if len(words & names) >= 2]


def _registered(node: ast.AST) -> str | None:
    """The registered name a collection element spells: "vgg16", or pytest.param("vgg16", ...)."""
    if isinstance(node, ast.Call) and node.args:
        node = node.args[0]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        if any(node.value in names for names in NAME_SETS.values()):
            return node.value
    return None


def python_problems(source: str) -> list[tuple[int, str]]:
    """(line, problem) for each list of registered names, name dispatch or copied fact in Python source."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
            elements = [*node.keys, *node.values] if isinstance(node, ast.Dict) else node.elts
            spelled = {name for element in elements if element is not None and (name := _registered(element))}
            for kind, names in NAME_SETS.items():
                if len(spelled & names) >= 2:
                    problems.append((node.lineno, f"a list of {kind} names {sorted(spelled & names)}"))
        elif isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if name := _registered(operand):
                    problems.append((node.lineno, f"a comparison with {name!r}: give the registry entry a field instead"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            copied = sorted(fact for fact in FACTS if fact in node.value)
            if copied:
                problems.append((node.lineno, f"a copy of registry facts {copied}"))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            problems += [(token.start[0], f"a comment listing {found}") for found in _names_in_one_line(token.string)]
    return problems


def yaml_problems(text: str) -> list[tuple[int, str]]:
    """YAML values are choices the config checks against the registries; comments must not list the names."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        comment = line.partition("#")[2]
        problems += [(number, f"a comment listing {found}") for found in _names_in_one_line(comment)]
        copied = sorted(fact for fact in FACTS if fact in line)
        if copied:
            problems.append((number, f"a copy of registry facts {copied}"))
    return problems


def test_the_registries_are_the_only_lists_of_backbones_and_export_variants() -> None:
    found = []
    for path in scanned_files():
        relative = path.relative_to(REPO).as_posix()
        if relative in REGISTRY_FILES:
            continue
        text = path.read_text(encoding="utf-8")
        problems = python_problems(text) if path.suffix == ".py" else yaml_problems(text)
        found += [f"{relative}:{line}: {problem}" for line, problem in problems]
    assert not found, (
        "read these from components/training/backbones.py (BACKBONES) or "
        "components/deploy/variant_registry.py (VARIANTS) instead:\n" + "\n".join(found)
    )


@pytest.mark.parametrize("planted", [
    # the lists this project used to keep beside the registries
    "Backbone = Literal[{backbones}]",
    "variants: tuple[Literal[{variants}], ...]",
    "build = optimized if name == {variant!r} else int8",
    "IMAGENET = {{{backbone!r}: ({file!r}, 'x')}}",
    "x = 1  # {backbone_words}",
])
def test_the_check_finds_a_second_list(planted: str) -> None:
    spec = next(spec for spec in BACKBONES.values() if spec.imagenet_file)
    source = planted.format(
        backbones=", ".join(map(repr, BACKBONES)), variants=", ".join(map(repr, VARIANT_NAMES)),
        variant=VARIANT_NAMES[0], backbone=spec.name, file=spec.imagenet_file, backbone_words=" | ".join(BACKBONES),
    )
    assert python_problems(source), source


def test_the_check_finds_a_listing_comment_in_yaml_but_not_a_chosen_value() -> None:
    listing = "model:\n  # " + " | ".join(BACKBONES) + "\n  backbone: " + next(iter(BACKBONES)) + "\n"
    assert [line for line, _ in yaml_problems(listing)] == [2]
    chosen = "export:\n  variants: [" + ", ".join(VARIANT_NAMES) + "]\n"
    assert yaml_problems(chosen) == []
