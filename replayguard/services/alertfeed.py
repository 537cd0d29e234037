"""The alert feed: it reads every alert change from PostgreSQL, hands it on, and leads.

Fan-out across instances rides on PostgreSQL, not Redis: ``rg_alert`` (and every
acknowledgement) calls ``pg_notify('replayguard_alerts', id)`` inside its transaction, so
every instance LISTENing on the shared database hears of exactly the changes that
committed, whether Redis is configured or not. A notification only wakes the loop; the
loop then reads the changes from ``alerts`` by ``change_seq``, so a notification lost to a
reconnect is caught up by the next read (and by a poll every ``POLL_S``). What it reads
goes to the open streams (``alertfeed_streams.py``), at most a queue's worth at a time.

One instance at a time (the holder of a session advisory lock on its LISTEN connection)
is the *leader*: every ``POLL_S`` (sooner while work is left over) it does the leader's
duties (``alertfeed_leader.py``: checkpoints, the sinks' feed of ``alertfeed_sinks.py``, the
chain sweep, the state check, retention), and it writes the alerts it reads to the service's
log.
When the database went back in time (a restore, a failover to a standby behind), its
change numbers start again below the feed's position, and may reach it again before the
feed reads: the tail compares what it read last with what the database holds (this
feed's mark, the ledger entry that was the head then, the last change's alert, hash and
content: ``alertfeed_reads.py``), finds where they part, and goes back there with every
open stream (``_went_back``, ``_rewind``). The mark is a random tag the statement that
reads the changes writes into ``alert_feed_marks`` whenever it read any (``_MARK``): a copy
older than that read cannot hold it, so a database that lost only alert changes writing no
ledger entry (``ledger_rollback``, ``witness_unreachable``, ``ledger_tamper``), and
numbered as many again, the last alert read changing once more among them, is seen too.

The feed's connection also LISTENs on ``replayguard_tokens`` for the token cache
(``tokens.py``) and on ``replayguard_api_tokens`` for the API token cache (``apitokens.py``):
every instance, Redis or not, and each cache is told when that LISTEN takes effect and
when its connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from typing import Any

import asyncpg
import structlog

from ..errors import Unavailable
from ..fanout import AlertFanout
from ..pg import connections
from ..pg.connections import UNAVAILABLE_ERRORS, acquire
from ..runtime import Runtime
from ..sinks import SinkDispatcher
from . import alertfeed_streams
from .alertfeed_leader import LeaderDuties
from .alertfeed_reads import Read
from .alertfeed_sinks import SinkFeed
from .alertfeed_streams import PAGE, Streams
from .alerts import COLUMNS, AlertService, render
from .announced import Announced
from .apitokens import CHANNEL as API_TOKEN_CHANNEL
from .ledger import LedgerService
from .tokens import CHANNEL as TOKEN_CHANNEL

log = structlog.get_logger(__name__)

CHANNEL = "replayguard_alerts"
POLL_S = 1.0
TAIL_GAP_S = 0.05  # at most one read of the alert changes per gap: a flood of joins is read in batches
_LEADER_LOCK = 0x7267666C  # "rgfl"
_RECENT = 4096  # the reads remembered, to find where a database that went back parts
MARK_REFRESH_S = 3600.0  # a feed that read no change for this long writes its mark again

# This feed's mark ($3, tag $4: ``migrations/040_alert_feed_marks.sql``), written by the
# statement that reads the changes after $1 when there are any (or when $5 asks for it):
# a database that holds the tag committed that read, and with it every change read. The
# same statement reads the tag the database held before (``held``), in its snapshot.
_MARK = ("INSERT INTO alert_feed_marks (feed, tag) SELECT $3::bytea, $4::bytea"
         " WHERE $5::boolean OR EXISTS (SELECT 1 FROM alerts WHERE change_seq > $1)"
         " ON CONFLICT (feed) DO UPDATE SET tag = excluded.tag, marked = now() RETURNING 1")
# The changes after $1 and, in the same snapshot, the ledger's head: every change read
# committed with its entries, so a database that no longer holds that head lost them.
_TAIL = (f"WITH mark AS ({_MARK}) SELECT h.seq AS head_seq, h.hash AS head_hash,"  # noqa: S608 - fixed column list; values go as $n parameters
         " (SELECT tag FROM alert_feed_marks WHERE feed = $3) AS held, EXISTS (SELECT 1 FROM mark) AS marked,"
         " a.* FROM ledger_head h LEFT JOIN LATERAL"
         f" (SELECT {COLUMNS} FROM alerts WHERE change_seq > $1 ORDER BY change_seq LIMIT $2) a ON true WHERE h.id")
# What the database holds now of the head last read ($1) and of the last change's alert ($2).
_HELD = ("SELECT (SELECT hash FROM ledger WHERE seq = $1) AS entry,"  # noqa: S608 - fixed column list; values go as $n parameters
         " (SELECT coalesce(max(change_seq), 0) FROM alerts) AS last, a.*"
         f" FROM (VALUES (1)) v LEFT JOIN LATERAL (SELECT {COLUMNS} FROM alerts WHERE id = $2) a ON true")
_ALERTS = f"SELECT {COLUMNS} FROM alerts WHERE id = ANY($1::bigint[])"  # noqa: S608 - fixed column list
# The newest change, where a feed starts, and its first mark ($1, tag $2), in one statement.
_START = ("WITH mark AS (INSERT INTO alert_feed_marks (feed, tag) VALUES ($1, $2)"  # noqa: S608 - fixed column list
          " ON CONFLICT (feed) DO UPDATE SET tag = excluded.tag, marked = now())"
          f" SELECT {COLUMNS} FROM alerts ORDER BY change_seq DESC LIMIT 1")


def interruption(exc: BaseException) -> dict[str, str]:
    """The fields of ``alert_feed_interrupted``: the error, and the one it was raised while
    handling, if any (``cause``). A read whose query timed out on a half-open connection
    ends in the transaction's ROLLBACK; when asyncpg's own cancel gave up first and closed
    the connection, that ROLLBACK raises ``InterfaceError`` and the timeout is the cause."""
    fields = {"error": type(exc).__name__}
    if exc.__context__ is not None and not exc.__suppress_context__:
        fields["cause"] = type(exc.__context__).__name__
    return fields


def _crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("alert_feed_crashed", error=repr(task.exception()))


class AlertFeed:
    """The tail of the alert changes, the session it reads them on, and the parts it
    composes: the open streams (``streams``), the sinks (``sinks``), the leader's duties
    (``duties``)."""

    def __init__(self, runtime: Runtime, alerts: AlertService, ledger: LedgerService,
                 dispatcher: SinkDispatcher | None, max_subscribers: int) -> None:
        self._rt = runtime
        self.streams = Streams(max_subscribers)
        self.sinks = SinkFeed(runtime, alerts, ledger, dispatcher)
        self.duties = LeaderDuties(runtime, ledger, self.sinks, self._lead_again)
        self._wake = asyncio.Event()
        self._pos: int | None = None
        self._read: deque[Read] = deque(maxlen=_RECENT)  # the last change of each recent read, in order
        self._head: tuple[int, bytes] | None = None  # the ledger's head when changes were last read
        # This feed's mark in the database (``_MARK``): its id, the tag of the last read that
        # wrote one (None until one did, and after the database went back), the tag of the
        # last read that may have (committed though its answer was lost), and when (monotonic).
        self._feed_id = secrets.token_bytes(16)
        self._mark: bytes | None = None
        self._tried: bytes | None = None
        self._marked_at = 0.0
        self.leader = False
        self._session_id: tuple[Any, ...] | None = None  # (pid, backend_start) of the feed's connection
        self._task: asyncio.Task[None] | None = None
        self._last_lead = 0.0
        self._stopping = False
        self._listen_conn: asyncpg.Connection | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Starts from now for live subscribers; the sinks' position is fixed before serving."""
        tag = secrets.token_bytes(16)
        async with acquire(self._rt.pool) as conn:
            newest = await conn.fetchrow(_START, self._feed_id, tag)
            await self.sinks.hold_position(conn)
        self._pos = 0 if newest is None else newest["change_seq"]
        self._mark = self._tried = tag
        self._marked_at = time.monotonic()
        if newest is not None:  # where a database restored before the first read parts, if it holds it
            self._read.append(Read.of(newest))
        self._task = asyncio.create_task(self._run(), name="alert-feed")
        self._task.add_done_callback(_crashed)

    async def stop(self) -> None:
        if self._task is not None:
            # Python 3.11's wait_for can swallow a cancellation that races its timeout, so
            # the loops also watch a flag, and the cancel is repeated until the task ends.
            self._stopping = True
            self._wake.set()
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
        self.streams.close()
        await self.sinks.stop()

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            await self.sinks.start()  # every instance delivers its own outbox, database or not
            try:
                conn = await connections.connect(self._rt.dsn,
                                                 statement_timeout_ms=self._rt.settings.statement_timeout_ms)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("alert_feed_connect_failed", error=type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.1
            wakeups = None
            self._listen_conn = conn
            try:
                await self._end_previous_session(conn)
                # The same connection hears token changes, for the token cache: it trusts
                # what it read only while this LISTEN is in effect.
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(TOKEN_CHANNEL, self._on_token_change)
                await conn.add_listener(API_TOKEN_CHANNEL, self._on_api_token_change)
                for cache in self._announced:
                    cache.listening(True)
                if self._rt.fanout is None:
                    await conn.add_listener(CHANNEL, self._on_notify)
                else:
                    wakeups = asyncio.create_task(self._redis_wakeups(self._rt.fanout), name="alert-feed-redis")
                await self._session(conn)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError, Unavailable) as exc:
                log.warning("alert_feed_interrupted", **interruption(exc))
            finally:
                self._listen_conn = None
                for cache in self._announced:
                    cache.listening(False)
                if wakeups is not None:
                    wakeups.cancel()
                    await asyncio.wait({wakeups})
                self.leader = False  # the sinks go on delivering what the outbox holds
                with contextlib.suppress(*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
                    await conn.close(timeout=2)

    async def _end_previous_session(self, conn: asyncpg.Connection) -> None:
        """Ends this feed's previous server session if it outlived its connection (a
        half-open connection: the server still sees a client), since that session may
        hold the leader lock, and no instance could lead until the server's TCP
        keepalive gave up on it. The session is named by pid and start time, so a reused
        pid is never hit; then remembers this one."""
        previous, self._session_id = self._session_id, tuple(await conn.fetchrow(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"))
        if previous is None:
            return
        try:
            ended = await conn.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2",
                *previous)
        except asyncpg.InsufficientPrivilegeError:
            return
        if ended:
            log.warning("alert_feed_previous_session_ended", pid=previous[0])

    async def _redis_wakeups(self, fanout: AlertFanout) -> None:
        """With Redis configured, instances wake each other through its pub/sub (every
        decision, event and acknowledgement that changes an alert publishes); a lost
        message, or Redis down, costs at most the POLL_S poll, never an alert. A message
        only wakes the tail, which reads what changed from PostgreSQL: what it says is
        anyone's who can write to Redis."""
        while not self._stopping:
            try:
                async for _ in fanout.wakeups():
                    self._wake.set()
            except Exception as exc:  # noqa: BLE001 - a broken server makes redis-py raise anything
                log.warning("alert_feed_redis_interrupted", error=type(exc).__name__)
                await asyncio.sleep(1.0)

    @property
    def _announced(self) -> tuple[Announced, ...]:
        """The caches whose changes this feed's LISTEN connection hears."""
        return self._rt.tokens, self._rt.api_tokens

    def _on_token_change(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._rt.tokens.changed(payload)

    def _on_api_token_change(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._rt.api_tokens.changed(payload)

    def _on_terminated(self, conn: object) -> None:
        if conn is self._listen_conn:  # lost under the session: no more changes are heard
            for cache in self._announced:
                cache.listening(False)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    async def _session(self, conn: asyncpg.Connection) -> None:
        # The lead is taken before the first read, so an instance that leads logs the changes
        # it reads on a new connection (after a restore, every instance reconnects).
        self.leader = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK))
        last_tail = 0.0
        while not self._stopping:
            gap = last_tail + TAIL_GAP_S - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._wake.clear()
            last_tail = time.monotonic()
            with self._rt.metrics.background.timed("alert_tail"):
                await self._tail(conn)
            for cache in self._announced:  # token changes committed before the read were heard
                cache.heard_until(last_tail)
            if time.monotonic() - self._last_lead >= POLL_S:
                # Leadership and its duties (checkpoints, sinks) are looked at once per
                # POLL_S, not once per notification: a flood of alert joins must not cost
                # every worker a round of queries each.
                self._last_lead = time.monotonic()
                await self.sinks.start()  # retried until it starts: it is the outbox's only delivery
                if not self.leader:
                    self.leader = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK))
                else:
                    await conn.fetchval("SELECT 1")  # notices a lost connection, and the lock with it
                if self.leader:
                    await self.duties.lead()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    def _lead_again(self, at_once: bool) -> None:
        """The next lead comes with the next read (duties were left over), or ``at_once``."""
        self._last_lead = 0.0
        if at_once:
            self._wake.set()

    # --- the tail -------------------------------------------------------------------

    async def _tail(self, conn: asyncpg.Connection) -> None:
        """Publishes every change after the last one seen. Changes commit in change_seq
        order (rg_alert_changed numbers them under the ledger head lock), so none is
        committed below the position once a later one was read. A database that went back
        in time (a restore, a failover to a standby that had not caught up) numbers its new
        changes from below the position again, and may number as many as it lost before
        this read: ``_went_back`` tells by content, and each read by this feed's mark
        (``_MARK``), read in its own snapshot; ``_rewind`` goes back to where the database's
        history and the one read part."""
        if await self._went_back(conn):
            await self._rewind(conn)
        while True:
            after = self._pos or 0
            # The tags a database holds when it holds every read so far: the last one written,
            # or one whose statement committed though its answer was lost.
            holds = (self._mark, self._tried)
            self._tried = tag = secrets.token_bytes(16)
            due = self._mark is None or time.monotonic() - self._marked_at >= MARK_REFRESH_S
            # The mark's write needs no flush of its own: a crash of the database server
            # that loses it makes the next read go back (changes sent again, none missed).
            # At most a stream's queue at a time: a read larger than the queue would overflow
            # the queue of a stream whose client is caught up, which would then read it all
            # again from the database; a stream has until the next read to send what this
            # one gave it.
            page = min(PAGE, alertfeed_streams.QUEUE_SIZE)
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                rows = await conn.fetch(_TAIL, after, page, self._feed_id, tag, due)
            held = rows[0]["held"]
            if self._mark is not None and (held is None or bytes(held) not in holds):
                await self._rewind(conn)  # this read is of a copy older than the last: read again from where they part
                continue
            self._head = (rows[0]["head_seq"], bytes(rows[0]["head_hash"]))
            if rows[0]["marked"]:
                self._mark, self._marked_at = tag, time.monotonic()
            records = [row for row in rows if row["id"] is not None]
            if records:  # the last of each read is enough to find where a restored database parts
                self._read.append(Read.of(records[-1]))
            for record in records:
                self._pos = record["change_seq"]  # above the position, in change order
                if self.leader:
                    self.duties.log_alert(record)
                if self.streams.open:  # rendering for nobody is work a decision worker can skip
                    self.streams.publish(record["change_seq"], render(record))
            if len(records) < page:
                return

    async def _went_back(self, conn: asyncpg.Connection) -> bool:
        """Whether the database lost what the tail read: its last change is below the
        position, or it no longer holds the ledger entry that was the head when changes
        were last read (hash for hash), or the last change read is neither there as it was
        read nor followed by a later change of the same alert. (Each read also checks this
        feed's mark, ``_MARK``, in its own snapshot: the mark alone tells a copy that lost
        only alert changes that write no ledger entry, when the alert read last changed
        again since, since its later change is what the database would hold anyway.)"""
        if self._pos is None:
            return False
        newest = self._read[-1] if self._read else None
        head_seq = self._head[0] if self._head is not None else 0
        row = await conn.fetchrow(_HELD, head_seq, newest.alert_id if newest is not None else 0)
        if row["last"] < self._pos:
            return True
        if self._head is not None and head_seq > 0 and (row["entry"] is None or bytes(row["entry"]) != self._head[1]):
            return True
        return newest is not None and not newest.held(row)

    async def _rewind(self, conn: asyncpg.Connection) -> None:
        """Moves the position back to the last change read that the database still holds
        as it was read (at or below its last change), so the tail reads (in pages) what the
        database numbers from there. When it holds none of the reads remembered (``_RECENT``:
        a copy older than all of them, or their alerts changed since), where the histories
        part is unknown, and may be below where the oldest of them started: the database
        may have numbered its changes after that copy's up to there and past it, so the
        position goes back to the start. Every open stream is told to go back there too
        (``http/analysts.py`` sends its client that position): what the database numbers
        after it, its ``ledger_rollback`` alert among them, reaches the stream even where
        its numbers were sent before (``Streams.go_back``)."""
        last = int(await conn.fetchval("SELECT coalesce(max(change_seq), 0) FROM alerts"))
        rows = await conn.fetch(_ALERTS, sorted({read.alert_id for read in self._read}))
        held = {row["id"]: row for row in rows}
        parted = next((read.change for read in reversed(self._read) if read.same(held.get(read.alert_id))), 0)
        parted = max(0, min(parted, last))
        back = self.streams.go_back(parted)
        log.warning("alert_feed_database_went_back", position=self._pos, last_change=last, parted_at=parted)
        self._pos = back
        while self._read and self._read[-1].change > self._pos:
            self._read.pop()
        self._head = None  # the next read takes the restored ledger's head
        self._mark = None  # the database holds an older mark, or none: the next read writes one
