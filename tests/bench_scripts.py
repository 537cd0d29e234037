"""bench/'s scripts as modules, for the tests that run or judge them (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conftest import REPO


def load(script: str, name: str | None = None) -> ModuleType:
    """Executes ``bench/<script>.py`` as the module ``name`` (the script's own name by default),
    registered in ``sys.modules``: dataclasses look their module up there."""
    name = name or script
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
