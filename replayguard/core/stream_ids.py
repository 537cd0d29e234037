"""The alert stream's event ids, and where a stream resumed from one goes on.

An id names a change and what the database held at it:
``<change>.<alert id>.<content digest>.<raised digest>``, each digest 16 hex digits of
SHA-256: the content digest over the alert as the stream sends it at that change (its id,
content and the change number itself), the raised digest over what no change of that alert
alters (its id, when it was first seen, its VM and principal). ``0`` names the start,
before any change. Change numbers and alert ids come from database sequences, which a
restore (or a failover to a standby behind) winds back, so numbers alone cannot tell
whether the client's change is still the database's: a restored copy numbers its own
changes again past it, and may raise another alert under the same id. The digests can.

A stream resumed from an id goes on after the client's change when the database holds
(1) that alert at that change with that content: changes commit in change order
(``rg_alert_changed``), so it holds every change before it too; or (2) that alert (same
id, same raised digest) at a later change, no other alert or content at the client's
change, and its newest change is not below it: the alert changed again since, as it does
all along (a ``reuse`` alert counts up with every replay). Anything else, (3), is a
database that went back: another alert or other content at the client's change, no alert
with that id and raised digest, that alert at a change below the client's, or a newest
change below it. The stream then resumes from the start, the one point both histories are
known to share: every change the database holds is sent again, never a gap.

Case (2) cannot see a restore to a copy that holds the client's alert and lacks changes
up to the client's id, after which the restored database changed that alert again past
the id (leaving no alert at the id's number) before the client resumed: the resume goes
on after the id, past the changes the restored database numbered at or below it
(``docs/api.md``; the console reads its list again on every reconnect).

A bare change number (the ids of clients from before the digests) is taken as it is,
unless it is past the database's last change (then the start).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

# Change numbers and alert ids: at most 18 digits, so every one fits a bigint.
_ID = re.compile(r"^([0-9]{1,18})(?:\.([0-9]{1,18})\.([0-9a-f]{16})\.([0-9a-f]{16}))?$")


@dataclass(frozen=True, slots=True)
class EventId:
    """A Last-Event-ID as parsed: its change number and, unless it is a bare number, the
    alert it names, its content digest and its raised digest."""

    change: int
    alert: int | None = None
    content: str | None = None
    raised: str | None = None


def parse(raw: str) -> EventId:
    """The id a client sent back; ValueError when it is not one this stream sends."""
    found = _ID.match(raw.strip())
    if found is None:
        raise ValueError("not an event id of the alert stream")
    if found[2] is None:
        return EventId(int(found[1]))
    return EventId(int(found[1]), int(found[2]), found[3], found[4])


def _digest(value: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def raised_digest(alert: Mapping[str, Any]) -> str:
    """What no change of an alert alters (as ``render`` shows it): its id, when it was first
    seen, its VM and principal. Another alert raised under the same id after a restore has
    another one (the same idea as the feed's ``Read``)."""
    return _digest({key: alert[key] for key in ("id", "first_seen", "vm_id", "principal")})


def of_alert(alert: Mapping[str, Any]) -> str:
    """The id of an alert change, from the alert as the stream sends it (``render``)."""
    return f"{alert['change']}.{alert['id']}.{_digest(alert)}.{raised_digest(alert)}"


def position(held: Mapping[str, Any] | None) -> tuple[int, str]:
    """A stream's position and its id: the change the database holds at or below where the
    stream stands (``held``, rendered), or the start when it holds none."""
    return (0, "0") if held is None else (int(held["change"]), of_alert(held))


def resume_after(claimed: EventId, at: Mapping[str, Any] | None, alert: Mapping[str, Any] | None,
                 last: int) -> int:
    """The change a stream resumed with ``claimed`` goes on after: the claimed change, or
    the start (0). ``at`` is the alert the database holds at the claimed change, ``alert``
    the one it holds under the claimed alert id (both rendered; None when it holds none),
    ``last`` its last change. A bare number is taken as it is unless past ``last``."""
    if claimed.alert is None:
        return 0 if claimed.change > last else claimed.change
    if last < claimed.change:
        return 0  # (3) the newest change is below the client's
    if at is not None:  # (1) the client's change as it got it, or (3) another alert or content there
        return claimed.change if of_alert(at) == _as_sent(claimed) else 0
    if alert is None or raised_digest(alert) != claimed.raised or int(alert["change"]) < claimed.change:
        return 0  # (3) no such alert, another raised under its id, or its change went back
    return claimed.change  # (2) that alert changed again since, after the client's change


def _as_sent(claimed: EventId) -> str:
    return f"{claimed.change}.{claimed.alert}.{claimed.content}.{claimed.raised}"
