"""Group commit: concurrent decisions of one process share one transaction.

A lone request is sent at once; while a batch is in flight, newer requests queue and go
together in the next one, so the number of commits (and fsyncs) grows with time, not with
load. Each batch is one call of ``rg_decide`` and so one round trip. A batch that fails
fails every request in it with ``Unavailable``: nothing is accepted that is not durable.

A batch whose connection was lost after it was sent may have committed. Its last entry
carries a random batch id (``payload.batch``); the appender ends the old server session,
looks the id up on a new connection, and answers what the ledger holds: the decisions when
the batch committed, 503 "nothing was accepted" when it did not, and, when it cannot find
out, a 503 that says the credentials may have been used.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import structlog

from ..aio import running_loop
from ..core.decide_item import DecideItem
from ..core.decisions import Flag, Reason, Verdict
from ..errors import Unavailable
from .connections import UNAVAILABLE_ERRORS, InDoubt, KeptConnection

log = structlog.get_logger(__name__)

MAX_BATCH = 256
_DECIDE = "SELECT * FROM rg_decide($1::jsonb, $2, $3, $4)"
# A batch's entries are consecutive (rg_decide holds the head lock); its last names it.
_FIND_BATCH = """
SELECT l.seq, l.ts_us, l.vm_id, l.decision, l.reason, l.payload, l.hash FROM ledger l,
       (SELECT seq FROM ledger WHERE seq > $2::bigint AND payload->>'batch' = $1::text) m
WHERE l.seq > m.seq - $3::bigint AND l.seq <= m.seq ORDER BY l.seq"""
_FLOOR = ("SELECT (SELECT seq FROM ledger_head), "
          "coalesce((SELECT max(seq) FROM ledger WHERE kind = 'ledger_recovery'), 0)")  # migration 044's index
_BACKEND_GONE = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)"
SETTLE_WAIT_S = 10.0  # how long the old session may take to end once told to
_UNSETTLED = ("the ledger's answer was lost and could not be checked: the credential may have been used;"
              " present a new one")


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


def _outcome(row: Any) -> Outcome:
    return Outcome(
        seq=row["r_seq"], verdict=_VERDICTS[row["r_verdict"]], reason=_REASONS[row["r_reason"]],
        flags=tuple(_FLAGS[f] for f in row["r_flags"]), alert_id=row["r_alert"], epoch=row["r_epoch"],
        receipt_position=row["r_rseq"], locked_until_us=row["r_locked_until"],
    )


def _from_entry(entry: Any) -> Outcome:
    """The outcome a committed entry records (a batch whose answer was lost)."""
    payload = entry["payload"]
    locked = payload.get("locked_until_us")
    return Outcome(
        seq=entry["seq"], verdict=_VERDICTS[entry["decision"]], reason=_REASONS[entry["reason"]],
        flags=tuple(_FLAGS[f] for f in payload.get("flags", ())), alert_id=payload.get("alert_id"),
        epoch=payload.get("epoch", 0), receipt_position=entry["seq"],
        locked_until_us=None if locked is None else int(locked))


class Appender:
    def __init__(
        self, pool: asyncpg.Pool, params: DecideParams,
        on_batch: Callable[[int, float], None] | None = None,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    ) -> None:
        self._params = params
        self._connect = connect  # a new connection, not the pool's: to settle a lost answer
        self._last_seq: int | None = None  # the newest entry this appender saw committed
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
        items = [item for item, _ in batch]
        batch_id = secrets.token_hex(8)
        items[-1] = {**items[-1], "payload": {**(items[-1].get("payload") or {}), "batch": batch_id}}
        try:
            rows = await self._call(items)
            outcomes = [_outcome(row) for row in rows]
            newest = (rows[-1]["r_seq"], bytes(rows[-1]["r_hash"])) if rows else None
        except InDoubt as exc:
            try:
                entries = await self._settle(batch_id, items, exc.pid)
            except Unavailable as unsettled:
                _fail(batch, unsettled)
                return
            except BaseException:
                _fail(batch, Unavailable(_UNSETTLED))
                raise
            if not entries:
                _fail(batch, Unavailable("the database cannot be reached right now; nothing was accepted"))
                return
            outcomes = [_from_entry(e) for e in entries]
            newest = (entries[-1]["seq"], bytes(entries[-1]["hash"]))
        except Unavailable as exc:
            _fail(batch, exc)
            return
        except BaseException:
            # Whatever went wrong, no caller may wait forever or be told "accept".
            _fail(batch, Unavailable("the ledger write failed"))
            raise
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        self._last_seq = outcomes[-1].seq
        if self.on_committed is not None and newest is not None:
            self.on_committed(*newest)
        for outcome, (_, future) in zip(outcomes, batch, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def _call(self, items: list[dict[str, Any]]) -> list[asyncpg.Record]:
        p = self._params
        rows = await self._conn.fetch("ledger", _DECIDE, items, p.lock_threshold, p.lock_period_us,
                                      p.refuse_on_rollback)
        if len(rows) != len(items):
            raise Unavailable("the ledger answered an incomplete batch")
        return rows

    async def _settle(self, batch_id: str, items: list[dict[str, Any]], pid: int) -> list[asyncpg.Record]:
        """What became of a batch whose answer was lost: ends the server session that ran
        it (so its transaction has committed or rolled back for good), then reads the
        batch's entries by its id. Empty when it did not commit; ``Unavailable`` saying so
        when that cannot be found out."""
        if self._connect is None:
            raise Unavailable(_UNSETTLED)
        try:
            conn = await self._connect()
        except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
            log.warning("ledger_answer_lost", batch=batch_id, settled=False)
            raise Unavailable(_UNSETTLED) from None
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            deadline = time.monotonic() + SETTLE_WAIT_S
            while not await conn.fetchval(_BACKEND_GONE, pid):
                if time.monotonic() > deadline:
                    raise TimeoutError
                await asyncio.sleep(0.02)
            # Above the newest entry this appender saw committed, unless a recovery since
            # numbers entries below it; with neither, the recent tail.
            head, recovered = await conn.fetchrow(_FLOOR)
            floor = max(0, head - 1_000_000) if self._last_seq is None else self._last_seq
            floor = min(floor, recovered)
            entries: list[asyncpg.Record] = await conn.fetch(_FIND_BATCH, batch_id, floor, len(items))
        except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
            log.warning("ledger_answer_lost", batch=batch_id, settled=False)
            raise Unavailable(_UNSETTLED) from None
        finally:
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await conn.close(timeout=1)
        if entries and not (len(entries) == len(items) and all(
                e["ts_us"] == i["ts_us"] and e["vm_id"] == i["vm_id"] for e, i in zip(entries, items, strict=True))):
            log.error("ledger_answer_lost", batch=batch_id, settled=False, found=len(entries))
            raise Unavailable(_UNSETTLED)
        log.warning("ledger_answer_lost", batch=batch_id, settled=True, committed=bool(entries))
        return entries

    async def close(self) -> None:
        await self.wait_idle()
        await self._conn.release()

    async def wait_idle(self) -> None:
        """Waits for queued records (used at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
