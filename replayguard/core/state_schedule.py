"""Which ledger entries the alert-feed leader's state check looks at in one tick.

Pure: positions in, ranges out. Two cursors over ``seq``:

- **new entries**: every entry appended since the last tick is checked once, soon after
  its decision, in slices of ``slice`` entries, up to ``slices_per_tick`` slices a tick.
  The check keeps up with any rate below ``slice * slices_per_tick`` entries a second
  and catches up after a burst faster than that;
- **the sweep**: ``sweep_size`` entries a tick, newest first, down to the first entry,
  then again from the newest entry checked; it finds state edited after an entry's first
  check, within one sweep (the ledger's length / ``sweep_size`` ticks).

A new leader starts both cursors at the head: the entries before it are the sweep's,
newest first, so those a previous leader may not have reached come first. A ledger
shorter than the cursors (the continuity guard's finding) starts them again at its head.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

SLICE = 5_000  # entries per query (replayguard/services/state_check.py)
SLICES_PER_TICK = 4  # new entries: keeps up with 20,000 decisions a second
SWEEP_SIZE = 5_000  # the sweep's entries per tick


@dataclass
class StateSchedule:
    slice: int = SLICE
    slices_per_tick: int = SLICES_PER_TICK
    sweep_size: int = SWEEP_SIZE
    new: int | None = None  # entries up to here were checked once (None: no tick yet)
    sweep: int = 0  # the sweep goes on below this; 0: it starts again from ``new``

    def tick(self, head: int) -> Iterator[tuple[int, int]]:
        """The ranges ``(after, upto]`` to check now, in order. A range counts as checked
        once yielded: stop asking after a finding, and the next tick goes on after it."""
        if self.new is None or head < self.new:
            self.new = self.sweep = head
        for _ in range(self.slices_per_tick):
            if self.new >= head:
                break
            after, self.new = self.new, min(head, self.new + self.slice)
            yield after, self.new
        if self.sweep <= 0:
            self.sweep = self.new
        if self.sweep > 0:
            upto, self.sweep = self.sweep, max(0, self.sweep - self.sweep_size)
            yield self.sweep, upto
