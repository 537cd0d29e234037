"""Packaging: every package of the tree is listed in pyproject.toml, and the SQL ships inside the package."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from replayguard.pg import schema

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_of_the_tree_is_in_the_wheel() -> None:
    """Each directory of replayguard/ with an __init__.py, and the mapped SQL packages, are listed as packages."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "replayguard").rglob("__init__.py")}
    assert on_disk | {"replayguard.migrations", "replayguard.migrations.functions"} == listed


def test_the_sql_directories_are_mapped_into_the_package() -> None:
    """The top-level migrations/ directory is the package replayguard.migrations, with its .sql files as data."""
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"replayguard.migrations": "migrations"}
    assert setuptools["package-data"]["replayguard.migrations"] == ["*.sql"]
    assert setuptools["package-data"]["replayguard.migrations.functions"] == ["*.sql", "superseded.txt"]


def test_the_shipped_sql_is_loaded_through_importlib_resources() -> None:
    """load_migrations and load_functions find every file of the tree's SQL directories."""
    assert [m.name for m in schema.load_migrations()] == sorted(p.name for p in (REPO / "migrations").glob("*.sql"))
    function_files = (REPO / "migrations" / "functions").glob("*.sql")
    assert [f.name for f in schema.load_functions()] == sorted(p.stem for p in function_files)


def test_no_function_is_defined_outside_its_own_file() -> None:
    """Numbered migrations hold no CREATE FUNCTION or CREATE TRIGGER;
    each function file defines the function it is named for."""
    for migration in schema.load_migrations():
        upper = migration.sql.upper()
        assert "CREATE FUNCTION" not in upper and "CREATE OR REPLACE FUNCTION" not in upper, migration.name
        assert "CREATE TRIGGER" not in upper, migration.name
    for function in schema.load_functions():
        assert f"CREATE OR REPLACE FUNCTION {function.name}(" in function.sql, function.name
        assert function.sql.count("CREATE OR REPLACE FUNCTION") == 1, function.name
