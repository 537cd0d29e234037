"""migrations/functions/superseded.txt lists every earlier committed version of each stored
function, so a build upgrades a database of any earlier release and refuses one of a later."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from replayguard.pg import schema

REPO = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    path = str(REPO / "scripts" / "superseded-functions")
    loader = importlib.machinery.SourceFileLoader("superseded_functions", path)
    spec = importlib.util.spec_from_loader("superseded_functions", loader)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_earlier_committed_version_of_a_function_is_listed() -> None:
    """Each committed version of a function file that differs from the file now is in
    superseded.txt (run scripts/superseded-functions after changing a function)."""
    assert shutil.which("git") and (REPO / ".git").exists(), "the tests run from a git checkout"
    wanted = set(_script().superseded())
    listed = {f"{name} {digest.hex()}" for name, digests in schema.load_superseded().items() for digest in digests}
    assert wanted <= listed, sorted(wanted - listed)


def test_no_shipped_version_is_listed_as_superseded() -> None:
    """A function's current version is never listed as an earlier one (the build would
    otherwise call its own version older than itself)."""
    superseded = schema.load_superseded()
    for function in schema.load_functions():
        assert function.digest not in superseded.get(function.name, set()), function.name
