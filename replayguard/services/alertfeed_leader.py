"""The alert feed leader's duties: checkpoints, the sinks' feed, the chain sweep, the state
check, retention, and alert lines in the service's log.

One instance at a time (the holder of a session advisory lock on its feed's LISTEN
connection, ``alertfeed.py``) is the *leader*: each time it leads (``LeaderDuties.lead``) it
signs a checkpoint when one is due, hands every alert change and every checkpoint to the
sinks (``alertfeed_sinks.py``), and purges what retention lets go. It also checks the state
tables against the ledger (``state_check.py``), bounded work per tick
(``core/state_schedule.py``): first every entry appended since its last look, then the next
slice of a sweep that goes from the newest entry down to the first and starts again, so a
state row altered long after its entry was written is found too. A disagreement raises a
critical ``ledger_tamper`` alert. So does a break the leader's chain sweep finds
(``core/chain_sweep.py``): the whole hash chain re-hashed, a bounded span per tick, entries
under checkpoints included, whether or not anyone asks for a verification.

The leader also writes each alert to the service's own log when it is raised or changes
kind or severity: critical ones as ``error`` lines, warnings as ``warning`` lines (kind,
VM, principal, alert id), so the journal alone shows an attack; a change read again after
the database went back is no new line. (An alert that changes while leadership moves
between instances may miss its line; the sinks and the API still have it.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import asyncpg
import structlog

from ..core.chain_sweep import ChainSweep
from ..core.checkpoints import Checkpoint
from ..core.ledger_check import Finding, Problem
from ..core.state_schedule import StateSchedule
from ..pg.connections import acquire
from ..runtime import Runtime
from .alertfeed_reads import Raised, raised
from .alertfeed_sinks import SinkFeed
from .ledger import LedgerService, NotVouched
from .retention import PURGE_BATCH, purge_expired
from .state_check import Disagreement

log = structlog.get_logger(__name__)

_RECENT = 4096  # findings alerted, and alerts logged, that the leader remembers
MARK_KEEP_S = 86_400  # the leader deletes the marks of feeds that wrote none for this long
ALERT_LOG_LEVELS = {"critical": "error", "warning": "warning"}  # severity: level of its log line

# The marks of feeds that wrote none for a day (stopped, or gone): a live feed writes its
# mark at least every ``alertfeed.MARK_REFRESH_S``.
_FORGET_MARKS = f"DELETE FROM alert_feed_marks WHERE marked < now() - interval '{MARK_KEEP_S} seconds'"  # noqa: S608 - a constant


class LeaderDuties:
    """What the leader does each time it leads (``lead``), and what it remembers between.
    ``again`` asks the feed for the next lead as soon as it reads next, or, given True, at
    once: a lead that left work behind."""

    def __init__(self, runtime: Runtime, ledger: LedgerService, sinks: SinkFeed,
                 again: Callable[[bool], None]) -> None:
        self._rt, self._ledger, self._sinks, self._again = runtime, ledger, sinks, again
        # (kind, severity) last logged per alert, by id and what raised it (``raised``): a
        # restore gives ids out again, to other alerts, and a change read again is no new line.
        self._logged: OrderedDict[tuple[int, Raised], tuple[str, str]] = OrderedDict()
        # State findings alerted by this leader: the sweep finds each again round after round.
        self._state_findings: OrderedDict[Finding, None] = OrderedDict()
        self._state = StateSchedule()  # which entries the state check looks at next
        self.state_ticks = 0  # state checks done while leader (tests wait on it)
        self._chain_sweep = ChainSweep()  # which entries the chain sweep re-hashes next
        # Chain findings alerted by the checkpointer or the chain sweep (``_alert_once``), and
        # apart, the forged checkpoints the sweep set aside: however many rows someone wrote,
        # they cannot push a break of the chain out of what the leader remembers alerting.
        self._chain_findings: OrderedDict[Finding, None] = OrderedDict()
        self._forged: OrderedDict[Finding, None] = OrderedDict()

    async def lead(self) -> None:
        """One round of the duties."""
        work = self._rt.metrics.background
        await self._checkpoint()
        if self._sinks.dispatcher is not None and self._sinks.started:
            with work.timed("sink_feed"):
                if await self._sinks.feed():
                    self._again(True)  # a backlog: feed the next page at once
        with work.timed("chain_sweep"):
            await self._sweep_chain()
        with work.timed("state_check"):
            await self._check_state()
        with work.timed("purge"):
            purged = await purge_expired(self._rt.pool, self._rt.now_us())
            async with acquire(self._rt.pool) as conn:
                await conn.execute(_FORGET_MARKS)
        if purged == PURGE_BATCH:
            self._again(False)  # more expired uses wait: purge the next batch at once

    async def _checkpoint(self) -> None:
        """Signs a checkpoint when one is due, and hands what came of it to the continuity guard."""
        settings = self._rt.settings
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
            with self._rt.metrics.background.timed("checkpoint"):
                result = await self._ledger.checkpoint_if_due(now_us, settings.checkpoint_every,
                                                              settings.checkpoint_interval_s * 1_000_000,
                                                              guard.vouches)
        if isinstance(result, Finding) and await self._alert_once(self._chain_findings, result):
            await guard.check()  # a cut-off tail is a rollback too: stop decisions now
        elif isinstance(result, NotVouched):
            await guard.check()  # what the guard would not vouch for: it finds and records it
        elif isinstance(result, Checkpoint):
            guard.exchange.published(result)

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

    def log_alert(self, record: asyncpg.Record) -> None:
        """One log line per alert raised, and per change of its kind or severity."""
        severity, kind, key = record["severity"], record["kind"], (record["id"], raised(record))
        if severity not in ALERT_LOG_LEVELS or self._logged.get(key) == (kind, severity):
            return
        self._logged[key] = (kind, severity)
        while len(self._logged) > _RECENT:
            self._logged.popitem(last=False)
        getattr(log, ALERT_LOG_LEVELS[severity])(
            "alert", alert_id=str(record["id"]), kind=kind, severity=severity, vm_id=record["vm_id"],
            principal=record["principal"], count=record["count"], status=record["status"],
            summary=record["summary"])
