"""Group commit: concurrent decisions of one process share one transaction.

A lone request is sent at once; while a batch is in flight, newer requests queue and go
together in the next one, so the number of commits (and fsyncs) grows with time, not with
load. Each batch is one call of ``rg_decide`` and so one round trip. A batch that fails
fails every request in it with ``Unavailable``: nothing is accepted that is not durable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import structlog

from ..aio import running_loop
from ..core.decide_item import DecideItem
from ..core.decisions import Flag, Reason, Verdict
from ..errors import Unavailable
from .connections import KeptConnection

log = structlog.get_logger(__name__)

MAX_BATCH = 256
_DECIDE = "SELECT * FROM rg_decide($1::jsonb, $2, $3, $4)"


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


def _fail(batch: list[tuple[dict[str, Any], asyncio.Future[Outcome]]], exc: Unavailable) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


class Appender:
    def __init__(
        self, pool: asyncpg.Pool, params: DecideParams,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._params = params
        self._queue: list[tuple[dict[str, Any], asyncio.Future[Outcome]]] = []
        self._running = False
        self._on_batch = on_batch
        # Told the newest entry of each batch and its hash (the continuity guard).
        self.on_committed: Callable[[int, bytes], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn = KeptConnection(pool)

    async def submit(self, item: DecideItem) -> Outcome:
        """Appends one decision; returns once it is committed, or raises ``Unavailable``."""
        future: asyncio.Future[Outcome] = running_loop().create_future()
        self._queue.append((item.to_wire(), future))
        if not self._running:
            self._running = True
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._flush(batch)
        finally:
            self._running = False

    async def _flush(self, batch: list[tuple[dict[str, Any], asyncio.Future[Outcome]]]) -> None:
        started = time.perf_counter()
        try:
            rows = await self._call([item for item, _ in batch])
        except Unavailable as exc:
            _fail(batch, exc)
            return
        except BaseException:
            # Whatever went wrong, no caller may wait forever or be told "accept".
            _fail(batch, Unavailable("the ledger write failed"))
            raise
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        if self.on_committed is not None and rows:
            self.on_committed(rows[-1]["r_seq"], bytes(rows[-1]["r_hash"]))
        for row, (_, future) in zip(rows, batch, strict=True):
            if not future.done():
                future.set_result(Outcome(
                    seq=row["r_seq"], verdict=_VERDICTS[row["r_verdict"]], reason=_REASONS[row["r_reason"]],
                    flags=tuple(_FLAGS[f] for f in row["r_flags"]), alert_id=row["r_alert"], epoch=row["r_epoch"],
                    receipt_position=row["r_rseq"], locked_until_us=row["r_locked_until"],
                ))

    async def _call(self, items: list[dict[str, Any]]) -> list[asyncpg.Record]:
        p = self._params
        rows = await self._conn.fetch("ledger", _DECIDE, items, p.lock_threshold, p.lock_period_us,
                                      p.refuse_on_rollback)
        if len(rows) != len(items):
            raise Unavailable("the ledger answered an incomplete batch")
        return rows

    async def close(self) -> None:
        await self.wait_idle()
        await self._conn.release()

    async def wait_idle(self) -> None:
        """Waits for queued records (used at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
