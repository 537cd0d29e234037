"""One source for the values clients see: SQL and the OpenAPI document use the Python enums' values.

Reasons, verdicts, flags, alert kinds, severities and event types are enums in
``replayguard/core``; the stored functions set them as SQL literals and the OpenAPI
document lists them. These tests read the SQL files and the document and fail on any
value the enums do not define, and on any enum value the document leaves out.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import pytest

from replayguard.core import cef
from replayguard.core.decisions import AlertKind, Flag, Reason, Severity, Verdict
from replayguard.core.events import EventType
from replayguard.http.callouts import DECISION_SCHEMA
from replayguard.http.hypervisor import EVENT_SCHEMA

REPO = Path(__file__).resolve().parents[2]
SQL = "\n".join(p.read_text() for p in sorted((REPO / "migrations" / "functions").glob("*.sql")))
PYTHON = "\n".join(p.read_text() for p in sorted((REPO / "replayguard").rglob("*.py")))


def _values(enum: type[Enum]) -> set[str]:
    return {member.value for member in enum}


@pytest.mark.parametrize(("pattern", "enum"), [
    (r"v_reason\s*:=\s*'(\w+)'", Reason),
    (r"v_verdict\s*:=\s*'(\w+)'", Verdict),
    (r"v_flags\s*:=\s*v_flags\s*\|\|\s*'(\w+)'", Flag),
])
def test_every_decision_literal_in_sql_is_an_enum_value(pattern: str, enum: type[Enum]) -> None:
    """Each reason, verdict and flag rg_decide sets is a value of the Python enum."""
    found = set(re.findall(pattern, SQL))
    assert found, f"no match for {pattern}: the test no longer reads the SQL"
    assert found <= _values(enum)


def test_every_alert_raised_anywhere_has_a_known_kind_and_severity() -> None:
    """Every rg_alert('kind', 'severity', ...) call, in SQL or Python, names an AlertKind and a Severity."""
    calls = re.findall(r"rg_alert\('(\w+)',\s*'(\w+)'", SQL + PYTHON)
    assert len(calls) >= 8
    assert {kind for kind, _ in calls} <= _values(AlertKind)
    assert {severity for _, severity in calls} <= _values(Severity)


def test_every_alert_kind_has_a_cef_name() -> None:
    """The CEF formatter names every alert kind instead of falling back to its identifier."""
    assert _values(AlertKind) <= set(cef.KIND_NAMES)


def test_the_openapi_decision_schema_lists_exactly_the_enums() -> None:
    """The decision body's enums in the OpenAPI document are the Python enums' values, all of them."""
    props = DECISION_SCHEMA["properties"]
    assert isinstance(props, dict)
    assert set(props["decision"]["enum"]) == _values(Verdict)
    assert set(props["reason"]["enum"]) == _values(Reason)
    assert set(props["flags"]["items"]["enum"]) == _values(Flag)


def test_the_openapi_event_schema_lists_every_event_type() -> None:
    """The generic event's type enum is EventType's values."""
    props = EVENT_SCHEMA["properties"]
    assert isinstance(props, dict)
    assert set(props["type"]["enum"]) == _values(EventType)


def test_alert_severities_in_sql_match_the_severity_enum() -> None:
    """The alerts table's severity CHECK allows exactly the Severity values."""
    core = (REPO / "migrations" / "001_core.sql").read_text()
    check = re.search(r"severity\s+text\s+NOT NULL CHECK \(severity IN \(([^)]*)\)\)", core)
    assert check is not None
    assert set(re.findall(r"'(\w+)'", check.group(1))) == _values(Severity)
