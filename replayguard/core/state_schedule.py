"""Which ledger entries the alert-feed leader's state check looks at in one tick.

Pure: positions in, ranges out. Two cursors over ``seq``:

- **new entries**: every entry appended since the last tick is checked once, soon after
  its decision, in slices of ``slice`` entries, up to ``slices_per_tick`` slices a tick.
  The check keeps up with any rate below ``slice * slices_per_tick`` entries a second
  and catches up after a burst faster than that;
- **the sweep**: ``sweep_size`` entries a tick, newest first, down to the first entry,
  then again from the newest entry checked; it finds state edited after an entry's first
  check, within one sweep (the ledger's length / ``sweep_size`` ticks).

A span counts as checked once its check returned, with or without a finding (``done``):
a check that failed (the database away) is planned again, and a finding does not hold
the cursors on the span that has it.

A new leader starts both cursors at the head: the entries before it are the sweep's,
newest first, so those a previous leader may not have reached come first. A ledger
shorter than the cursors (the continuity guard's finding) starts them again at its head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

SLICE = 5_000  # entries per query (replayguard/services/state_check.py)
SLICES_PER_TICK = 4  # new entries: keeps up with 20,000 decisions a second
SWEEP_SIZE = 5_000  # the sweep's entries per tick


class Span(NamedTuple):
    """Entries ``after < seq <= upto``, for the new-entry cursor or the sweep."""

    after: int
    upto: int
    sweep: bool = False


@dataclass
class StateSchedule:
    slice: int = SLICE
    slices_per_tick: int = SLICES_PER_TICK
    sweep_size: int = SWEEP_SIZE
    new: int | None = None  # entries up to here were checked once (None: no tick yet)
    sweep: int = 0  # the sweep goes on below this; 0: it starts again from ``new``

    def plan(self, head: int) -> list[Span]:
        """The spans to check now, in order: new entries first, then the sweep's."""
        if self.new is None or head < self.new:
            self.new = self.sweep = head
        spans, at = [], self.new
        for _ in range(self.slices_per_tick):
            if at >= head:
                break
            spans.append(Span(at, min(head, at + self.slice)))
            at = spans[-1].upto
        top = self.sweep if self.sweep > 0 else at
        if top > 0:
            spans.append(Span(max(0, top - self.sweep_size), top, sweep=True))
        return spans

    def done(self, span: Span) -> None:
        """``span`` was checked (with or without a finding); one that failed is not done,
        and the next plan offers it again."""
        if span.sweep:
            self.sweep = span.after
        else:
            self.new = max(self.new or 0, span.upto)
