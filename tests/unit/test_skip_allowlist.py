"""The skip allow-list: which skips fail the run, and the file's own format."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import replayguard.http
from replayguard.http.app import AUDIENCE_MODULES
from tests.conftest import read_skip_allowlist, unlisted_skips


def test_unlisted_skip_is_reported_and_listed_one_is_not() -> None:
    """A skip matched by an allow-list glob passes; any other skip is returned as unlisted."""
    skipped = {"tests/a.py::test_one": "no x", "tests/b.py::test_two[p]": "no y"}
    assert unlisted_skips(skipped, {"tests/a.py::*": "x is optional"}) == {"tests/b.py::test_two[p]": "no y"}
    assert unlisted_skips(skipped, {"tests/*": "all"}) == {}
    assert unlisted_skips(skipped, {}) == skipped


def test_allowlist_entry_needs_a_reason(tmp_path: Path) -> None:
    """An allow-list line without a reason after '|' is a usage error, not a silent allowance."""
    path = tmp_path / "allow.txt"
    path.write_text("# comment\n\ntests/a.py::test_one | pamtester is optional here\n")
    assert read_skip_allowlist(path) == {"tests/a.py::test_one": "pamtester is optional here"}
    path.write_text("tests/a.py::test_one\n")
    with pytest.raises(pytest.UsageError):
        read_skip_allowlist(path)
    path.write_text("tests/a.py::test_one |  \n")
    with pytest.raises(pytest.UsageError):
        read_skip_allowlist(path)


def test_shipped_allowlist_parses() -> None:
    """The repository's tests/skip-allowlist.txt is well formed."""
    assert isinstance(read_skip_allowlist(), dict)


def test_every_http_module_with_routes_is_wired() -> None:
    """Every module of replayguard.http that declares ROUTES is an audience module of the app."""
    declaring = set()
    for info in pkgutil.iter_modules(replayguard.http.__path__):
        module = importlib.import_module(f"replayguard.http.{info.name}")
        if hasattr(module, "ROUTES"):
            declaring.add(module)
    assert declaring == set(AUDIENCE_MODULES)
