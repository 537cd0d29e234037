"""The alert feed: live SSE fan-out, the sinks' copy of every alert, and checkpoints.

Fan-out across instances rides on PostgreSQL, not Redis: ``rg_alert`` (and every
acknowledgement) calls ``pg_notify('replayguard_alerts', id)`` inside its transaction, so
every instance LISTENing on the shared database hears of exactly the changes that
committed, whether Redis is configured or not. A notification only wakes the loop; the
loop then reads the changes from ``alerts`` by ``change_seq``, so a notification lost to a
reconnect is caught up by the next read (and by a poll every ``POLL_S``).

Subscribers get bounded queues and are never awaited, so nothing here can slow a decision
— decisions only ever write to PostgreSQL. A queue that overflows (a burst larger than
its stream could send meanwhile, or a client that reads slowly) is emptied for one
catch-up marker: its stream reads what it missed from the database (``CATCH_UP``). The
feed reads the changes at most a queue's worth at a time.

One instance at a time (the holder of a session advisory lock on its LISTEN connection)
is the *leader*: it signs checkpoints when due and hands every alert change and every
checkpoint to the sinks' outbox, fsyncs it, and then records in ``sink_feed`` how far it
got, so a new leader carries on where the last one stopped (at-least-once; records carry
ids for dedup). Every instance, leader or not, delivers what its own outbox holds, so
records spooled by an instance that stopped or lost the lead leave on its next start.
When the database went back in time (a restore, a failover to a standby behind), its
change numbers start again below the feed's position, and may reach it again before the
feed reads: the tail compares what it read last with what the database holds (this
feed's mark, the ledger entry that was the head then, the last change's alert, hash and
content), finds where they part, and goes back there with every open stream
(``_went_back``, ``_rewind``). The mark is a random tag the statement that reads the
changes writes into ``alert_feed_marks`` whenever it read any (``_MARK``): a copy older
than that read cannot hold it, so a database that lost only alert changes writing no
ledger entry (``ledger_rollback``, ``witness_unreachable``, ``ledger_tamper``), and
numbered as many again, the last alert read changing once more among them, is seen too.
The leader also checks the state tables against the ledger (``state_check.py``), bounded
work per tick (``core/state_schedule.py``): first every entry appended since its last look,
then the next slice of a sweep that goes from the newest entry down to the first and
starts again, so a state row altered long after its entry was written is found too. A
disagreement raises a critical ``ledger_tamper`` alert. So does a break the leader's chain
sweep finds (``core/chain_sweep.py``): the whole hash chain re-hashed, a bounded span per
tick, entries under checkpoints included, whether or not anyone asks for a verification.
The leader also writes each alert to the service's own log when it is raised or changes
kind or severity: critical ones as ``error`` lines, warnings as ``warning`` lines (kind,
VM, principal, alert id), so the journal alone shows an attack; a change read again after
the database went back is no new line. (An alert that changes while leadership moves
between instances may miss its line; the sinks and the API still have it.)

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
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from ..core import checkpoints as cps
from ..core.chain_sweep import ChainSweep
from ..core.checkpoints import Checkpoint
from ..core.ledger_check import Finding, Problem
from ..core.state_schedule import StateSchedule
from ..errors import ConfigError, Unavailable
from ..fanout import AlertFanout
from ..pg import connections
from ..pg.connections import UNAVAILABLE_ERRORS, acquire
from ..runtime import Runtime
from ..settings import Settings
from ..sinks import SinkConfig, SinkDispatcher, parse_sink_spec
from .alerts import COLUMNS, AlertService, content_digest, render, sink_checkpoint, sink_record
from .announced import Announced
from .apitokens import CHANNEL as API_TOKEN_CHANNEL
from .ledger import LedgerService, NotVouched
from .retention import PURGE_BATCH, purge_expired
from .state_check import Disagreement
from .tokens import CHANNEL as TOKEN_CHANNEL

log = structlog.get_logger(__name__)

CHANNEL = "replayguard_alerts"
POLL_S = 1.0
TAIL_GAP_S = 0.05  # at most one read of the alert changes per gap: a flood of joins is read in batches
PAGE = 500
QUEUE_SIZE = 256
_LEADER_LOCK = 0x7267666C  # "rgfl"
_RECENT = 4096
MARK_REFRESH_S = 3600.0  # a feed that read no change for this long writes its mark again
MARK_KEEP_S = 86_400  # the leader deletes the marks of feeds that wrote none for this long
ALERT_LOG_LEVELS = {"critical": "error", "warning": "warning"}  # severity: level of its log line


_SINK_FEED_INIT = ("INSERT INTO sink_feed VALUES (true, (SELECT coalesce(max(change_seq), 0) FROM alerts),"
                   " (SELECT coalesce(max(seq), 0) FROM checkpoints WHERE seq <= (SELECT seq FROM ledger_head)))"
                   " ON CONFLICT DO NOTHING")


_SINK_CHECKPOINTS = ("SELECT * FROM checkpoints WHERE seq > $1 AND key_id = ANY($2::text[])"
                     " AND seq <= (SELECT seq FROM ledger_head) ORDER BY seq LIMIT $3")


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
# The marks of feeds that wrote none for a day (stopped, or gone): a live feed writes its
# mark at least every MARK_REFRESH_S.
_FORGET_MARKS = f"DELETE FROM alert_feed_marks WHERE marked < now() - interval '{MARK_KEEP_S} seconds'"  # noqa: S608 - a constant


Raised = tuple[int, str | None, str | None]  # when an alert was raised, about which VM and principal


@dataclass(frozen=True, slots=True)
class Read:
    """The last change of one read of the tail: its number, its alert and that alert's
    content then."""

    change: int
    alert_id: int
    raised: Raised
    digest: str

    @classmethod
    def of(cls, record: asyncpg.Record) -> Read:
        return cls(record["change_seq"], record["id"], _raised(record), content_digest(render(record)))

    def same(self, row: asyncpg.Record | None) -> bool:
        """The database still holds this change: its alert as it was read, at its number."""
        return (row is not None and row["id"] is not None and row["change_seq"] == self.change
                and content_digest(render(row)) == self.digest)

    def held(self, row: asyncpg.Record) -> bool:
        """The same, or its alert (raised at the same time) changed again since, numbered after it."""
        if self.same(row):
            return True
        return row["id"] is not None and row["change_seq"] > self.change and _raised(row) == self.raised


def _raised(record: asyncpg.Record) -> Raised:
    return record["first_seen_us"], record["vm_id"], record["principal"]


def _crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("alert_feed_crashed", error=repr(task.exception()))


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


WEBHOOK_PREFIXES = ("webhook:", "ecs+webhook:", "ocsf+webhook:")


def sink_configs(settings: Settings) -> list[SinkConfig]:
    """The sinks of ``settings.sinks``, parsed; a bad spec is a ConfigError with one line."""
    try:
        return [parse_sink_spec(spec, secret=settings.webhook_secret
                                if spec.strip().startswith(WEBHOOK_PREFIXES) else None)
                for spec in settings.sinks]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_dispatcher(runtime: Runtime) -> SinkDispatcher | None:
    """The sinks of ``settings.sinks``; a bad spec stops start-up with one line."""
    settings = runtime.settings
    if not settings.sinks:
        return None
    configs = sink_configs(settings)
    try:
        return SinkDispatcher(configs, spool_dir=settings.data_dir / "outbox")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class AlertFeed:
    def __init__(self, runtime: Runtime, alerts: AlertService, ledger: LedgerService,
                 dispatcher: SinkDispatcher | None, max_subscribers: int) -> None:
        self._rt, self._alerts, self._ledger, self.dispatcher = runtime, alerts, ledger, dispatcher
        self._max = max_subscribers
        self.subscribers: set[Subscriber] = set()
        self._wake = asyncio.Event()
        # (kind, severity) last logged per alert, by id and what raised it (``_raised``): a
        # restore gives ids out again, to other alerts, and a change read again is no new line.
        self._logged: OrderedDict[tuple[int, Raised], tuple[str, str]] = OrderedDict()
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
        self._sinks_started = False
        self._sinks_error: str | None = None  # why the sinks did not start, as last logged
        # State findings alerted by this leader: the sweep finds each again round after round.
        self._state_findings: OrderedDict[Finding, None] = OrderedDict()
        self._state = StateSchedule()  # which entries the state check looks at next
        self._session_id: tuple[Any, ...] | None = None  # (pid, backend_start) of the feed's connection
        self.state_ticks = 0  # state checks done while leader (tests wait on it)
        self._chain_sweep = ChainSweep()  # which entries the chain sweep re-hashes next
        # Chain findings alerted by the checkpointer or the chain sweep (``_alert_once``), and
        # apart, the forged checkpoints the sweep set aside: however many rows someone wrote,
        # they cannot push a break of the chain out of what the leader remembers alerting.
        self._chain_findings: OrderedDict[Finding, None] = OrderedDict()
        self._forged: OrderedDict[Finding, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._last_lead = 0.0
        self._stopping = False
        self._listen_conn: asyncpg.Connection | None = None

    # --- subscribers ----------------------------------------------------------------

    def subscribe(self) -> Subscriber:
        if len(self.subscribers) >= self._max:
            raise Unavailable("too many alert stream subscribers; try again later")
        sub = Subscriber()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _publish(self, change: int, alert: dict[str, Any]) -> None:
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait((change, alert))
            except asyncio.QueueFull:
                self._overflowed(sub, change)

    @staticmethod
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

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Starts from now for live subscribers; the sinks' position is fixed before serving."""
        tag = secrets.token_bytes(16)
        async with acquire(self._rt.pool) as conn:
            newest = await conn.fetchrow(_START, self._feed_id, tag)
            if self.dispatcher is not None:
                await conn.execute(_SINK_FEED_INIT)
        self._pos = 0 if newest is None else newest["change_seq"]
        self._mark = self._tried = tag
        self._marked_at = time.monotonic()
        if newest is not None:  # where a database restored before the first read parts, if it holds it
            self._read.append(Read.of(newest))
        self._task = asyncio.create_task(self._run(), name="alert-feed")
        self._task.add_done_callback(_crashed)

    def close_subscribers(self) -> None:
        """Ends every open stream (at shutdown), so no handler keeps the service waiting."""
        for sub in list(self.subscribers):
            self._end(sub)

    def _end(self, sub: Subscriber) -> None:
        """Ends one open stream; its client reconnects with Last-Event-ID."""
        sub.dropped = True
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(None)
        self.subscribers.discard(sub)

    async def stop(self) -> None:
        if self._task is not None:
            # Python 3.11's wait_for can swallow a cancellation that races its timeout, so
            # the loops also watch a flag, and the cancel is repeated until the task ends.
            self._stopping = True
            self._wake.set()
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
        self.close_subscribers()
        await self._stop_sinks()

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            await self._start_sinks()  # every instance delivers its own outbox, database or not
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
                log.warning("alert_feed_interrupted", error=type(exc).__name__)
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
                await self._start_sinks()  # retried until it starts: it is the outbox's only delivery
                if not self.leader:
                    self.leader = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK))
                else:
                    await conn.fetchval("SELECT 1")  # notices a lost connection, and the lock with it
                if self.leader:
                    await self._lead()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    # --- live fan-out ---------------------------------------------------------------

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
            page = min(PAGE, QUEUE_SIZE)
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
                    self._log_alert(record)
                if self.subscribers:  # rendering for nobody is work a decision worker can skip
                    self._publish(record["change_seq"], render(record))
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
        its numbers were sent before (``_go_back``)."""
        last = int(await conn.fetchval("SELECT coalesce(max(change_seq), 0) FROM alerts"))
        rows = await conn.fetch(_ALERTS, sorted({read.alert_id for read in self._read}))
        held = {row["id"]: row for row in rows}
        parted = next((read.change for read in reversed(self._read) if read.same(held.get(read.alert_id))), 0)
        parted = max(0, min(parted, last))
        back = [self._go_back(sub, parted) for sub in list(self.subscribers)]
        kept = [sub.position for sub in self.subscribers if sub.position is not None]
        log.warning("alert_feed_database_went_back", position=self._pos, last_change=last, parted_at=parted)
        self._pos = min([parted, *back, *kept])
        while self._read and self._read[-1].change > self._pos:
            self._read.pop()
        self._head = None  # the next read takes the restored ledger's head
        self._mark = None  # the database holds an older mark, or none: the next read writes one

    @staticmethod
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

    def _log_alert(self, record: asyncpg.Record) -> None:
        """One log line per alert raised, and per change of its kind or severity."""
        severity, kind, key = record["severity"], record["kind"], (record["id"], _raised(record))
        if severity not in ALERT_LOG_LEVELS or self._logged.get(key) == (kind, severity):
            return
        self._logged[key] = (kind, severity)
        while len(self._logged) > _RECENT:
            self._logged.popitem(last=False)
        getattr(log, ALERT_LOG_LEVELS[severity])(
            "alert", alert_id=str(record["id"]), kind=kind, severity=severity, vm_id=record["vm_id"],
            principal=record["principal"], count=record["count"], status=record["status"],
            summary=record["summary"])

    # --- leader duties --------------------------------------------------------------

    async def _lead(self) -> None:
        settings = self._rt.settings
        work = self._rt.metrics.background
        # A checkpoint is signed after the newest recorded recovery, whatever this clock says:
        # one no later than the recovery's statement would count as given up by it.
        guard = self._rt.continuity
        recovered = guard.recovered_at_us
        now_us = self._rt.now_us() if recovered is None else max(self._rt.now_us(), recovered + 1)
        # Nothing is signed while the ledger went back in time (nor before the guard first
        # compared it with the witnesses): a checkpoint of a restored chain past the one a
        # witness holds would be taken by it, and the rollback would clear by itself.
        result = None
        if guard.checked and guard.rollback is None:
            with work.timed("checkpoint"):
                result = await self._ledger.checkpoint_if_due(now_us, settings.checkpoint_every,
                                                              settings.checkpoint_interval_s * 1_000_000,
                                                              guard.vouches)
        if isinstance(result, Finding) and await self._alert_once(self._chain_findings, result):
            await guard.check()  # a cut-off tail is a rollback too: stop decisions now
        elif isinstance(result, NotVouched):
            await guard.check()  # what the guard would not vouch for: it finds and records it
        elif isinstance(result, Checkpoint):
            guard.published(result)
        if self.dispatcher is not None and self._sinks_started:
            with work.timed("sink_feed"):
                await self._feed_sinks()
        with work.timed("chain_sweep"):
            await self._sweep_chain()
        with work.timed("state_check"):
            await self._check_state()
        with work.timed("purge"):
            purged = await purge_expired(self._rt.pool, self._rt.now_us())
            async with acquire(self._rt.pool) as conn:
                await conn.execute(_FORGET_MARKS)
        if purged == PURGE_BATCH:
            self._last_lead = 0.0  # more expired uses wait: purge the next batch at once

    async def _check_state(self) -> None:
        """One tick of the state check: the ranges ``core/state_schedule.py`` names (every
        entry since the last tick, then a slice of the sweep), up to the first finding."""
        now_us = self._rt.now_us()
        head = await self._ledger.head_seq()
        found = None
        for span in self._state.plan(head):
            found = await self._ledger.check_state(span.after, span.upto, now_us)
            self._state.done(span)
            if found is not None:
                break
        self.state_ticks += 1
        if found is None:
            return
        await self._alert_once(self._state_findings, found.finding(), found)

    async def _sweep_chain(self) -> None:
        """One tick of the chain sweep (``core/chain_sweep.py``): the next span of the whole
        chain re-hashed, entries under checkpoints included; a finding raises
        ``ledger_tamper`` once (``_alert_once``), however many rounds find it again. So do
        checkpoint rows of the service's key that disagree with the chain without a valid
        signature (``forged_checkpoint``, in a span the chain holds up in): they change
        nothing the service trusts, but only a writer to the database puts them there. One
        ``checkpoint_signature_invalid`` error line each time it alerts (the first row's entry
        and the span)."""
        head = await self._ledger.head_seq()
        span = self._chain_sweep.plan(head)
        if span is None:
            return
        finding = await self._ledger.check_chain_span(span.after, span.upto)
        self._chain_sweep.done(span, head)
        if finding is None:
            return
        if finding.problem is not Problem.FORGED_CHECKPOINT:
            await self._alert_once(self._chain_findings, finding)
        elif await self._alert_once(self._forged, finding):
            log.error("checkpoint_signature_invalid", first_seq=finding.seq, span_after=span.after,
                      span_upto=span.upto, found_by="chain_sweep")

    async def _alert_once(self, seen: OrderedDict[Finding, None], finding: Finding,
                          state: Disagreement | None = None) -> bool:
        """Raises ``ledger_tamper`` for ``finding`` unless this leader already did (``seen``:
        the last ``_RECENT`` findings of the chain, or of the state check): the sweeps find the
        same disagreements again and again, in turn, and an alert must not count up (and
        reopen, acknowledged) at every tick. False when it had. A finding is remembered once
        its alert is written, so one whose write failed is raised again at the next tick."""
        if finding in seen:
            return False
        await self._ledger.raise_tamper_alert(finding, self._rt.now_us(), state)
        seen[finding] = None
        while len(seen) > _RECENT:
            seen.popitem(last=False)
        return True

    async def _start_sinks(self) -> None:
        """Starts the sinks' delivery, on every instance, leader or not: each delivers what its
        own outbox holds (records spooled while it led, before it stopped or lost the lead);
        only the leader hands it new records (``_feed_sinks``). A failure is logged once per
        distinct error and retried."""
        if self.dispatcher is None or self._sinks_started:
            return
        try:
            await self.dispatcher.start()
        except (OSError, ConfigError) as exc:
            if str(exc) != self._sinks_error:
                self._sinks_error = str(exc)
                log.error("sinks_not_started", error=str(exc))
            return
        self._sinks_started, self._sinks_error = True, None

    async def _stop_sinks(self) -> None:
        if self.dispatcher is not None and self._sinks_started:
            self._sinks_started = False
            await self.dispatcher.stop()

    async def _feed_sinks(self) -> None:
        """Hands alert changes and checkpoints after the stored position to the sinks."""
        assert self.dispatcher is not None  # noqa: S101 - narrows the type for mypy: start() set the dispatcher
        async with acquire(self._rt.pool) as conn:
            await conn.execute(_SINK_FEED_INIT)
            pos = await conn.fetchrow("SELECT alert_change_seq, checkpoint_seq FROM sink_feed")
            alerts = await self._alerts.changes(pos["alert_change_seq"], PAGE)
            # Only this deployment's signed checkpoints (a retired signing key's within its
            # span, ``LedgerService.trusted``), up to the head: a row of another key,
            # or one that does not verify, is not evidence (the position moves past it), and
            # none past the head, where no checkpoint of ours can be, may move the position
            # beyond every checkpoint still to come.
            rows = await conn.fetch(_SINK_CHECKPOINTS, pos["checkpoint_seq"], self._ledger.key_ids, PAGE)
            checkpoints = [row for row in rows if self._ledger.trusted(cps.from_row(row))]
            for record in alerts:
                self.dispatcher.submit(sink_record(record))
            for record in checkpoints:
                self.dispatcher.submit(sink_checkpoint(cps.to_json(cps.from_row(record))))
            if alerts or checkpoints:
                # The position moves past these records only once the outbox holds them
                # durably: a power loss must not leave the database saying "handed over".
                try:
                    await self.dispatcher.sync()
                except OSError as exc:
                    log.error("sink_outbox_sync_failed", error=str(exc))  # handed over again next time
                    return
            await conn.execute(
                "UPDATE sink_feed SET alert_change_seq = greatest(alert_change_seq, $1),"
                " checkpoint_seq = greatest(checkpoint_seq, $2)",
                alerts[-1]["change_seq"] if alerts else 0, rows[-1]["seq"] if rows else 0)
        if len(alerts) == PAGE or len(rows) == PAGE:
            self._last_lead = 0.0  # a backlog: feed the next page at once
            self._wake.set()
