"""The rings of the package hold: the core is pure, and no inner ring imports an outer one.

Read from the source with ``ast`` (every import, top level or inside a function), so a
lazy import cannot slip past. The rings, inside out: ``core`` (and the pure parsers of
``hypervisors``), then ``pg`` and ``services``, then ``http`` and ``cli`` (docs/design.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "replayguard"
# What the core may import besides itself: pure standard library modules, three pure libraries,
# the package's version and its errors. No I/O, no event loop, no clock.
CORE_ALLOWED = {
    "__future__", "array", "base64", "binascii", "collections", "dataclasses", "datetime", "enum", "functools",
    "hashlib", "hmac", "json", "math", "re", "types", "typing",
    "pyotp", "cryptography", "orjson",
    "replayguard.core", "replayguard.errors",
}
CLOCK_READS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("datetime", "now"),
               ("datetime", "utcnow"), ("date", "today")}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if target.startswith("replayguard")}
    return found


def _files(*rings: str) -> list[Path]:
    return sorted(p for ring in rings for p in (PACKAGE / ring).rglob("*.py"))


@pytest.mark.parametrize("path", _files("core"), ids=lambda p: p.name)
def test_the_core_imports_nothing_that_does_io(path: Path) -> None:
    """A core module imports only pure standard library modules, pyotp, cryptography, orjson, and the core."""
    outside = {name for name in _imports(path) - {"replayguard", "replayguard.__version__"}
               if not any(name == ok or name.startswith(ok + ".") for ok in CORE_ALLOWED)}
    assert not outside, f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize("path", _files("core"), ids=lambda p: p.name)
def test_the_core_never_reads_the_clock(path: Path) -> None:
    """No core function reads the time: it takes ``now`` as a parameter."""
    calls = {(node.func.value.id, node.func.attr) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name)}
    assert not calls & CLOCK_READS, f"{path.name} reads the clock: {sorted(calls & CLOCK_READS)}"


@pytest.mark.parametrize(("ring", "outer"), [
    ("core", ("replayguard.pg", "replayguard.services", "replayguard.http", "replayguard.cli")),
    ("hypervisors", ("replayguard.pg", "replayguard.services", "replayguard.http", "replayguard.cli")),
    ("pg", ("replayguard.services", "replayguard.http", "replayguard.cli")),
    ("services", ("replayguard.http", "replayguard.cli")),
    ("sinks", ("replayguard.http", "replayguard.cli")),
])
def test_no_ring_imports_an_outer_one(ring: str, outer: tuple[str, ...]) -> None:
    """Modules of an inner ring never import the adapters or front ends around them."""
    wrong = {f"{path.relative_to(PACKAGE)}: {name}" for path in _files(ring) for name in _imports(path)
             if name.startswith(outer)}
    assert not wrong, sorted(wrong)
