"""The alert stream's event ids (``core/stream_ids.py``): parsing, and where a resumed
stream goes on."""

from __future__ import annotations

from typing import Any

import pytest

from replayguard.core import stream_ids
from replayguard.core.stream_ids import EventId


def _alert(change: int, alert_id: str = "7", count: int = 1) -> dict[str, Any]:
    return {"id": alert_id, "kind": "reuse", "count": count, "details": {"b": 1, "a": [2]}, "change": change}


@pytest.mark.parametrize(("raw", "parsed"), [
    ("0", EventId(0, None)),
    ("42", EventId(42, None)),
    (" 42 ", EventId(42, None)),
    ("42.0123456789abcdef", EventId(42, "0123456789abcdef")),
    ("9" * 18, EventId(int("9" * 18), None)),
])
def test_ids_the_stream_sends_parse(raw: str, parsed: EventId) -> None:
    """A bare change number, or a change number and 16 lowercase hex digits, parses."""
    assert stream_ids.parse(raw) == parsed


@pytest.mark.parametrize("raw", ["", "x1", "42.", ".0123456789abcdef", "42.0123456789ABCDEF",
                                 "42.0123456789abcde", "42.0123456789abcdef0", "-1", "9" * 19, "4 2", "42.x"])
def test_anything_else_is_refused(raw: str) -> None:
    """Any other text is a ValueError (the handler's 400), never taken for a position."""
    with pytest.raises(ValueError, match="not an event id"):
        stream_ids.parse(raw)


def test_an_alerts_id_names_its_change_and_depends_on_all_it_shows() -> None:
    """The id is the change number and a digest of the alert as sent: the same alert gives
    the same id whatever the order of its keys, and another id, or another count, another."""
    alert = _alert(5)
    reordered = dict(reversed(list(alert.items())))
    assert stream_ids.of_alert(alert) == stream_ids.of_alert(reordered)
    assert stream_ids.of_alert(alert).startswith("5.")
    assert stream_ids.parse(stream_ids.of_alert(alert)).change == 5
    assert stream_ids.of_alert(alert) != stream_ids.of_alert(_alert(5, alert_id="8"))
    assert stream_ids.of_alert(alert) != stream_ids.of_alert(_alert(5, count=2))


def test_a_position_is_the_change_held_or_the_start() -> None:
    """An id-only frame names the change the database holds there, or ``0``."""
    assert stream_ids.position(None) == (0, "0")
    assert stream_ids.position(_alert(9)) == (9, stream_ids.of_alert(_alert(9)))


def _claim(alert: dict[str, Any]) -> EventId:
    return stream_ids.parse(stream_ids.of_alert(alert))


@pytest.mark.parametrize(("claimed", "held", "last", "after"), [
    # The database holds the client's change as the client got it: after it.
    (_claim(_alert(5)), _alert(5), 9, 5),
    # Another alert numbered the same (a restore numbered it again): the start.
    (_claim(_alert(5)), _alert(5, alert_id="8"), 9, 0),
    # The same alert in another state at that number: the start.
    (_claim(_alert(5)), _alert(5, count=2), 9, 0),
    # The change is gone (its alert changed again since, or a restore lost it): the start.
    (_claim(_alert(5)), _alert(4), 9, 0),
    (_claim(_alert(5)), None, 0, 0),
    # Past the database's last change: the start.
    (_claim(_alert(5)), _alert(3), 3, 0),
    # A bare number is taken as it is, unless past the last change.
    (EventId(5, None), _alert(4), 9, 5),
    (EventId(5, None), None, 5, 5),
    (EventId(6, None), _alert(5), 5, 0),
    (EventId(0, None), None, 0, 0),
])
def test_where_a_resumed_stream_goes_on(claimed: EventId, held: dict[str, Any] | None, last: int, after: int) -> None:
    """After the claimed change only when the database holds it as the client got it (a bare
    number: when not past the last change); anywhere else from the start, never after it."""
    assert stream_ids.resume_after(claimed, held, last) == after
