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
numbered at or below an entry it knew committed (``confirm``), or an entry it knew
committed that the ledger no longer holds, hash for hash: the last entry of every batch
it committed (``committed``), its newest one, and the head it read at its previous check,
each compared at every check (another instance's decisions, or any entry at all, took
its place after a restore). A held checkpoint is judged again at every check, its
witness reachable or not. A rollback found through a witness or the database's own
checkpoints is written to ``continuity_findings`` as the process's own findings are,
which every ``check`` reads, so every instance stops and a restart remembers;
``ledger accept-rollback`` gives up what they name and deletes them (a finding made
before the newest recovery, by a check that raced it, is answered by it and ignored).
A recovery read for the first time makes the process drop what it remembered of the
chain only when it gave up what the process found lost (``_recovered``): a genuine
recovery brought in with another copy of the database never wipes that memory.
Recovery statements are read from the ``ledger_recovery`` entries, under the hash
chain, never from the plain table ``ledger_recoveries``.

Every worker runs ``check`` at start and every ``CHECK_S``; no decision is admitted
before one completed (``unavailable``). The instance that signs a checkpoint hands it
to ``published``, which pushes it to every witness in a background task (a slow witness
never holds a decision) and checks again; nothing is signed nor pushed while a rollback
is known (``vouches``), and nothing is pushed to a witness the last check could not read
(what it holds was compared with nothing), so a restored chain never overtakes what a
witness holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog
from prometheus_client import CollectorRegistry, Gauge

from ..core import checkpoints as cps
from ..core import continuity
from ..core.checkpoints import Checkpoint
from ..core.continuity import Statement, Verdict
from ..core.handover import Signers, handed_over
from ..core.summaries import quoted
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
SELF = "this service process"
UNVERIFIED_MAX = 65_536  # batches committed between two checks that are remembered
_SNAPSHOT = ("SELECT h.seq, h.hash, c.seq AS cp_seq, c.hash AS cp_hash, c.ts_us AS cp_ts, c.key_id AS cp_key,"
             " c.signature AS cp_sig FROM ledger_head h"
             " LEFT JOIN LATERAL (SELECT * FROM checkpoints WHERE key_id = $1 ORDER BY seq DESC LIMIT 1) c ON true")
# Migration 044's index of rare entries: no scan of the ledger.
_RECOVERIES = ("SELECT (payload->'statement')::text AS st FROM ledger WHERE kind = 'ledger_recovery'"
               " ORDER BY seq")


