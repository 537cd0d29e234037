"""Group commit: concurrent decisions of one process share one transaction.

A lone request is sent at once; while a batch is in flight, newer requests queue and go
together in the next one, so the number of commits (and fsyncs) grows with time, not with
load. Each batch is one call of ``rg_decide`` and so one round trip. A batch that fails
fails every request in it with ``Unavailable``: nothing is accepted that is not durable.

A batch of more than one decision commits without waiting for the WAL flush (early lock
release): ``rg_decide`` holds the ledger head's row lock until its commit, so the next
batch, this process's or another's, takes the head while this one's WAL is still being
flushed, and the flush leaves the serial section. Such a batch is answered only after a
durability barrier: a transaction that writes a WAL record and commits synchronously on a
connection of its own, started after the batch's commit, so its flush (and the wait for
synchronous standbys) covers that commit. One barrier covers every batch committed before
it was sent; batches committed while it is in flight wait for the next. A barrier that
fails answers its batches 503, as a commit whose outcome is unknown does. A lone decision
commits synchronously: one round trip, as there is nothing to overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import structlog

from ..aio import running_loop
from ..core.decide_item import DecideItem
from ..core.decisions import Flag, Reason, Verdict
from ..errors import Unavailable
from .connections import WAL_BARRIER, KeptConnection

log = structlog.get_logger(__name__)

MAX_BATCH = 256
_DECIDE = "SELECT * FROM rg_decide($1::jsonb, $2, $3, $4)"
# The same call, its transaction's commit not waiting for the flush (set_config(..., true)
# lasts until the transaction's end, so it governs the commit of this one-statement
# transaction and nothing after it).
_DECIDE_EARLY = ("SELECT d.* FROM set_config('synchronous_commit', 'off', true) AS s,"
                 " rg_decide($1::jsonb, $2, $3, $4) AS d")


# The ledger's words to their enum members (a dict lookup; calling the enum is ten times slower).
_VERDICTS: dict[str, Verdict] = {member.value: member for member in Verdict}
_REASONS: dict[str, Reason] = {member.value: member for member in Reason}
_FLAGS: dict[str, Flag] = {member.value: member for member in Flag}


class Outcome(NamedTuple):
    """What ``rg_decide`` answered for one item (a tuple: made for every decision, and a
    frozen dataclass costs twice as much to build)."""

    seq: int
    verdict: Verdict
    reason: Reason
    flags: tuple[Flag, ...]
    alert_id: int | None
    epoch: int
    receipt_position: int
    locked_until_us: int | None


@dataclass(frozen=True, slots=True)
class DecideParams:
    lock_threshold: int
    lock_period_us: int
    refuse_on_rollback: bool


Pending = list[tuple[dict[str, Any], asyncio.Future[Outcome]]]  # a batch: items and their callers


def _fail(batch: Pending, exc: Unavailable) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _answer(rows: list[asyncpg.Record], batch: Pending) -> None:
    for row, (_, future) in zip(rows, batch, strict=True):
        if not future.done():
            future.set_result(Outcome(
                seq=row["r_seq"], verdict=_VERDICTS[row["r_verdict"]], reason=_REASONS[row["r_reason"]],
                flags=tuple(_FLAGS[f] for f in row["r_flags"]), alert_id=row["r_alert"], epoch=row["r_epoch"],
                receipt_position=row["r_rseq"], locked_until_us=row["r_locked_until"],
            ))


class Appender:
    def __init__(
        self, pool: asyncpg.Pool, params: DecideParams, connect: Callable[[], Awaitable[Any]],
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """``connect`` opens the barrier's connection (outside the pool, like the pool's)."""
        self._params = params
        self._queue: Pending = []
        self._running = False
        self._on_batch = on_batch
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn = KeptConnection(pool)
        self._barrier = KeptConnection(pool, connect)
        self._unflushed: list[tuple[list[asyncpg.Record], Pending]] = []  # committed early, not yet answered
        self._confirming = False

    async def submit(self, item: DecideItem) -> Outcome:
        """Appends one decision; returns once it is durable, or raises ``Unavailable``."""
        future: asyncio.Future[Outcome] = running_loop().create_future()
        self._queue.append((item.to_wire(), future))
        if not self._running:
            self._running = True
            self._spawn(self._drain())
        return await future

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._flush(batch)
        finally:
            self._running = False

    async def _flush(self, batch: Pending) -> None:
        early = len(batch) > 1
        try:
            rows = await self._call([item for item, _ in batch], early)
        except Unavailable as exc:
            _fail(batch, exc)
            return
        except BaseException:
            # Whatever went wrong, no caller may wait forever or be told "accept".
            _fail(batch, Unavailable("the ledger write failed"))
            raise
        if self._on_batch is not None:
            self._on_batch(len(batch))
        if not early:
            _answer(rows, batch)  # its commit waited for the flush
            return
        self._unflushed.append((rows, batch))
        if not self._confirming:
            self._confirming = True
            self._spawn(self._confirm())

    async def _confirm(self) -> None:
        """Barriers, one after another, until every batch committed early is answered."""
        try:
            while self._unflushed:
                covered, self._unflushed = self._unflushed, []
                try:
                    await self._barrier.fetch("ledger_barrier", WAL_BARRIER)
                except Unavailable as exc:
                    for _, batch in covered:
                        _fail(batch, exc)
                    continue
                except BaseException:
                    for _, batch in covered:
                        _fail(batch, Unavailable("the ledger write could not be confirmed"))
                    raise
                for rows, batch in covered:
                    _answer(rows, batch)
        finally:
            self._confirming = False

    async def _call(self, items: list[dict[str, Any]], early: bool) -> list[asyncpg.Record]:
        p = self._params
        rows = await self._conn.fetch("ledger", _DECIDE_EARLY if early else _DECIDE, items, p.lock_threshold,
                                      p.lock_period_us, p.refuse_on_rollback)
        if len(rows) != len(items):
            raise Unavailable("the ledger answered an incomplete batch")
        return rows

    async def close(self) -> None:
        await self.wait_idle()
        await self._conn.release()
        await self._barrier.release()

    async def wait_idle(self) -> None:
        """Waits for queued records (used at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
