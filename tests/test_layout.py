"""The package's imports flow one way (docs/LAYOUT.md): a lower floor never imports a higher one.

Every import is counted, at module level, inside functions and under TYPE_CHECKING alike: a
function-level or type-only import that points up is still a loop in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moemerge"

FLOORS: list[tuple[str, ...]] = [
    ("moemerge", "moemerge.units", "moemerge.finite"),
    ("moemerge.architectures", "moemerge.distributed"),
    ("moemerge.checkpoint", "moemerge.data"),
    ("moemerge.merge", "moemerge.calibrate"),
    ("moemerge.diagnose",),
    ("moemerge.config", "moemerge.pipeline"),
    ("moemerge.cli", "moemerge.__main__"),
]
"""Bottom to top. A module belongs to the floor of the longest prefix listed; `moemerge` itself
(the version string) is the ground floor, and a prefix of nothing else: a new top-level module
must be given its floor here."""

SIDE_BY_SIDE = [("moemerge.merge", "moemerge.calibrate")]
"""Pairs on one floor that must not import each other: the two stages."""


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moemerge module `path` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moemerge":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moemerge"}
    return found


def _unit(module: str) -> str:
    """The longest listed prefix of `module`: the unit whose floor it lives on."""
    listed = [prefix for floor in FLOORS for prefix in floor]
    matches = [p for p in listed if module == p or (p != "moemerge" and module.startswith(p + "."))]
    if not matches:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layout.py and docs/LAYOUT.md")
    return max(matches, key=len)


def _floor(module: str) -> int:
    unit = _unit(module)
    return next(i for i, floor in enumerate(FLOORS) if unit in floor)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_module_imports_a_higher_floor():
    upward = [
        f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _floor(target) > _floor(module)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("left, right", SIDE_BY_SIDE)
def test_stages_do_not_import_each_other(left, right):
    crossing = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if {_unit(module), _unit(target)} == {left, right}
    ]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    for start in sorted(graph):
        seen, stack = set(), [start]
        while stack:
            for target in graph.get(stack.pop(), ()):
                if target == start:
                    cycles.append(start)
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
    assert not cycles, f"modules on an import cycle: {sorted(set(cycles))}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a module-level, a function-level and a type-only upward import are all found."""
    modules = {"moemerge.merge.x": tmp_path / "x.py", "moemerge.pipeline.run": tmp_path / "r.py"}
    modules["moemerge.merge.x"].write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from moemerge.pipeline import run\n"
        "def f():\n    import moemerge.calibrate.walk\n"
    )
    found = _imports(modules["moemerge.merge.x"], modules)
    assert found == {"moemerge.pipeline.run", "moemerge.calibrate.walk"}
    assert _floor("moemerge.pipeline.run") > _floor("moemerge.merge.x")
    assert {_unit("moemerge.merge.x"), _unit("moemerge.calibrate.walk")} == set(SIDE_BY_SIDE[0])
