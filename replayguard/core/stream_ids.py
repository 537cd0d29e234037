"""The alert stream's event ids, and where a stream resumed from one goes on.

An id names a change and what the database held at it: ``<change>.<16 hex digits of
SHA-256 over the alert as the stream sends it at that change>`` (the alert's id, its
content and the change number itself), or ``0`` before any change. Change numbers come
from a database sequence, which a restore (or a failover to a standby behind) winds back,
so the number alone cannot tell whether the client's change is still the database's: a
restored copy numbers its own changes again past it. The digest can. Changes commit in
change order (``rg_alert_changed``), so a database that holds the client's change as the
client got it holds every change before it too: the stream goes on after it. One that
does not (the alert changed again since, or the change is another history's) is resumed
from the start, the one point both histories are known to share: every change the
database holds is sent again, never a gap.

A bare change number (the ids of clients from before the digest) is taken as it is,
unless it is past the database's last change (then the start).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

_ID = re.compile(r"^([0-9]{1,18})(?:\.([0-9a-f]{16}))?$")


@dataclass(frozen=True, slots=True)
class EventId:
    """A Last-Event-ID as parsed: its change number and digest (None for a bare number)."""

    change: int
    digest: str | None


def parse(raw: str) -> EventId:
    """The id a client sent back; ValueError when it is not one this stream sends."""
    found = _ID.match(raw.strip())
    if found is None:
        raise ValueError("not an event id of the alert stream")
    return EventId(int(found[1]), found[2])


def of_alert(alert: Mapping[str, Any]) -> str:
    """The id of an alert change, from the alert as the stream sends it (``render``)."""
    digest = hashlib.sha256(orjson.dumps(alert, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return f"{alert['change']}.{digest}"


def position(held: Mapping[str, Any] | None) -> tuple[int, str]:
    """A stream's position and its id: the change the database holds at or below where the
    stream stands (``held``, rendered), or the start when it holds none."""
    return (0, "0") if held is None else (int(held["change"]), of_alert(held))


def resume_after(claimed: EventId, held: Mapping[str, Any] | None, last: int) -> int:
    """The change a stream resumed with ``claimed`` goes on after: ``held`` is the change the
    database holds at or below the claimed one (rendered; None when it holds none), ``last``
    its last change. The claimed change when the database holds it as the client got it
    (or, for a bare number, when it is not past the last change); else the start."""
    if claimed.digest is None:
        return 0 if claimed.change > last else claimed.change
    if held is not None and of_alert(held) == f"{claimed.change}.{claimed.digest}":
        return claimed.change
    return 0
