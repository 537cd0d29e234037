"""What a cache of rows whose writes are announced (LISTEN/NOTIFY) knows of the announcements.

The alert feed's connection LISTENs (``services/alertfeed.py``) and tells each cache when
the LISTEN took effect, when it was lost, and when a query sent on it was answered: every
change committed before that query was sent has been heard by then. A cached read is then
current while the LISTEN was in effect when it was read and the connection keeps answering.
"""

from __future__ import annotations

import time

# A change committed before a query on the LISTEN connection is heard by the time that
# query is answered. Reads are trusted only while such a query, sent less than this many
# seconds ago, has been answered: a connection that hangs (half-open, or its queries
# blocked) stops the trust without ending the connection. The alert feed queries at least
# once a second.
HEARD_WITHIN_S = 3.0


class Announced:
    """The announcement state a cache keeps; subclasses drop what they cached in ``changed``."""

    def __init__(self) -> None:
        self._listening_since: float | None = None  # when the LISTEN took effect; None: not now
        self._heard_until = 0.0  # changes committed before this were heard (time.monotonic())
        self._changes = 0  # announcements heard

    def listening(self, on: bool) -> None:
        """The LISTEN took effect (True) or its connection is gone (False). Reads from
        before it took effect are not trusted to be current."""
        self._listening_since = time.monotonic() if on else None
        self._heard_until = self._listening_since or 0.0

    def heard_until(self, sent_at: float) -> None:
        """A query sent on the LISTEN connection at ``sent_at`` was answered: every change
        committed before then has been heard."""
        self._heard_until = max(self._heard_until, sent_at)

    @property
    def listening_now(self) -> bool:
        return self._listening_since is not None

    @property
    def changes_heard(self) -> int:
        return self._changes

    def _heard_since(self, read_at: float) -> bool:
        """Whether every change committed after ``read_at`` has been or will be heard: the
        LISTEN took effect before then and its connection answers."""
        since = self._listening_since
        return (since is not None and read_at >= since
                and time.monotonic() - self._heard_until < HEARD_WITHIN_S)
