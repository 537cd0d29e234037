"""The alert feed's live fan-out: the open SSE streams, each a bounded queue of changes.

Subscribers get bounded queues and are never awaited, so nothing here can slow a decision
— decisions only ever write to PostgreSQL. A queue that overflows (a burst larger than
its stream could send meanwhile, or a client that reads slowly) is emptied for one
catch-up marker: its stream reads what it missed from the database (``CATCH_UP``). When
the database went back in time, every open stream is told to go back with it
(``Streams.go_back``), a full queue emptied for the go-back rather than its stream ended.
The feed (``alertfeed.py``) publishes what it reads; ``http/analysts.py`` sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..errors import Unavailable

log = structlog.get_logger(__name__)

PAGE = 500  # alert changes read at most at a time: by the feed's tail, a stream's catch-up, the sinks' feed
QUEUE_SIZE = 256

# The item that replaces what an overflowing queue held: its stream reads every change after
# the last one it sent from the database, then goes on with the queue.
CATCH_UP: dict[str, Any] = {}


@dataclass(eq=False)
class Subscriber:
    """One SSE client: a bounded queue of (change_seq, alert json), (change_seq, None) when
    the database went back to that change (the stream's position goes back there), or
    (change_seq, ``CATCH_UP``) when the queue overflowed (what it held from past change_seq
    on was dropped: the stream reads it from the database); ``dropped`` when it was ended;
    ``position``: the last change its client has (None until the stream has read it from
    the database)."""

    queue: asyncio.Queue[tuple[int, dict[str, Any] | None] | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: bool = False
    position: int | None = None


def _drained(sub: Subscriber) -> list[tuple[int, dict[str, Any] | None]]:
    """Empties ``sub``'s queue; returns what it held but an end of the stream (``_end`` has
    marked the stream dropped already)."""
    items = []
    while not sub.queue.empty():
        item = sub.queue.get_nowait()
        if item is not None:
            items.append(item)
    return items


def _below(start: int, items: list[tuple[int, dict[str, Any] | None]]) -> int:
    """Where a stream whose queue dropped ``items`` must be read again from: at most
    ``start``, below each change dropped, at each go-back or catch-up dropped."""
    return min([start, *(at if alert is None or alert is CATCH_UP else at - 1 for at, alert in items)])


def _overflowed(sub: Subscriber, change: int) -> None:
    """Empties a full queue for a ``CATCH_UP`` item below the first change it drops
    (``change`` included): its stream reads them from the database, and memory stays
    bounded whatever its client does. A go-back held goes first, at the lowest held."""
    items = _drained(sub)
    backs = [at for at, alert in items if alert is None]
    if backs:
        sub.queue.put_nowait((min(backs), None))
    below = _below(change - 1, items)
    sub.queue.put_nowait((below, CATCH_UP))
    log.info("sse_subscriber_catching_up", reason="queue full", after_change=below)


def _go_back(sub: Subscriber, parted: int) -> int:
    """Tells one open stream to go back to ``parted``; returns where the feed must read
    again from for it. A full queue (its client reads slowly) is emptied for the go-back
    frame rather than ended: an ended stream's client would resume from a Last-Event-ID
    of another history, and get every change the restored database holds again, from
    the start, or, when the resume cannot tell (``core/stream_ids.py``), miss the
    changes numbered again up to it. The stream goes back below the first
    change dropped too, and the feed reads again from there."""
    back = _below(parted, _drained(sub)) if sub.queue.full() else parted
    sub.queue.put_nowait((back, None))
    return back


class Streams:
    """The open streams of one feed, at most ``max_subscribers`` of them."""

    def __init__(self, max_subscribers: int) -> None:
        self._max = max_subscribers
        self.open: set[Subscriber] = set()

    def subscribe(self) -> Subscriber:
        if len(self.open) >= self._max:
            raise Unavailable("too many alert stream subscribers; try again later")
        sub = Subscriber()
        self.open.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.open.discard(sub)

    def publish(self, change: int, alert: dict[str, Any]) -> None:
        for sub in list(self.open):
            try:
                sub.queue.put_nowait((change, alert))
            except asyncio.QueueFull:
                _overflowed(sub, change)

    def go_back(self, parted: int) -> int:
        """Tells every open stream to go back to ``parted`` (``_go_back``); returns where
        the feed must read again from: at most ``parted``, where each stream went back, and
        each stream's position."""
        back = [_go_back(sub, parted) for sub in list(self.open)]
        kept = [sub.position for sub in self.open if sub.position is not None]
        return min([parted, *back, *kept])

    def close(self) -> None:
        """Ends every open stream (at shutdown), so no handler keeps the service waiting."""
        for sub in list(self.open):
            self._end(sub)

    def _end(self, sub: Subscriber) -> None:
        """Ends one open stream; its client reconnects with Last-Event-ID."""
        sub.dropped = True
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(None)
        self.open.discard(sub)
