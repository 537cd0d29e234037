"""bench/run.py refuses to measure another checkout's SQL under this checkout's name."""

from __future__ import annotations

from pathlib import Path

from tests.bench_scripts import load

run = load("run", "bench_run_sql_check")


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_identical_trees_differ_in_nothing(tmp_path: Path) -> None:
    """Two copies of the same migrations and functions: no difference, so a worktree sharing an
    environment may measure its own Python."""
    files = {"001_core.sql": "CREATE TABLE t ();", "functions/rg_f.sql": "SELECT 1;"}
    assert run.sql_differences(_tree(tmp_path / "a", files), _tree(tmp_path / "b", files)) == []


def test_an_edited_missing_or_extra_file_is_named(tmp_path: Path) -> None:
    """A function edited in one tree, a migration only in the other and one only in the first are
    each named; other files are not looked at."""
    ours = _tree(tmp_path / "a", {"001_core.sql": "x", "019_new.sql": "y", "functions/rg_f.sql": "SELECT 2;",
                                  "README.txt": "a"})
    served = _tree(tmp_path / "b", {"001_core.sql": "x", "functions/rg_f.sql": "SELECT 1;",
                                    "functions/rg_g.sql": "SELECT 3;", "README.txt": "b"})
    assert run.sql_differences(ours, served) == ["019_new.sql", "functions/rg_f.sql", "functions/rg_g.sql"]


def test_this_checkout_serves_its_own_sql() -> None:
    """In this checkout's environment the service would load this checkout's SQL (the check passes)."""
    assert run.sql_differences(run.REPO / "migrations", run.served_sql()) == []
    run.check_sql()
