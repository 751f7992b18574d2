"""The core stays sans-IO: standard library only, no clock, no randomness, no I/O."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "chatcore"
MODULES = sorted(CORE.glob("*.py"))

# Modules whose functions read the clock, draw randomness, touch the OS or
# the network, or run concurrently: the core must call none of them.
FORBIDDEN = {
    "time",
    "random",
    "secrets",
    "socket",
    "asyncio",
    "threading",
    "os",
    "select",
    "selectors",
    "subprocess",
    "multiprocessing",
    "signal",
    "uuid",
}
CLOCK_CALLS = {"now", "utcnow", "today"}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_there_are_modules_to_check() -> None:
    assert len(MODULES) >= 10


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_imports_only_the_standard_library(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for line, name in _imports(tree):
        top = name.split(".")[0]
        assert top == "__future__" or top in sys.stdlib_module_names, (
            f"{path.name}:{line} imports {name}, which is not in the standard library"
        )
        assert top not in FORBIDDEN, f"{path.name}:{line} imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_reads_no_clock(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            assert func.attr not in CLOCK_CALLS, f"{path.name}:{node.lineno} calls .{func.attr}()"
            if isinstance(func.value, ast.Name):
                assert func.value.id not in FORBIDDEN, (
                    f"{path.name}:{node.lineno} calls {func.value.id}.{func.attr}()"
                )


def test_the_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = ast.parse("import time\nfrom random import choice\nimport anyio\nx = datetime.now()")
    names = {name for _, name in _imports(bad)}
    assert names & FORBIDDEN == {"time", "random"}
    assert "anyio" not in sys.stdlib_module_names
