"""An identifier in an alert's summary is one JSON string (replayguard.core.summaries)."""

from __future__ import annotations

import json

import pytest

from replayguard.core.summaries import quoted


@pytest.mark.parametrize(("identifier", "shown"), [
    ("web-01", '"web-01"'),
    ("alice: locked out; no action needed", '"alice: locked out; no action needed"'),
    ('a"b', '"a\\"b"'),
    ("a\\", '"a\\\\"'),
    ('\\"', '"\\\\\\""'),
    ("line\nbreak\x01", '"line\\nbreak\\u0001"'),
    ("café", '"café"'),
    ("", '""'),
    ("null", '"null"'),
    (None, "null"),
])  # fmt: skip
def test_quoted_is_a_json_string(identifier: str | None, shown: str) -> None:
    """Each identifier is shown as exactly this JSON string; None is the bare word null."""
    assert quoted(identifier) == shown


@pytest.mark.parametrize("identifier", ['x" : locked out', "\\", '\\"', 'VM "web-01" presented an old receipt'])
def test_a_quoted_identifier_ends_where_its_own_quotes_end(identifier: str) -> None:
    """The quoted text read from the summary's first quote gives back the whole identifier,
    and the summary's own words follow it untouched."""
    summary = "5 consecutive failures for " + quoted(identifier) + ": locked out"
    value, end = json.JSONDecoder().raw_decode(summary, len("5 consecutive failures for "))
    assert value == identifier and summary[end:] == ": locked out"
