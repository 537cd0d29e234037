"""Tamper evidence: verify the whole ledger, sign checkpoints, export the public key.

``verify`` streams the ledger in ``seq`` order in keyset batches (constant memory, no
OFFSET), recomputes every hash with ``core/chain.py`` and compares the end with
``ledger_head`` and every row with the checkpoints of the service's key, read beside the
rows (a signature is verified where a checkpoint disagrees: ``core/ledger_check.py``),
then checks that the state tables hold what the entries imply (``state_check.py``).
``check_chain_span`` re-hashes one span of the chain for the alert-feed leader's sweep
(``core/chain_sweep.py``). ``checkpoint_if_due`` first re-verifies the entries since the
previous checkpoint, so a checkpoint never vouches for a chain that was already altered,
and asks the continuity guard (``vouch``) whether the chain is still the one the
witnesses saw: nothing is signed while the ledger went back in time. Used by the HTTP
API, the CLI and the background feed; in a serving worker the re-hashing runs in a child
process (``chain_reader.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import structlog

from ..core import checkpoints as cps
from ..core.chain import GENESIS
from ..core.checkpoints import Checkpoint
from ..core.handover import Signers
from ..core.ledger_check import Finding, Problem, forged_checkpoints, past_head
from ..pg.connections import UNAVAILABLE_ERRORS, acquire
from .chain_reader import (
    PINS_PER_STRETCH,
    ChainProcess,
    ChainResult,
    ChildFailed,
    Pins,
    Progress,
    RetiredPin,
    check_here,
)
from .decide import clock_guard_scope
from .state_check import STATE_BATCH, Disagreement, check_state_range

if TYPE_CHECKING:
    from .continuity_rollback import Rollback
from ..keys import Keys

log = structlog.get_logger(__name__)

CHECKPOINT_LOCK = 0x72676370  # "rgcp": one checkpoint writer at a time, across instances
# Checkpoint rows naming our key whose signature did not hold, remembered by their whole
# content: the checkpointer and the sinks' feed read the same rows tick after tick.
FORGED_REMEMBERED = 1024

# Asked, under the checkpoint lock, whether the head just read (its seq) may be signed.
Vouch = Callable[[asyncpg.Connection, int], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class NotVouched:
    """A checkpoint was due, but the continuity guard did not vouch for the chain."""

    head_seq: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    checked: int
    head_seq: int
    head_hash: bytes
    finding: Finding | None
    checkpoints: int
    state: Disagreement | None = None
    state_checked: int = 0

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"ok": self.ok, "checked": self.checked,
                                   "head": {"seq": self.head_seq, "hash": self.head_hash.hex()},
                                   "checkpoints_checked": self.checkpoints,
                                   "state": {"ok": self.state is None, "checked": self.state_checked}}
        if self.state is not None:
            body["state"] = {"ok": False, "checked": self.state_checked,
                             "first_disagreement": self.state.to_json()}
        if self.finding is not None:
            body.update(first_bad_seq=self.finding.seq, problem=self.finding.problem.value,
                        message=self.finding.message)
        return body


class LedgerService:
    def __init__(self, pool: asyncpg.Pool, keys: Keys, retention_s: int | None = None,
                 chain: ChainProcess | None = None, *, serving: bool = False, signers: Signers | None = None) -> None:
        """``retention_s`` (``nonce_max_ttl_s``): how long an OTP's use is kept; with it,
        verification also checks the state tables against the accepted entries. ``chain``:
        the child process that checks chains (``chain_reader.py``); what it cannot check
        is checked on this event loop, in short stretches when ``serving`` (decisions
        share the loop), else in full-size batches (the CLI). ``signers``: the signing
        keys the ledger's handovers name (``signing_rotation.load_signers``): checkpoints
        of each pin the chain in its own span; without it, this process's key alone."""
        self._pool = pool
        self._chain = chain
        self._serving = serving
        self._retention_us = None if retention_s is None else retention_s * 1_000_000
        self._key = keys.signing_key()
        self.public_key = self._key.public_key()
        self.key_id = cps.key_id(self.public_key)
        self._retired = () if signers is None else signers.retired
        self._pins = Pins(self.key_id, self.public_key,
                          tuple(RetiredPin(s.key_id, s.public, s.last_seq or 0) for s in self._retired))
        self.clock_scope = clock_guard_scope(keys.pepper)
        # The newest checkpoint of ours, and when (monotonic) this process first saw it:
        # the checkpoint period is measured so too, whatever the wall clock does.
        self._newest_cp: tuple[int, float] | None = None
        self._forged: OrderedDict[Checkpoint, None] = OrderedDict()

    def public_key_json(self) -> dict[str, str]:
        return {"algorithm": cps.ALGORITHM, "key_id": self.key_id,
                "public_key_pem": cps.public_key_pem(self.public_key)}

    async def verify(self, progress: Progress | None = None, rollback: Rollback | None = None,
                     now_us: int | None = None, state_progress: Progress | None = None) -> VerifyReport:
        """Checks the whole chain, then the state tables against it (when ``now_us`` is
        given); reads the head first, so concurrent appends are ignored. ``rollback`` is
        the continuity guard's finding (a witness holds what the ledger lost)."""
        async with acquire(self._pool) as conn:
            # The head and the checkpoints past it from one snapshot: a checkpoint signed
            # meanwhile must not look like one past the head. Those up to the head are read
            # beside the rows; one signed later names the head or an entry after it.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
                beyond = await conn.fetch("SELECT * FROM checkpoints WHERE seq > $1 ORDER BY seq", head["seq"])
            # Their signatures after the transaction (about 90 µs each; forged rows may be many).
            signed_beyond = await self._signed_checkpoints(beyond)
            chain = await self._check_chain(conn, 0, GENESIS, head["seq"], bytes(head["hash"]), self._pins,
                                            progress, apart=True)
            state, state_checked = None, 0
            if now_us is not None:
                state, state_checked = await self._check_state(conn, head["seq"], now_us, state_progress)
        if chain.forged:
            log.error("checkpoint_signature_invalid", count=chain.forged, first_seq=chain.first_forged)
        finding = chain.finding or await self.retired_past_span()
        if finding is None and signed_beyond:
            finding = past_head(signed_beyond[-1].seq, head["seq"])
        if finding is None and rollback is not None:
            finding = Finding(rollback.first_bad_seq, Problem.LEDGER_ROLLBACK, rollback.message())
        if finding is None and state is not None:
            finding = state.finding()
        return VerifyReport(finding is None, chain.checked, head["seq"], bytes(head["hash"]), finding,
                            chain.pinned, state, state_checked)

    async def _check_state(self, conn: asyncpg.Connection, upto: int, now_us: int,
                           progress: Progress | None) -> tuple[Disagreement | None, int]:
        """The first entry up to ``upto`` whose implied state is absent, and how many were read."""
        done = 0
        while done < upto:
            end = min(upto, done + STATE_BATCH)
            found = await check_state_range(conn, done, end, now_us, self.clock_scope)
            if found is not None:
                return found, found.seq
            done = end
            if progress is not None:
                progress(done, upto)
        return None, done

    async def check_state(self, after: int, upto: int, now_us: int) -> Disagreement | None:
        """``state_check.check_state_range`` on a pooled connection (the alert-feed leader's sweep)."""
        async with acquire(self._pool) as conn:
            found = await check_state_range(conn, after, upto, now_us, self.clock_scope)
        return found

    async def check_chain_span(self, after: int, upto: int) -> Finding | None:
        """Re-hashes the entries ``after < seq <= upto`` (the alert-feed leader's chain sweep,
        ``core/chain_sweep.py``), against the checkpoints among them: from the stored hash of
        entry ``after`` to that of entry ``upto``, or to ``ledger_head`` when ``upto`` is the
        head. Spans that meet at an entry check it from both sides: the one that ends there
        recomputes its hash, the next one checks that its successor follows it. Returns the
        chain's finding, or, in a span without one, the checkpoints it set aside as forged
        (``forged_checkpoint``)."""
        async with acquire(self._pool) as conn:
            head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
            upto = min(upto, head["seq"])
            if upto <= after:
                return None
            ends = {r["seq"]: bytes(r["hash"])
                    for r in await conn.fetch("SELECT seq, hash FROM ledger WHERE seq = ANY($1::bigint[])",
                                              [after, upto])}
            ends[0], ends[head["seq"]] = GENESIS, bytes(head["hash"])
            for seq in (after, upto):
                if seq not in ends:
                    return Finding(seq, Problem.MISSING, f"entry {seq} is missing")
            chain = await self._check_chain(conn, after, ends[after], upto, ends[upto], self._pins)
        return (chain.finding or await self.retired_past_span()
                or forged_checkpoints(chain.forged, chain.first_forged))

    async def retired_past_span(self) -> Finding | None:
        """A checkpoint signed by a retired signing key, genuinely, for an entry after its
        handover: the retired key signed after it was handed over, so whoever holds it
        (it may have leaked) can sign what the witnesses would take for this ledger's.
        A row that only names the key without its signature is the chain check's
        (``forged_checkpoint`` where it disagrees)."""
        if not self._retired:
            return None
        async with acquire(self._pool) as conn:
            for signer in self._retired:
                rows = await conn.fetch("SELECT * FROM checkpoints WHERE key_id = $1 AND seq > $2 ORDER BY seq"
                                        " LIMIT $3", signer.key_id, signer.last_seq, PINS_PER_STRETCH)
                for row in rows:
                    cp = cps.from_row(row)
                    if cps.verify(signer.public, cp):
                        log.error("retired_key_checkpoint", seq=cp.seq, key_id=cp.key_id)
                        return Finding(cp.seq, Problem.FORGED_CHECKPOINT,
                                       f"checkpoint {cp.seq} is signed by the retired signing key {cp.key_id}, which"
                                       f" handed over after entry {signer.last_seq}: that key signed after its"
                                       " rotation (it may have leaked)")
        return None

    async def head_seq(self) -> int:
        async with acquire(self._pool) as conn:
            seq: int = await conn.fetchval("SELECT seq FROM ledger_head")
        return seq

    async def _signed_checkpoints(self, records: list[asyncpg.Record]) -> list[Checkpoint]:
        """Checkpoints whose signature holds; a forged one is logged and not trusted. On a
        serving worker's loop, ``PINS_PER_STRETCH`` at a time: whoever can write to the
        database can add any number of rows, and verifying them in one go would hold
        decisions for as long."""
        good = []
        for n, record in enumerate(records, 1):
            cp = cps.from_row(record)
            if self.trusted(cp):
                good.append(cp)
            if self._serving and n % PINS_PER_STRETCH == 0:
                await asyncio.sleep(0)
        return good

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys that signed this ledger's checkpoints: ours and those it was
        handed over from."""
        return [self.key_id, *(signer.key_id for signer in self._retired)]

    def trusted(self, cp: Checkpoint) -> bool:
        """Signed by our key, or by a key we were handed over from for an entry of its span;
        one of another key (another data dir, a retired key past its handover) is skipped. A
        row naming our key whose signature does not hold is logged
        (``checkpoint_signature_invalid``, its entry) the first time this process reads it,
        and while it is remembered (``FORGED_REMEMBERED`` rows) neither logged nor verified
        again: the checkpointer reads the same rows every tick, and one row must not become
        an error line and a signature verification a second."""
        retired = next((s for s in self._retired if s.key_id == cp.key_id), None)
        if retired is not None:
            return retired.spans(cp.seq) and cps.verify(retired.public, cp)
        if cp.key_id != self.key_id or cp in self._forged:
            return False
        if not cps.verify(self.public_key, cp):
            self._forged[cp] = None
            while len(self._forged) > FORGED_REMEMBERED:
                self._forged.popitem(last=False)
            log.error("checkpoint_signature_invalid", seq=cp.seq)
            return False
        return True

    async def head(self) -> dict[str, object]:
        """The ledger's tip as the head row holds it (no verification: that is ``verify``)."""
        async with acquire(self._pool) as conn:
            record = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
        return {"seq": record["seq"], "hash": bytes(record["hash"]).hex()}

    async def list_checkpoints(self, before_seq: int | None, limit: int) -> list[dict[str, object]]:
        """Newest first, keyset on ``seq``."""
        async with acquire(self._pool) as conn:
            records = await conn.fetch(
                "SELECT * FROM checkpoints WHERE seq < coalesce($1::bigint, 9223372036854775807)"
                " ORDER BY seq DESC LIMIT $2",
                before_seq, limit)
        return [cps.to_json(cps.from_row(r)) for r in records]

    async def checkpoint_if_due(self, now_us: int, every: int, interval_us: int,
                                vouch: Vouch | None = None) -> Checkpoint | Finding | NotVouched | None:
        """Signs the head when ``every`` entries or ``interval_us`` passed since the last
        checkpoint (by ``now_us`` or by this process's monotonic clock; a wall clock
        stepped back behind the last checkpoint makes one due at once); returns the new
        checkpoint, a finding when the new entries do not verify, ``NotVouched`` when
        ``vouch`` (the continuity guard) refuses the chain (nothing is signed then), or
        None when none is due."""
        async with acquire(self._pool) as conn:
            # A session lock, not a transaction's: no transaction stays open (and idle, past
            # idle_in_transaction_session_timeout) while a child process checks a long chain.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", CHECKPOINT_LOCK):
                return None
            try:
                result = await self._checkpoint_locked(conn, now_us, every, interval_us, vouch)
            finally:
                with contextlib.suppress(*UNAVAILABLE_ERRORS):  # a lost session lost its lock too
                    await conn.execute("SELECT pg_advisory_unlock($1)", CHECKPOINT_LOCK)
        if isinstance(result, Checkpoint):
            log.info("checkpoint_signed", seq=result.seq)
        return result

    async def _checkpoint_locked(self, conn: asyncpg.Connection, now_us: int, every: int,
                                 interval_us: int, vouch: Vouch | None) -> Checkpoint | Finding | NotVouched | None:
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
        # Only checkpoints provably ours count: a row of another key, or one that does not
        # verify, past the head must not make the next checkpoint look not due (the
        # witnesses would stop moving), and one at or below it is no place to continue from.
        for row in await conn.fetch(_OURS_PAST_HEAD, self.key_id, head["seq"]):
            if self.trusted(cps.from_row(row)):
                return past_head(row["seq"], head["seq"])
        last = next((row for row in await conn.fetch(_OURS_UP_TO_HEAD, self.key_id, head["seq"])
                     if self.trusted(cps.from_row(row))), None)
        if not _due(head["seq"], last, now_us, every, interval_us, self._held_for_us(last)):
            return None
        # A row that is not ours (ours there would make none due) holds the head's place:
        # nothing can be signed until the next entry, so nothing is re-hashed for it either.
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM checkpoints WHERE seq = $1)", head["seq"]):
            return None
        if vouch is not None and not await vouch(conn, head["seq"]):
            return NotVouched(head["seq"])
        start_seq, start_hash = (last["seq"], bytes(last["hash"])) if last is not None else (0, GENESIS)
        # The state tables are the alert feed leader's to check (replayguard/services/state_check.py).
        chain = await self._check_chain(conn, start_seq, start_hash, head["seq"], bytes(head["hash"]))
        if chain.finding is not None:
            return chain.finding
        cp = cps.sign(self._key, head["seq"], bytes(head["hash"]), now_us)
        if await conn.fetchval("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING"
                               " RETURNING seq", cp.seq, cp.hash, cp.ts_us, cp.key_id, cp.signature) is None:
            # A row not ours holds this entry's place: the next entry's checkpoint takes another.
            log.error("checkpoint_seq_taken", seq=cp.seq)
            return None
        return cp

    def _held_for_us(self, last: asyncpg.Record | None) -> float:
        """How long (monotonic, µs) this process has seen ``last`` as the newest checkpoint."""
        if last is None:
            return 0.0
        if self._newest_cp is None or self._newest_cp[0] != last["seq"]:
            self._newest_cp = (last["seq"], time.monotonic())
        return (time.monotonic() - self._newest_cp[1]) * 1e6

    async def _check_chain(self, conn: asyncpg.Connection, start_seq: int, start_hash: bytes, head_seq: int,
                           head_hash: bytes, pins: Pins | None = None,
                           progress: Progress | None = None, *, apart: bool = False) -> ChainResult:
        """The chain from ``start_seq`` to the head (against the checkpoints up to it, with
        ``pins``), in a child process when there is one (``apart``: a child of its own, for
        a whole-ledger verification)."""
        if self._chain is not None:
            check = self._chain.check_apart if apart else self._chain.check
            try:
                return await check(start_seq, start_hash, head_seq, head_hash, pins)
            except ChildFailed as exc:
                log.warning("chain_check_in_process", error=str(exc))
        return await check_here(conn, start_seq, start_hash, head_seq, head_hash, pins,
                                serving=self._serving, progress=progress)

    def close(self) -> None:
        if self._chain is not None:
            self._chain.close()

    async def raise_tamper_alert(self, finding: Finding, now_us: int, state: Disagreement | None = None) -> int:
        """A critical ``ledger_tamper`` alert; repeats of one finding join one alert, and so
        do all forged checkpoints (one alert, whichever rows: each is a row that someone with
        the database's rights wrote, and a thousand of them are one intrusion, not a thousand
        alerts). A state disagreement adds its table and key digest to the details."""
        dedup = (f"ledger_tamper:{finding.problem.value}" if finding.problem is Problem.FORGED_CHECKPOINT
                 else f"ledger_tamper:{finding.problem.value}:{finding.seq}")
        async with acquire(self._pool) as conn:
            alert_id: int = await conn.fetchval(
                "SELECT rg_alert('ledger_tamper', 'critical', NULL, NULL, $1, $2, $3, $4, $5::jsonb)",
                dedup, now_us, finding.seq, finding.message,
                {"first_bad_seq": finding.seq, "problem": finding.problem.value,
                 **({"table": state.table, "key_digest": state.key_digest} if state is not None else {})})
        log.error("ledger_tamper", seq=finding.seq, problem=finding.problem.value)
        return alert_id


