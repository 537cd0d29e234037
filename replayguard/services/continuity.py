"""The continuity guard: the ledger is compared with every witness, and decisions stop
when it went back in time (CONTRACT §10).

``check`` reads every witness first and the database after (a checkpoint reaches a
witness only after its entry committed, so a healthy ledger is never behind what was
read), then judges each held checkpoint, and the database's own newest signed checkpoint,
with ``core.continuity.judge``. A ledger behind or forked from any of them sets
``rollback``: ``admit_decisions`` then raises ``LedgerRollback`` (503) on every decision
route, /readyz answers 503 and a critical ``ledger_rollback`` alert is raised once per
held checkpoint. A witness that cannot be read raises ``witness_unreachable`` and keeps
its last verdict; it stops decisions only with ``witness_required``.

A process also finds a rollback from its own decisions, witnesses or not: a decision
numbered at or below an entry it knew committed (``confirm``), or a batch it committed
whose last entry the ledger no longer holds, hash for hash (``committed``, then ``check``:
another instance's decisions took its place). It writes that finding to
``continuity_findings``, which every ``check`` reads, so every instance stops and a
restart remembers; ``ledger accept-rollback`` gives up what it names and deletes it.

Every worker runs ``check`` at start (before serving) and every ``CHECK_S``; the
instance that signs a checkpoint hands it to ``published``, which pushes it to every
witness in a background task (a slow witness never holds a decision) and checks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import orjson
import structlog
from prometheus_client import CollectorRegistry, Gauge

from ..core import checkpoints as cps
from ..core import continuity
from ..core.checkpoints import Checkpoint
from ..core.continuity import Statement, Verdict
from ..errors import LedgerRollback, Unavailable
from ..keys import Keys
from ..metrics import BackgroundWork
from ..pg.connections import UNAVAILABLE_ERRORS, acquire
from ..settings import Settings
from .witness import Record, Witness, WitnessUnreachable, build_witnesses

log = structlog.get_logger(__name__)

CHECK_S = 2.0
DOWN: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, Unavailable)
DATABASE = "database checkpoints"
UNVERIFIED_MAX = 65_536  # batches committed between two checks that are remembered
_SNAPSHOT = ("SELECT h.seq, h.hash, c.seq AS cp_seq, c.hash AS cp_hash, c.ts_us AS cp_ts, c.key_id AS cp_key,"
             " c.signature AS cp_sig FROM ledger_head h"
             " LEFT JOIN LATERAL (SELECT * FROM checkpoints WHERE key_id = $1 ORDER BY seq DESC LIMIT 1) c ON true")


# Streaming standbys that acknowledge commits (PostgreSQL's synchronous replication): with
# none, a failover can lose acknowledged decisions (docs/operations.md).
_SYNC_STANDBYS = "SELECT count(*) FILTER (WHERE sync_state IN ('sync', 'quorum')) FROM pg_stat_replication"


class WitnessRequired(Unavailable):
    code = "witness_unreachable"


@dataclass(frozen=True, slots=True)
class Rollback:
    """Why decisions stop: which holder saw which entry, and where the ledger is."""

    source: str
    seq: int
    hash: bytes | None  # None: the entry's seq alone was seen (a decision this process answered)
    verdict: Verdict
    head_seq: int
    signed: bool = False  # a held checkpoint's; else a service process's own entry

    @classmethod
    def of(cls, source: str, held: Checkpoint, verdict: Verdict, head_seq: int) -> Rollback:
        return cls(source, held.seq, held.hash, verdict, head_seq, signed=True)

    @property
    def first_bad_seq(self) -> int:
        return self.head_seq + 1 if self.verdict is Verdict.BEHIND else self.seq

    def message(self) -> str:
        if not self.signed and self.hash is not None:
            return (f"the ledger went back in time: {self.source} committed entry {self.seq}, which the "
                    f"ledger no longer holds (another entry took its place, or it ends before it)")
        if self.hash is None:
            return (f"the ledger went back in time: {self.source} answered a decision at entry {self.seq} "
                    f"but the database's new entries are numbered from {self.head_seq + 1}")
        if self.verdict is Verdict.BEHIND:
            return (f"the ledger went back in time: {self.source} holds a signed checkpoint of entry "
                    f"{self.seq} but the ledger ends at {self.head_seq}")
        return (f"the ledger forked: {self.source} holds a signed checkpoint of entry {self.seq} "
                f"with another hash than the ledger's")

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "verdict": self.verdict.value, "head_seq": self.head_seq,
                "held": {"seq": self.seq, "hash": None if self.hash is None else self.hash.hex()}}


@dataclass
class WitnessState:
    up: bool | None = None
    held: Checkpoint | None = None
    verdict: Verdict | None = None
    error: str | None = None


def _up_of(state: WitnessState) -> Callable[[], float]:
    return lambda: 1.0 if state.up else 0.0


class ContinuityGuard:
    def __init__(self, pool: asyncpg.Pool, keys: Keys, settings: Settings, clock: Callable[[], float],
                 registry: CollectorRegistry | None = None) -> None:
        self._pool, self._clock = pool, clock
        self._key = keys.signing_key()
        self.public = self._key.public_key()
        self.deployment_id = cps.key_id(self.public)
        self.public_key_pem = cps.public_key_pem(self.public)
        self._required = settings.witness_required
        self.background = BackgroundWork()  # the runtime hands in its metrics' own
        token = settings.witness_token.reveal() if settings.witness_token is not None else None
        self.witnesses: list[Witness] = build_witnesses(settings.witnesses, self.deployment_id, token)
        self.states = {w.name: WitnessState() for w in self.witnesses}
        self._db_verdict: tuple[Checkpoint, Verdict] | None = None
        self.rollback: Rollback | None = None
        self.recoveries: list[Statement] = []
        self.head_seq = 0
        self._floor = 0  # the highest entry this process knows committed
        # The last entry of each batch it committed since the last check, and its hash.
        self._unverified: deque[tuple[int, bytes]] = deque(maxlen=UNVERIFIED_MAX)
        self._seen: Rollback | None = None  # a rollback this process found by itself
        self._written: Rollback | None = None  # ... already in continuity_findings
        self._found: Rollback | None = None  # the newest finding in continuity_findings
        self._raised: Rollback | None = None  # the rollback last alerted
        self._recovery_seq = -1
        self._soon: asyncio.Task[None] | None = None
        self.sync_standbys: int | None = None
        self._alerted: set[str] = set()
        self._push: asyncio.Task[None] | None = None
        self._pending: Checkpoint | None = None
        self._lock = asyncio.Lock()
        self.on_recovered: Callable[[int | None], None] = lambda _ts: None
        if registry is not None:
            self._gauges(registry)

    def _gauges(self, registry: CollectorRegistry) -> None:
        up = Gauge("replayguard_witness_up", "1 when the witness answered the last continuity check",
                   ["witness"], registry=registry)
        for name, state in self.states.items():
            up.labels(name).set_function(_up_of(state))
        Gauge("replayguard_postgres_sync_standbys",
              "Synchronous standbys of the ledger's PostgreSQL at the last continuity check",
              registry=registry).set_function(lambda: self.sync_standbys or 0)
        Gauge("replayguard_ledger_rollback", "1 while decisions stop because the ledger went back in time",
              registry=registry).set_function(lambda: 1 if self.rollback is not None else 0)

    # --- what the decision routes and /readyz ask ---------------------------------------

    @property
    def unreachable(self) -> list[str]:
        return [name for name, s in self.states.items() if s.up is False]

    def admit_decisions(self) -> int:
        """Raises when no decision may be served (a rollback, or a required witness down);
        else returns the highest entry this process knows committed, for ``confirm``."""
        if self.rollback is not None:
            raise LedgerRollback(self.rollback.message() + "; record the recovery with "
                                 "'replayguard ledger accept-rollback'")
        if self._required and self.unreachable:
            raise WitnessRequired(f"a required witness cannot be reached: {', '.join(self.unreachable)}")
        return self._floor

    def confirm(self, floor: int, seq: int | None) -> None:
        """A decision's entry must come after every entry known committed before it was
        submitted (``floor``): one that does not was written to a database that went back
        in time under this process (a restore or failover behind the same URL). Its answer
        becomes a 503 and decisions stop, whatever the witnesses say. So does the answer of
        every decision confirmed once a rollback is known, though it was admitted before:
        a replay committed right after the decision that revealed the rollback gets a
        ``seq`` past its own ``floor``."""
        if seq is None:
            return
        if seq <= floor:
            self._seen = Rollback("this service process", floor, None, Verdict.BEHIND, seq - 1)
            self.rollback = self.rollback or self._seen
            self._soon = asyncio.create_task(self._check_quietly(), name="continuity-check")
            raise LedgerRollback(self._seen.message())
        if self.rollback is not None:
            raise LedgerRollback(self.rollback.message())
        self._floor = max(self._floor, seq)

    def committed(self, seq: int, entry_hash: bytes) -> None:
        """The appender committed a batch whose last entry is ``seq``, with ``entry_hash``:
        the next check that finds another hash there (or none) finds a database that went
        back and on (an instance sharing it decided at that ``seq`` after a restore). Each
        batch is one transaction, so its last entry stands for all of it; every batch is
        checked, since this process's own later batches chain onto whatever the database
        then holds."""
        self._unverified.append((seq, entry_hash))

    async def _check_quietly(self) -> None:
        with contextlib.suppress(*DOWN, asyncpg.PostgresError):
            await self.check()

    def status(self) -> str:
        if self.rollback is not None:
            return "ledger_rollback"
        if self.unreachable:
            return "witness_unreachable"
        return "ok"

    def ready(self) -> bool:
        return self.rollback is None and not (self._required and self.unreachable)

    @property
    def recovered_at_us(self) -> int | None:
        return max((st.ts_us for st in self.recoveries), default=None)

    # --- the check ----------------------------------------------------------------------

    async def _read(self, witness: Witness) -> Record | WitnessUnreachable | None:
        try:
            record = await asyncio.wait_for(witness.read(), 5.0)
        except WitnessUnreachable as exc:
            return exc
        except TimeoutError:
            return WitnessUnreachable(f"{witness.name}: no answer")
        if record is not None and not self._ours(record):
            return WitnessUnreachable(f"{witness.name} holds a checkpoint not signed by this deployment's key")
        return record

    def _ours(self, record: Record) -> bool:
        return (record.public_key_pem.strip() == self.public_key_pem.strip()
                and cps.verify(self.public, record.checkpoint))

    async def check(self) -> Rollback | None:
        """Compares the ledger with every witness and its own newest checkpoint (see module)."""
        async with self._lock:
            reads = await asyncio.gather(*(self._read(w) for w in self.witnesses))
            async with acquire(self._pool) as conn:
                floor = self._floor  # committed before the head is read: the head cannot be below it
                snap = await conn.fetchrow(_SNAPSHOT, self.deployment_id)
                self.sync_standbys = await conn.fetchval(_SYNC_STANDBYS)
                self.recoveries = await self._recoveries(conn)
                self.on_recovered(self.recovered_at_us)
                self.head_seq = snap["seq"]
                self._track(self.head_seq, floor)
                await self._verify_own_batches(conn)
                await self._share_finding(conn)
                db_cp = self._db_checkpoint(snap)
                if db_cp is not None:
                    self._db_verdict = (db_cp, await self._judge(conn, db_cp))
                for witness, read in zip(self.witnesses, reads, strict=True):
                    await self._note(conn, witness.name, read)
            rollback = self._rollback()
            self.rollback = rollback
            changed, self._raised = rollback != self._raised, rollback
        if rollback is not None and changed:
            await self._alert_rollback(rollback)
        await self._alert_unreachable()
        if rollback is None and db_cp is not None:
            self._push_if_lagging(db_cp)
        return rollback

    def _track(self, head_seq: int, floor: int) -> None:
        """Moves the floor with the head; a head below the floor as it was before the head
        was read went back in time under this process, unless a recovery was recorded
        since (its entry starts the floor again)."""
        newest = max((st.recovery_seq for st in self.recoveries), default=0)
        if self._recovery_seq >= 0 and newest > self._recovery_seq:
            self._seen, self._written, self._floor = None, None, head_seq
            self._unverified.clear()
            self._recovery_seq = newest
            return
        self._recovery_seq = newest
        if head_seq < floor and self._seen is None:
            self._seen = Rollback("this service process", floor, None, Verdict.BEHIND, head_seq)
        self._floor = max(self._floor, head_seq)

    async def _verify_own_batches(self, conn: asyncpg.Connection) -> None:
        """Every batch this process committed up to the head must still be the ledger's,
        hash for hash (one past the head is _track's to judge, at this check or the next)."""
        due = [(seq, entry_hash) for seq, entry_hash in list(self._unverified) if seq <= self.head_seq]
        if self._seen is not None or not due:
            return
        rows = await conn.fetch("SELECT seq, hash FROM ledger WHERE seq = ANY($1::bigint[])", [seq for seq, _ in due])
        held = {row["seq"]: bytes(row["hash"]) for row in rows}
        for seq, entry_hash in due:
            if held.get(seq) != entry_hash:
                self._seen = Rollback("this service process", seq, entry_hash, Verdict.FORKED, self.head_seq)
                return
        verified = due[-1][0]
        while self._unverified and self._unverified[0][0] <= verified:
            self._unverified.popleft()

    async def _share_finding(self, conn: asyncpg.Connection) -> None:
        """Writes this process's own finding to ``continuity_findings`` once, and reads the
        newest one there (another instance's, or one from before a restart)."""
        if self._seen is not None and self._written is not self._seen:
            await conn.execute("INSERT INTO continuity_findings (found_us, seq, hash, head_seq, process)"
                               " VALUES ($1, $2, $3, $4, $5)", int(self._clock() * 1e6), self._seen.seq,
                               self._seen.hash, self.head_seq, f"{socket.gethostname()} pid {os.getpid()}")
            self._written = self._seen
        row = await conn.fetchrow("SELECT seq, hash, process FROM continuity_findings ORDER BY seq DESC LIMIT 1")
        self._found = None if row is None else Rollback(
            f"a running service ({row['process']})", row["seq"], None if row["hash"] is None else bytes(row["hash"]),
            Verdict.BEHIND if row["seq"] > self.head_seq else Verdict.FORKED, self.head_seq)

    def _db_checkpoint(self, snap: asyncpg.Record) -> Checkpoint | None:
        if snap["cp_seq"] is None:
            return None
        cp = Checkpoint(snap["cp_seq"], bytes(snap["cp_hash"]), snap["cp_ts"], snap["cp_key"], bytes(snap["cp_sig"]))
        return cp if cp.key_id == self.deployment_id and cps.verify(self.public, cp) else None

    async def _recoveries(self, conn: asyncpg.Connection) -> list[Statement]:
        found = []
        for record in await conn.fetch("SELECT statement::text AS st FROM ledger_recoveries ORDER BY seq"):
            try:
                st = continuity.statement_from_json(orjson.loads(record["st"]))
            except ValueError:
                continue
            if continuity.statement_valid(self.public, st):
                found.append(st)
        return found

    async def _judge(self, conn: asyncpg.Connection, held: Checkpoint) -> Verdict:
        hash_at = None
        if held.seq <= self.head_seq:
            raw = await conn.fetchval("SELECT hash FROM ledger WHERE seq = $1", held.seq)
            hash_at = None if raw is None else bytes(raw)
        return continuity.judge(held, self.head_seq, hash_at, self.recoveries)

    async def _note(self, conn: asyncpg.Connection, name: str, read: Record | WitnessUnreachable | None) -> None:
        state = self.states[name]
        if isinstance(read, WitnessUnreachable):
            if state.up is not False:
                log.warning("witness_unreachable", witness=name, error=str(read))
            state.up, state.error = False, str(read)
            return  # the last verdict stands: a witness that went quiet proves nothing new
        state.up, state.error = True, None
        state.held = None if read is None else read.checkpoint
        state.verdict = None if read is None else await self._judge(conn, read.checkpoint)

    def _rollback(self) -> Rollback | None:
        """The worst finding: the furthest checkpoint the ledger no longer holds."""
        found = []
        if self._db_verdict is not None and self._db_verdict[1].rollback:
            found.append(Rollback.of(DATABASE, self._db_verdict[0], self._db_verdict[1], self.head_seq))
        for name, state in self.states.items():
            if state.held is not None and state.verdict is not None and state.verdict.rollback:
                found.append(Rollback.of(name, state.held, state.verdict, self.head_seq))
        found += [r for r in (self._seen, self._found) if r is not None]
        return max(found, key=lambda r: r.seq, default=None)

    def held_checkpoints(self) -> list[tuple[str, Checkpoint, Verdict | None]]:
        """Every holder's checkpoint as last read (for the recovery's record)."""
        found: list[tuple[str, Checkpoint, Verdict | None]] = []
        if self._db_verdict is not None:
            found.append((DATABASE, *self._db_verdict))
        found += [(n, s.held, s.verdict) for n, s in self.states.items() if s.held is not None]
        if self._found is not None:  # what it names is given up, as a held checkpoint's entries are
            lost = Checkpoint(self._found.seq, self._found.hash or bytes(32), int(self._clock() * 1e6),
                              self.deployment_id, b"")
            found.append((self._found.source, lost, self._found.verdict))
        return found

    # --- alerts -------------------------------------------------------------------------

    async def _alert(self, kind: str, severity: str, dedup: str, summary: str, details: dict[str, object]) -> None:
        now_us = int(self._clock() * 1e6)
        try:
            async with acquire(self._pool) as conn:
                await conn.fetchval("SELECT rg_alert($1, $2, NULL, NULL, $3, $4, $5, $6, $7::jsonb)",
                                    kind, severity, dedup, now_us, self.head_seq, summary, details)
        except DOWN as exc:
            log.warning("continuity_alert_not_written", kind=kind, error=type(exc).__name__)
            self._alerted.discard(dedup)

    async def _alert_rollback(self, rollback: Rollback) -> None:
        log.critical("ledger_rollback", **rollback.to_json())
        dedup = f"ledger_rollback:{rollback.source}:{rollback.seq}:{(rollback.hash or b'').hex()[:16]}"
        await self._alert("ledger_rollback", "critical", dedup, rollback.message(), rollback.to_json())

    async def _alert_unreachable(self) -> None:
        for name, state in self.states.items():
            dedup = f"witness_unreachable:{name}"
            if state.up is False and dedup not in self._alerted:
                self._alerted.add(dedup)
                await self._alert("witness_unreachable", "critical" if self._required else "warning", dedup,
                                  f"witness {name} cannot be reached: {state.error}",
                                  {"witness": name, "error": state.error, "required": self._required})
            elif state.up:
                self._alerted.discard(dedup)

    # --- pushing checkpoints ------------------------------------------------------------

    def published(self, cp: Checkpoint) -> None:
        """A new checkpoint was signed: push it to every witness, off the caller's path."""
        if not self.witnesses:
            return
        self._pending = cp if self._pending is None or cp.seq > self._pending.seq else self._pending
        if self._push is None or self._push.done():
            self._push = asyncio.create_task(self._push_pending(), name="witness-push")

    def _push_if_lagging(self, latest: Checkpoint) -> None:
        if any(s.up and (s.held is None or s.held.seq < latest.seq or s.verdict is Verdict.COVERED)
               for s in self.states.values()):
            self.published(latest)

    async def _push_pending(self) -> None:
        while self._pending is not None:
            cp, self._pending = self._pending, None
            await self.push(cp)
            with contextlib.suppress(*DOWN):
                await self.check()

    async def push(self, cp: Checkpoint) -> dict[str, str]:
        """Offers ``cp`` (with the latest recovery statement) to every witness; returns each
        one's answer (an admission, or ``unreachable: …``)."""
        recovery = self.recoveries[-1] if self.recoveries else None
        record = Record(self.deployment_id, self.public_key_pem, cp, recovery)

        async def one(witness: Witness) -> str:
            try:
                answer = await asyncio.wait_for(witness.put(record), 10.0)
            except (WitnessUnreachable, TimeoutError) as exc:
                self.states[witness.name].up = False
                self.states[witness.name].error = str(exc) or "no answer"
                return f"unreachable: {self.states[witness.name].error}"
            if answer.refused:
                log.error("witness_refused_checkpoint", witness=witness.name, seq=cp.seq, admission=answer.value)
            return answer.value

        answers = await asyncio.gather(*(one(w) for w in self.witnesses))
        return dict(zip((w.name for w in self.witnesses), answers, strict=True))

    async def run(self) -> None:
        """Checks every ``CHECK_S`` until cancelled."""
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                with self.background.timed("continuity"):
                    await self.check()
            except (*DOWN, asyncpg.PostgresError) as exc:
                log.warning("continuity_check_failed", error=type(exc).__name__)

    async def close(self) -> None:
        for task in (self._push, self._soon):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})