def _shown(name: str) -> str:
    """A holder's name without userinfo, query or fragment (a witness URL may carry credentials)."""
    if not name.startswith(("http://", "https://")):
        return name
    parts = urlsplit(name)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


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
            return (f"the ledger went back in time: {self.source} knew entry {self.seq} committed, which the "
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
                 registry: CollectorRegistry | None = None, signers: Signers | None = None) -> None:
        """``signers``: the chain of signing keys the ledger's handovers make
        (``signing_rotation.load_signers``); without it, this process's key alone."""
        self._pool, self._clock = pool, clock
        self._key = keys.signing_key()
        self.public = self._key.public_key()
        self.signers = signers if signers is not None else Signers.single(self.public)
        # Witnesses know the deployment by its first key's id, kept across rotations;
        # its checkpoints are signed by the current key.
        self.deployment_id = self.signers.deployment_id
        self.key_id = cps.key_id(self.public)
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
        # Compared with the ledger at every check, until a recovery: the newest entry this
        # process committed, and the head the previous check read (seq, hash).
        self._own: tuple[int, bytes] | None = None
        self._head_seen: tuple[int, bytes] | None = None
        self.checked = False  # a check completed: decisions may be admitted
        self._seen: Rollback | None = None  # a rollback this process found by itself
        self._written: tuple[int, bytes | None] | None = None  # the finding it last wrote
        self._found: Rollback | None = None  # the newest finding in continuity_findings
        self._raised: Rollback | None = None  # the rollback last alerted
        self._recoveries_known: set[bytes] | None = None  # statements read (signatures)
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
        """Raises when no decision may be served (no check completed yet, a rollback, or a
        required witness down); else returns the highest entry this process knows
        committed, for ``confirm``."""
        if not self.checked:
            raise Unavailable("the ledger has not been compared with its witnesses yet (CONTRACT §10); "
                              "no decision is served until it is")
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
            self._seen = Rollback(SELF, floor, None, Verdict.BEHIND, seq - 1)
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
        then holds. The newest is kept past its check and compared at every later one."""
        self._unverified.append((seq, entry_hash))
        if self._own is None or seq > self._own[0]:
            self._own = (seq, entry_hash)

    def recorded(self, seq: int, entry_hash: bytes) -> None:
        """This process committed an entry outside the appender (a hypervisor event, an
        enrolment, a token deletion, an unlock, an acknowledgement, a VM clear: see
        ``services.entries``): like a batch, the next check finds it gone, and a decision
        numbered at or below it after a restore is refused at once (``confirm``)."""
        self.committed(seq, entry_hash)
        self._floor = max(self._floor, seq)

    async def _check_quietly(self) -> None:
        with contextlib.suppress(*DOWN, asyncpg.PostgresError):
            await self.check()

    def status(self) -> str:
        if self.rollback is not None:
            return "ledger_rollback"
        if not self.checked:
            return "unchecked"
        if self.unreachable:
            return "witness_unreachable"
        return "ok"

    def ready(self) -> bool:
        return self.checked and self.rollback is None and not (self._required and self.unreachable)

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
        """Signed by this deployment's key, or by one it handed over from: a witness not
        offered a checkpoint since the rotation holds one of the retired key, which is
        judged against the ledger like any other (one past the key's span included: it
        can be a genuine checkpoint of a chain a restore abandoned)."""
        signer = self.signers.by_pem(record.public_key_pem)
        if signer is not None:
            return cps.verify(signer.public, record.checkpoint)
        return self._handed_on(record)

    def _handed_on(self, record: Record) -> bool:
        """A checkpoint of a key this process does not know, which the witness took through
        handovers from this process's key (kept with the record): the deployment's key was
        rotated in a ledger this database no longer holds (restored with the keys from
        before the rotation). It is this deployment's, and judged like any other."""
        try:
            public = cps.load_public_key(record.public_key_pem.encode())
        except ValueError:
            return False
        return (handed_over(self.public, public, self.deployment_id, record.handovers)
                and cps.verify(public, record.checkpoint))

    async def check(self) -> Rollback | None:
        """Compares the ledger with every witness and its own newest checkpoint (see module)."""
        async with self._lock:
            reads = await asyncio.gather(*(self._read(w) for w in self.witnesses))
            async with acquire(self._pool) as conn:
                # Known committed before the head is read: a healthy head is not below them.
                floor, own = self._floor, self._own
                snap = await conn.fetchrow(_SNAPSHOT, self.key_id)
                self.sync_standbys = await conn.fetchval(_SYNC_STANDBYS)
                self.recoveries = await self._recoveries(conn)
                self.on_recovered(self.recovered_at_us)
                self.head_seq = snap["seq"]
                fresh = self._fresh_recoveries()
                self._track(self.head_seq, floor, own)
                await self._verify_known(conn, own)
                if fresh:
                    self._recovered(fresh)
                self._head_seen = (snap["seq"], bytes(snap["hash"]))
                # The database's newest checkpoint; the last one read, judged again, when
                # none is there any more (rows deleted by someone with database rights).
                db_cp = self._db_checkpoint(snap)
                last_db = db_cp if db_cp is not None else self._db_verdict[0] if self._db_verdict else None
                if last_db is not None:
                    self._db_verdict = (last_db, await self._judge(conn, last_db))
                for witness, read in zip(self.witnesses, reads, strict=True):
                    await self._note(conn, witness.name, read)
                await self._share_finding(conn)
            rollback = self._rollback()
            self.rollback = rollback
            self.checked = True
            changed, self._raised = rollback != self._raised, rollback
        if rollback is not None and changed:
            await self._alert_rollback(rollback)
        await self._alert_unreachable()
        if rollback is None and db_cp is not None:
            self._push_if_lagging(db_cp)
        return rollback

    def _track(self, head_seq: int, floor: int, own: tuple[int, bytes] | None) -> None:
        """Moves the floor with the head; a head below the floor as it was before the head
        was read, or below the newest entry this process committed by then, went back in
        time under this process."""
        if self._seen is None and head_seq < floor:
            self._seen = Rollback(SELF, floor, None, Verdict.BEHIND, head_seq)
        elif self._seen is None and own is not None and own[0] > head_seq:
            self._seen = Rollback(SELF, own[0], own[1], Verdict.BEHIND, head_seq)
        self._floor = max(self._floor, head_seq)

    def _fresh_recoveries(self) -> list[Statement]:
        """The recovery statements this check reads for the first time (none at the first
        check: the ledger this process starts on is the one it knows)."""
        signatures = {st.signature for st in self.recoveries}
        if self._recoveries_known is None:
            self._recoveries_known = signatures
            return []
        fresh = [st for st in self.recoveries if st.signature not in self._recoveries_known]
        self._recoveries_known |= signatures
        return fresh

    def _recovered(self, fresh: list[Statement]) -> None:
        """A recovery this process had not read: what it remembered of the chain is dropped
        and the head starts the floor again, if the recovery gave up what the process found
        lost (an abandoned entry at or past its finding), or it found nothing. A recovery
        that does not (one recorded on another copy of the database and brought here with
        it, a genuine statement replayed, one recorded before this process's finding
        reached the database) leaves the finding standing, and it is written again."""
        seen = self._seen
        if seen is not None and not any(st.abandoned_seq >= seen.seq for st in fresh):
            log.error("recovery_does_not_answer_finding", finding_seq=seen.seq,
                      abandoned_seq=[st.abandoned_seq for st in fresh], head_seq=self.head_seq)
            self._written = None
            return
        self._seen, self._written, self._floor = None, None, self.head_seq
        self._unverified.clear()
        self._own = self._head_seen = None

    @property
    def _newest_recovery_seq(self) -> int:
        return max((st.recovery_seq for st in self.recoveries), default=0)

    async def _verify_known(self, conn: asyncpg.Connection, own: tuple[int, bytes] | None) -> None:
        """Every entry this process knows committed up to the head must still be the
        ledger's, hash for hash: the last of every batch it committed since the last check,
        its newest one and the head the last check read (kept until a recovery, so an
        entry of any kind put in the place of one of them after a restore is seen). One
        past the head is _track's to judge; the head of an empty ledger (0) is no entry."""
        due = [(seq, entry_hash) for seq, entry_hash in list(self._unverified) if seq <= self.head_seq]
        known = [pair for pair in (self._head_seen, own) if pair is not None and 0 < pair[0] <= self.head_seq]
        if self._seen is not None or not (due or known):
            return
        rows = await conn.fetch("SELECT seq, hash FROM ledger WHERE seq = ANY($1::bigint[])",
                                sorted({seq for seq, _ in due + known}))
        held = {row["seq"]: bytes(row["hash"]) for row in rows}
        for seq, entry_hash in due + known:
            if held.get(seq) != entry_hash:
                self._seen = Rollback(SELF, seq, entry_hash, Verdict.FORKED, self.head_seq)
                return
        if due:
            verified = due[-1][0]
            while self._unverified and self._unverified[0][0] <= verified:
                self._unverified.popleft()

    async def _share_finding(self, conn: asyncpg.Connection) -> None:
        """Writes this process's worst finding (its own, or a held checkpoint the ledger
        lost) to ``continuity_findings`` once, and reads the newest one there (another
        instance's, or one from before a restart). A finding made before the newest
        recovery (a check that read the ledger just before the recovery committed) is
        answered by that recovery: it is not read."""
        mine = max(self._findings(), key=lambda r: r.seq, default=None)
        since = self._newest_recovery_seq
        if mine is not None and (mine.seq, mine.hash) != self._written:
            process = f"{socket.gethostname()} pid {os.getpid()}"
            if mine.source != SELF:
                process += f", from {_shown(mine.source)}"
            await conn.execute(
                "INSERT INTO continuity_findings (found_us, seq, hash, head_seq, process)"
                " SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM continuity_findings"
                " WHERE seq = $2 AND hash IS NOT DISTINCT FROM $3 AND head_seq >= $6)",
                int(self._clock() * 1e6), mine.seq, mine.hash, self.head_seq, process, since)
            self._written = (mine.seq, mine.hash)
        row = await conn.fetchrow("SELECT seq, hash, process FROM continuity_findings WHERE head_seq >= $1"
                                  " ORDER BY seq DESC LIMIT 1", since)
        self._found = None if row is None else Rollback(
            f"a running service ({row['process']})", row["seq"], None if row["hash"] is None else bytes(row["hash"]),
            Verdict.BEHIND if row["seq"] > self.head_seq else Verdict.FORKED, self.head_seq)

    def _db_checkpoint(self, snap: asyncpg.Record) -> Checkpoint | None:
        if snap["cp_seq"] is None:
            return None
        cp = Checkpoint(snap["cp_seq"], bytes(snap["cp_hash"]), snap["cp_ts"], snap["cp_key"], bytes(snap["cp_sig"]))
        return cp if cp.key_id == self.key_id and cps.verify(self.public, cp) else None

    async def _recoveries(self, conn: asyncpg.Connection) -> list[Statement]:
        """The statements of the ``ledger_recovery`` entries whose signature holds, by the
        key whose span holds the entry (the entries, under the hash chain: a row deleted
        from ``ledger_recoveries`` changes nothing, one added there without its entry
        counts for nothing)."""
        found = []
        for record in await conn.fetch(_RECOVERIES):
            try:
                st = continuity.statement_from_json(orjson.loads(record["st"] or "null"))
            except ValueError:
                continue
            if self.signers.statement_valid(st):
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
            # What it held when last read is still evidence: judged against the ledger as
            # it is now (a restore while the witness is down is a rollback all the same).
            if state.held is not None:
                state.verdict = await self._judge(conn, state.held)
            return
        state.up, state.error = True, None
        state.held = None if read is None else read.checkpoint
        state.verdict = None if read is None else await self._judge(conn, read.checkpoint)

    def _findings(self) -> list[Rollback]:
        """What this process found at its last check: held checkpoints the ledger no longer
        holds, and entries it knew committed that are gone."""
        found = []
        if self._db_verdict is not None and self._db_verdict[1].rollback:
            found.append(Rollback.of(DATABASE, self._db_verdict[0], self._db_verdict[1], self.head_seq))
        for name, state in self.states.items():
            if state.held is not None and state.verdict is not None and state.verdict.rollback:
                found.append(Rollback.of(name, state.held, state.verdict, self.head_seq))
        if self._seen is not None:
            found.append(self._seen)
        return found

    def _rollback(self) -> Rollback | None:
        """The worst finding, this process's or any instance's: the furthest entry lost."""
        found = self._findings() + ([self._found] if self._found is not None else [])
        return max(found, key=lambda r: r.seq, default=None)

    def held_checkpoints(self) -> list[tuple[str, Checkpoint, Verdict | None]]:
        """Every holder's checkpoint as last read (for the recovery's record)."""
        found: list[tuple[str, Checkpoint, Verdict | None]] = []
        if self._db_verdict is not None:
            found.append((DATABASE, *self._db_verdict))
        found += [(n, s.held, s.verdict) for n, s in self.states.items() if s.held is not None]
        if self._found is not None:  # what it names is given up, as a held checkpoint's entries are
            lost = Checkpoint(self._found.seq, self._found.hash or bytes(32), int(self._clock() * 1e6),
                              self.key_id, b"")
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
                                  f"witness {quoted(name)} cannot be reached: {quoted(state.error)}",
                                  {"witness": name, "error": state.error, "required": self._required})
            elif state.up:
                self._alerted.discard(dedup)

    # --- pushing checkpoints ------------------------------------------------------------

    async def vouches(self, conn: asyncpg.Connection, head_seq: int) -> bool:
        """Whether the ledger's head (``head_seq``, read on ``conn``) may be signed now: a
        check completed, no rollback is known, and every checkpoint a witness held when
        last read (reachable now or not), and every entry this process knows committed,
        is still the ledger's, hash for hash. A chain signed past a witness's checkpoint
        would be taken by it (a higher seq), and the rollback would clear by itself."""
        if not self.checked or self.rollback is not None:
            return False
        held = [s.held for s in self.states.values() if s.held is not None]
        known = [pair for pair in (self._head_seen, self._own) if pair is not None and 0 < pair[0] <= head_seq]
        seqs = sorted({cp.seq for cp in held if cp.seq <= head_seq} | {seq for seq, _ in known})
        rows = await conn.fetch("SELECT seq, hash FROM ledger WHERE seq = ANY($1::bigint[])", seqs) if seqs else []
        at = {row["seq"]: bytes(row["hash"]) for row in rows}
        lost = [cp for cp in held if continuity.judge(cp, head_seq, at.get(cp.seq), self.recoveries).rollback]
        gone = [seq for seq, entry_hash in known if at.get(seq) != entry_hash]
        if lost or gone:
            log.warning("checkpoint_not_signed", head_seq=head_seq, held_lost=[cp.seq for cp in lost],
                        entries_gone=gone)
            return False
        return True

    def published(self, cp: Checkpoint) -> None:
        """A new checkpoint was signed: push it to every witness, off the caller's path
        (never while a rollback is known)."""
        if not self.witnesses or self.rollback is not None:
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
            if self.rollback is not None:
                return
            await self.push(cp)
            with contextlib.suppress(*DOWN):
                await self.check()

    async def push(self, cp: Checkpoint) -> dict[str, str]:
        """Offers ``cp`` (with the latest recovery statement) to every witness the last check
        read; returns each one's answer (an admission, ``unreachable: …``, or ``not pushed:
        …`` for a witness that check could not read)."""
        recovery = self.recoveries[-1] if self.recoveries else None
        record = Record(self.deployment_id, self.public_key_pem, cp, recovery, self.signers.handovers)

        async def one(witness: Witness) -> str:
            state = self.states[witness.name]
            if state.up is not True:
                # What it holds was not read at the last check, so nothing compared it with
                # the ledger: a higher seq would replace it there unseen (a restore found
                # by no one). The check that reads it again judges it, then pushes.
                return f"not pushed: not read at the last check ({state.error or 'never read'})"
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
            except Exception as exc:  # noqa: BLE001 - the checks must go on, whatever one of them met
                # A check that cannot complete compared nothing (a ledger_head row deleted
                # by someone with database rights, a state no code path expects): no decision
                # is admitted until one completes again, and the next one runs as usual.
                self.checked = False
                log.error("continuity_check_crashed", error=type(exc).__name__)

    async def close(self) -> None:
        for task in (self._push, self._soon):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})
