"""Which stretch of the hash chain the alert-feed leader re-hashes in one tick.

Pure: positions in, ranges out. Before it signs a checkpoint the leader re-hashes the
entries since the previous one (``LedgerService.checkpoint_if_due``), and the continuity
guard compares a few stored hashes with what it knew; neither re-hashes the entries a
checkpoint already covers. An entry edited, deleted or moved there by someone with
database rights would be found only by a whole-ledger verification that someone asked for
and waited on (``GET /v1/ledger/verify`` stops when its client leaves). So the leader
also sweeps the whole chain: ``size`` entries a tick, from the first entry up to the head
read at that tick, then again from the first. A finding there raises the same critical
``ledger_tamper`` alert, whoever is looking, within one sweep of the edit (the ledger's
length / ``size`` ticks, a tick a second).

A span counts as swept once its check returned, with or without a finding (``done``): a
check that failed (the database away) is planned again, and a finding does not hold the
sweep on it. A new leader starts from the first entry; a ledger shorter than the sweep's
position (the continuity guard's finding) starts it again from the first entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from .state_schedule import Span

# Entries re-hashed a tick: about 2.5 ms of a child process's CPU at a lower priority
# (``chain_reader.py``: about 2.5 µs an entry), so a ledger of ten million entries is swept
# in under three hours. 10,000 a tick cost the service about 3 % of its decisions a second
# at c=64 on two cores (the hashing runs in the service's process tree).
SWEEP_SIZE = 1_000


@dataclass
class ChainSweep:
    size: int = SWEEP_SIZE
    at: int = 0  # the entries up to here were swept in this round
    rounds: int = 0  # rounds finished (up to the head read at their last span)

    def plan(self, head: int) -> Span | None:
        """The span to re-hash now, or None for an empty ledger."""
        if self.at >= head:
            self.at = 0
        if head == 0:
            return None
        return Span(self.at, min(head, self.at + self.size), sweep=True)

    def done(self, span: Span, head: int) -> None:
        """``span`` (planned at ``head``) was checked, with or without a finding."""
        self.at = span.upto
        if span.upto >= head:
            self.rounds += 1
