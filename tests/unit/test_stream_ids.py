"""The alert stream's event ids (``core/stream_ids.py``): parsing, and where a resumed
stream goes on."""

from __future__ import annotations

from typing import Any

import pytest

from replayguard.core import stream_ids
from replayguard.core.stream_ids import EventId

C = "0123456789abcdef"
R = "fedcba9876543210"


def _alert(change: int, alert_id: str = "7", count: int = 1, first_seen: str = "2026-12-01T10:00:00.000001Z",
           vm_id: str | None = "vm-1", principal: str | None = "alice") -> dict[str, Any]:
    return {"id": alert_id, "kind": "reuse", "count": count, "details": {"b": 1, "a": [2]}, "change": change,
            "first_seen": first_seen, "vm_id": vm_id, "principal": principal}


@pytest.mark.parametrize(("raw", "parsed"), [
    ("0", EventId(0)),
    ("42", EventId(42)),
    (" 42 ", EventId(42)),
    (f"42.7.{C}.{R}", EventId(42, 7, C, R)),
    ("9" * 18, EventId(int("9" * 18))),
    (f"{'9' * 18}.{'9' * 18}.{C}.{R}", EventId(int("9" * 18), int("9" * 18), C, R)),
])
def test_ids_the_stream_sends_parse(raw: str, parsed: EventId) -> None:
    """A bare change number, or a change number, an alert id and two digests of 16 lowercase
    hex digits, parses."""
    assert stream_ids.parse(raw) == parsed


@pytest.mark.parametrize("raw", ["", "x1", "42.", f".7.{C}.{R}", f"42.7.{C.upper()}.{R}", f"42.7.{C[:-1]}.{R}",
                                 f"42.7.{C}0.{R}", f"42.7.{C}.{R}0", f"42.7.{C}", f"42.{C}", f"42.{C}.{R}",
                                 f"42..{C}.{R}", f"42.x.{C}.{R}", f"42.{'9' * 19}.{C}.{R}", f"42.-7.{C}.{R}",
                                 f"42.7.{C}.{R}.1", "-1", "9" * 19, "4 2", "42.x"])
def test_anything_else_is_refused(raw: str) -> None:
    """Any other text is a ValueError (the handler's 400), never taken for a position; the
    numbers in it fit a bigint."""
    with pytest.raises(ValueError, match="not an event id"):
        stream_ids.parse(raw)


def test_an_alerts_id_names_its_change_and_alert_and_depends_on_all_it_shows() -> None:
    """The id is the change number, the alert id, a digest of the alert as sent and one of
    what raised it: the same alert gives the same id whatever the order of its keys; another
    count changes the content digest only; another alert id, time first seen, VM or
    principal changes the raised digest too."""
    alert = _alert(5)
    reordered = dict(reversed(list(alert.items())))
    parsed = stream_ids.parse(stream_ids.of_alert(alert))
    assert stream_ids.of_alert(alert) == stream_ids.of_alert(reordered)
    assert (parsed.change, parsed.alert) == (5, 7)
    counted = stream_ids.parse(stream_ids.of_alert(_alert(6, count=2)))
    assert counted.content != parsed.content and counted.raised == parsed.raised
    for other in (_alert(5, alert_id="8"), _alert(5, first_seen="2026-12-01T10:00:00.000002Z"),
                  _alert(5, vm_id="vm-2"), _alert(5, principal=None)):
        again = stream_ids.parse(stream_ids.of_alert(other))
        assert again.content != parsed.content and again.raised != parsed.raised


def test_a_position_is_the_change_held_or_the_start() -> None:
    """An id-only frame names the change the database holds there, or ``0``."""
    assert stream_ids.position(None) == (0, "0")
    assert stream_ids.position(_alert(9)) == (9, stream_ids.of_alert(_alert(9)))


def _claim(alert: dict[str, Any]) -> EventId:
    return stream_ids.parse(stream_ids.of_alert(alert))


@pytest.mark.parametrize(("claimed", "at", "named", "last", "after"), [
    # (1) The database holds the client's change as the client got it: after it.
    (_claim(_alert(5)), _alert(5), _alert(5), 9, 5),
    # (2) The client's alert, raised as it was, changed again since: after the client's change.
    (_claim(_alert(5)), None, _alert(8, count=2), 9, 5),
    (_claim(_alert(5)), None, _alert(9, count=3), 9, 5),
    # (3) Another alert numbered the same (a restore numbered it again): the start.
    (_claim(_alert(5)), _alert(5, alert_id="8"), _alert(7, count=2), 9, 0),
    # (3) The same alert in another state at that number: the start.
    (_claim(_alert(5)), _alert(5, count=2), _alert(5, count=2), 9, 0),
    # (3) No alert under that id, or another one raised under it (after a restore).
    (_claim(_alert(5)), None, None, 9, 0),
    (_claim(_alert(5)), None, _alert(8, vm_id="vm-2"), 9, 0),
    (_claim(_alert(5)), None, _alert(8, first_seen="2026-12-02T10:00:00.000001Z"), 9, 0),
    (_claim(_alert(5)), None, _alert(8, principal="bob"), 9, 0),
    # (3) That alert at a change below the client's (the restore lost its later changes).
    (_claim(_alert(5)), None, _alert(3), 9, 0),
    # (3) The database's newest change is below the client's.
    (_claim(_alert(5)), None, _alert(3), 3, 0),
    (_claim(_alert(5)), None, None, 0, 0),
    # A bare number is taken as it is, unless past the last change.
    (EventId(5), None, None, 9, 5),
    (EventId(5), None, None, 5, 5),
    (EventId(6), None, None, 5, 0),
    (EventId(0), None, None, 0, 0),
])
def test_where_a_resumed_stream_goes_on(claimed: EventId, at: dict[str, Any] | None, named: dict[str, Any] | None,
                                        last: int, after: int) -> None:
    """After the claimed change when the database holds it as the client got it, or holds
    its alert, raised as it was, changed again past it (a bare number: when not past the
    last change); from the start on any sign that the database went back."""
    assert stream_ids.resume_after(claimed, at, named, last) == after
