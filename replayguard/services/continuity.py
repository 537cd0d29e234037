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
before one completed (``unavailable``). The instance that signs a checkpoint hands it to
``exchange.published``; nothing is signed while a rollback is known (``vouches``). The
guard composes its parts: its ``exchange`` reads the witnesses and pushes checkpoints to
them (``continuity_witnesses``), a ``ChainMemory`` holds what the process knows of the
chain by itself (``continuity_memory``), and ``SharedFindings`` and ``ContinuityAlerts``
write down what it finds (``continuity_reports``); the values they pass (``Rollback``,
``WitnessState``) are ``continuity_rollback``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import orjson
import structlog
from prometheus_client import CollectorRegistry, Gauge

from ..core import checkpoints as cps
from ..core import continuity
from ..core.checkpoints import Checkpoint
from ..core.continuity import Statement, Verdict
from ..core.handover import Signers
from ..errors import LedgerRollback, Unavailable
from ..keys import Keys
from ..metrics import BackgroundWork
from ..pg.connections import acquire
from ..settings import Settings
from .continuity_memory import ChainMemory
from .continuity_reports import ContinuityAlerts, SharedFindings
from .continuity_rollback import DATABASE, DOWN, SELF, Rollback, WitnessRequired, WitnessState
from .continuity_witnesses import WitnessExchange
from .witness import Record, Witness, WitnessUnreachable, build_witnesses

log = structlog.get_logger(__name__)

CHECK_S = 2.0
_SNAPSHOT = ("SELECT h.seq, h.hash, c.seq AS cp_seq, c.hash AS cp_hash, c.ts_us AS cp_ts, c.key_id AS cp_key,"
             " c.signature AS cp_sig FROM ledger_head h"
             " LEFT JOIN LATERAL (SELECT * FROM checkpoints WHERE key_id = $1 ORDER BY seq DESC LIMIT 1) c ON true")
# Migration 044's index of rare entries: no scan of the ledger.
_RECOVERIES = ("SELECT (payload->'statement')::text AS st FROM ledger WHERE kind = 'ledger_recovery'"
               " ORDER BY seq")

