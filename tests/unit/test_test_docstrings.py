"""Every test states the behaviour it checks in a docstring (the project's rule 8)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def undocumented_tests(root: Path) -> list[str]:
    """``path:line name`` of each test function under ``root``'s test_*.py files without a docstring."""
    missing = []
    for path in sorted(root.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
                    and not ast.get_docstring(node)):
                missing.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return missing


def test_every_test_function_has_a_docstring() -> None:
    """Each test function in tests/**/test_*.py, nested ones too, has a docstring."""
    assert undocumented_tests(TESTS) == []


def test_a_test_without_a_docstring_is_found(tmp_path: Path) -> None:
    """The scan reports each test function, sync or async, without a docstring, and no helper or documented test."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(
        'def helper():\n    pass\n\n\n'
        'def test_documented():\n    """Says what it checks."""\n\n\n'
        'def test_bare():\n    assert True\n\n\n'
        'class TestGroup:\n    async def test_bare_async(self):\n        pass\n'
    )
    assert undocumented_tests(tmp_path / "tests") == [
        "tests/test_sample.py:9 test_bare", "tests/test_sample.py:14 test_bare_async"]