# The newest checkpoints named as ours past the head, and at or below it (a few: each is a
# signature to verify). The checkpointer continues from the newest of the latter that is
# ours; with none among them (forged rows on top of every one), from the first entry, once:
# the checkpoint it then signs at the head is the newest the next tick reads.
_OURS_PAST_HEAD = "SELECT * FROM checkpoints WHERE key_id = $1 AND seq > $2 ORDER BY seq DESC LIMIT 8"
_OURS_UP_TO_HEAD = "SELECT * FROM checkpoints WHERE key_id = $1 AND seq <= $2 ORDER BY seq DESC LIMIT 8"


def _due(head_seq: int, last: asyncpg.Record | None, now_us: int, every: int, interval_us: int,
         held_for_us: float) -> bool:
    """A checkpoint is due after ``every`` entries, or ``interval_us`` since the last one by
    the wall clock or by the monotonic time this process has seen it (``held_for_us``); a
    wall clock now behind the last checkpoint (stepped back) makes one due at once, since
    its stamp no longer measures anything."""
    if last is None:
        return head_seq > 0
    if head_seq <= last["seq"]:
        return False
    return bool(head_seq - last["seq"] >= every or now_us - last["ts_us"] >= interval_us
                or now_us < last["ts_us"] or held_for_us >= interval_us)

