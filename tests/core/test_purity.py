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


def import_problems(tree: ast.AST) -> list[str]:
    """Imports from outside the standard library, or of a forbidden module."""
    problems = []
    for line, name in _imports(tree):
        top = name.split(".")[0]
        if top != "__future__" and top not in sys.stdlib_module_names:
            problems.append(f"{line}: imports {name}, which is not in the standard library")
        elif top in FORBIDDEN:
            problems.append(f"{line}: imports {name}")
    return problems


def clock_problems(tree: ast.AST) -> list[str]:
    """Calls that read the clock (``.now()``, ``.today()``...) or go through a
    forbidden module's name (``time.monotonic()``, ``random.random()``)."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if func.attr in CLOCK_CALLS:
                problems.append(f"{node.lineno}: calls .{func.attr}()")
            elif isinstance(func.value, ast.Name) and func.value.id in FORBIDDEN:
                problems.append(f"{node.lineno}: calls {func.value.id}.{func.attr}()")
    return problems


def test_there_are_modules_to_check() -> None:
    assert len(MODULES) >= 10


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_imports_only_the_standard_library(path: Path) -> None:
    assert import_problems(ast.parse(path.read_text(), str(path))) == [], path.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_reads_no_clock(path: Path) -> None:
    assert clock_problems(ast.parse(path.read_text(), str(path))) == [], path.name


IMPURE = """\
import time
from random import choice
import anyio
from . import _codec
import datetime as dt

def stamp(x):
    started = dt.datetime.now()
    today = date.today()
    later = time.monotonic() + x
    return random.random(), os.getpid(), started, today, later
"""


def test_the_checkers_flag_what_they_must() -> None:
    tree = ast.parse(IMPURE)
    assert import_problems(tree) == [
        "1: imports time",
        "2: imports random",
        "3: imports anyio, which is not in the standard library",
    ]
    assert sorted(clock_problems(tree)) == [
        "10: calls time.monotonic()",
        "11: calls os.getpid()",
        "11: calls random.random()",
        "8: calls .now()",
        "9: calls .today()",
    ]


def test_the_checkers_pass_a_pure_module() -> None:
    tree = ast.parse("from dataclasses import dataclass\nimport heapq\nheapq.heappush([], now)\n")
    assert import_problems(tree) == []
    assert clock_problems(tree) == []