# Streaming standbys that acknowledge commits (PostgreSQL's synchronous replication): with
# none, a failover can lose acknowledged decisions (docs/operations.md).
_SYNC_STANDBYS = "SELECT count(*) FILTER (WHERE sync_state IN ('sync', 'quorum')) FROM pg_stat_replication"


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
        self._required = settings.witness_required
        self.background = BackgroundWork()  # the runtime hands in its metrics' own
        token = settings.witness_token.reveal() if settings.witness_token is not None else None
        self.witnesses: list[Witness] = build_witnesses(settings.witnesses, self.deployment_id, token)
        self.states = {w.name: WitnessState() for w in self.witnesses}
        self._db_verdict: tuple[Checkpoint, Verdict] | None = None
        self.rollback: Rollback | None = None
        self.recoveries: list[Statement] = []
        self.head_seq = 0
        self._memory = ChainMemory()
        self.checked = False  # a check completed: decisions may be admitted
        self._shared = SharedFindings(clock)
        self._raised: Rollback | None = None  # the rollback last alerted
        self._recoveries_known: set[bytes] | None = None  # statements read (signatures)
        self._soon: asyncio.Task[None] | None = None
        self.sync_standbys: int | None = None
        self._alerts = ContinuityAlerts(pool, clock, self._required, self.states, lambda: self.head_seq)
        self.exchange = WitnessExchange(
            self.witnesses, self.states, self.signers, self.public, stopped=lambda: self.rollback is not None,
            latest_recovery=lambda: self.recoveries[-1] if self.recoveries else None, check=self.check)
        self.public_key_pem = self.exchange.public_key_pem  # as the witnesses are sent it
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
        return self._memory.floor

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
            self._memory.seen = Rollback(SELF, floor, None, Verdict.BEHIND, seq - 1)
            self.rollback = self.rollback or self._memory.seen
            self._soon = asyncio.create_task(self._check_quietly(), name="continuity-check")
            raise LedgerRollback(self._memory.seen.message())
        if self.rollback is not None:
            raise LedgerRollback(self.rollback.message())
        self._memory.floor = max(self._memory.floor, seq)

    def committed(self, seq: int, entry_hash: bytes) -> None:
        """The appender committed a batch whose last entry is ``seq`` (``ChainMemory.committed``)."""
        self._memory.committed(seq, entry_hash)

    def recorded(self, seq: int, entry_hash: bytes) -> None:
        """This process committed an entry outside the appender (``ChainMemory.recorded``)."""
        self._memory.recorded(seq, entry_hash)

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

    async def check(self) -> Rollback | None:
        """Compares the ledger with every witness and its own newest checkpoint (see module)."""
        async with self._lock:
            reads = await self.exchange.read_all()
            async with acquire(self._pool) as conn:
                # Known committed before the head is read: a healthy head is not below them.
                floor, own = self._memory.floor, self._memory.own
                snap = await conn.fetchrow(_SNAPSHOT, self.key_id)
                self.sync_standbys = await conn.fetchval(_SYNC_STANDBYS)
                self.recoveries = await self._recoveries(conn)
                self.on_recovered(self.recovered_at_us)
                self.head_seq = snap["seq"]
                fresh = self._fresh_recoveries()
                self._memory.track(self.head_seq, floor, own)
                await self._memory.verify(conn, own, self.head_seq)
                if fresh:
                    self._recovered(fresh)
                self._memory.head_seen = (snap["seq"], bytes(snap["hash"]))
                # The database's newest checkpoint; the last one read, judged again, when
                # none is there any more (rows deleted by someone with database rights).
                db_cp = self._db_checkpoint(snap)
                last_db = db_cp if db_cp is not None else self._db_verdict[0] if self._db_verdict else None
                if last_db is not None:
                    self._db_verdict = (last_db, await self._judge(conn, last_db))
                for witness, read in zip(self.witnesses, reads, strict=True):
                    await self._note(conn, witness.name, read)
                mine = max(self._findings(), key=lambda r: r.seq, default=None)
                await self._shared.share(conn, mine, self.head_seq, self._newest_recovery_seq)
            rollback = self._rollback()
            self.rollback = rollback
            self.checked = True
            changed, self._raised = rollback != self._raised, rollback
        if rollback is not None and changed:
            await self._alerts.rollback(rollback)
        await self._alerts.unreachable()
        if rollback is None and db_cp is not None:
            self.exchange.push_if_lagging(db_cp)
        return rollback

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
        seen = self._memory.seen
        if seen is not None and not any(st.abandoned_seq >= seen.seq for st in fresh):
            log.error("recovery_does_not_answer_finding", finding_seq=seen.seq,
                      abandoned_seq=[st.abandoned_seq for st in fresh], head_seq=self.head_seq)
            self._shared.written = None
            return
        self._shared.written = None
        self._memory.forget(self.head_seq)

    @property
    def _newest_recovery_seq(self) -> int:
        return max((st.recovery_seq for st in self.recoveries), default=0)

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
        if self._memory.seen is not None:
            found.append(self._memory.seen)
        return found

    def _rollback(self) -> Rollback | None:
        """The worst finding, this process's or any instance's: the furthest entry lost."""
        shared = self._shared.found
        found = self._findings() + ([shared] if shared is not None else [])
        return max(found, key=lambda r: r.seq, default=None)

    def held_checkpoints(self) -> list[tuple[str, Checkpoint, Verdict | None]]:
        """Every holder's checkpoint as last read (for the recovery's record)."""
        found: list[tuple[str, Checkpoint, Verdict | None]] = []
        if self._db_verdict is not None:
            found.append((DATABASE, *self._db_verdict))
        found += [(n, s.held, s.verdict) for n, s in self.states.items() if s.held is not None]
        shared = self._shared.found
        if shared is not None:  # what it names is given up, as a held checkpoint's entries are
            lost = Checkpoint(shared.seq, shared.hash or bytes(32), int(self._clock() * 1e6), self.key_id, b"")
            found.append((shared.source, lost, shared.verdict))
        return found

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
        known = self._memory.known(self._memory.own, head_seq)
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
        await self.exchange.close()
        if self._soon is not None and not self._soon.done():
            self._soon.cancel()
            await asyncio.wait({self._soon})
