"""docs/api.md names everything the code can answer: routes, reasons, flags, alert kinds, event types, error codes."""

from __future__ import annotations

import enum
import re

import pytest

from replayguard import errors
from replayguard.core.cef import KIND_NAMES
from replayguard.core.decisions import AlertKind, Flag, Reason, Severity
from replayguard.core.events import EventType
from replayguard.http import openapi
from replayguard.http.app import all_routes
from tests.conftest import REPO

DOC = (REPO / "docs" / "api.md").read_text()
FLAT = " ".join(DOC.split())  # line breaks inside a phrase do not count


def test_every_route_is_documented() -> None:
    """Each registered route's method and path appear in docs/api.md (as a heading or in a list)."""
    missing = [f"{r.method} {r.path}" for r in all_routes()
               if r.path not in DOC and not r.path.startswith("/console")]
    assert not missing, f"docs/api.md does not document: {missing}"


@pytest.mark.parametrize("values", [Reason, Flag, AlertKind, Severity, EventType], ids=lambda e: e.__name__)
def test_every_value_is_documented(values: type[enum.Enum]) -> None:
    """Every reason, flag, alert kind, severity and event type the code uses is named in docs/api.md."""
    missing = [v.value for v in values if f"`{v.value}`" not in DOC]
    assert not missing, f"docs/api.md does not name: {missing}"


def test_every_error_code_is_documented() -> None:
    """The code of each error class the package raises (4xx and 503) has a row in the errors table."""
    sources = "\n".join(p.read_text() for p in (REPO / "replayguard").rglob("*.py") if p.name != "errors.py")
    used = [cls for cls in vars(errors).values() if isinstance(cls, type)
            and issubclass(cls, errors.ReplayGuardError) and cls.status != 500 and cls.__name__ in sources]
    codes = {cls.code for cls in used}
    assert "conflict" in codes and "ledger_rollback" in codes
    rows = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", DOC, re.MULTILINE))
    assert codes <= rows, codes - rows


def test_every_cef_name_is_documented() -> None:
    """The CEF name of every alert kind appears in the sinks section."""
    missing = [name for name in KIND_NAMES.values() if name not in FLAT]
    assert not missing, missing


def test_a_decision_always_has_an_integer_seq_and_a_receipt() -> None:
    """The served OpenAPI document (built from the route table) declares a decision's `seq`
    an integer and its `receipt` a string, never null, and docs/api.md promises no null
    `seq` (CONTRACT v1.1 §4: every answer carries its integer seq and a fresh receipt)."""
    document = openapi.build(all_routes())
    for path in ("/v1/otp/verify", "/v1/nonces/consume"):
        schema = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        props = schema["properties"]
        assert props["seq"]["type"] == "integer", (path, props["seq"])
        assert props["receipt"]["type"] == "string", (path, props["receipt"])
        assert {"seq", "receipt"} <= set(schema["required"]), (path, schema["required"])
    start = DOC.index("### `POST /v1/otp/verify`")
    section = DOC[start:DOC.find("\n### ", start + 1)]
    assert '"seq": null' not in section and "hot cache" not in section, section
