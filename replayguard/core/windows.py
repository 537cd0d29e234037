"""Rollback windows: which first uses a revert, restore or clone put back in play.

A VM whose state goes back to time T, noticed at time R, has forgotten every credential it
first saw in [T, R]: a replay of one of those would pass any verifier inside the VM, so the
ledger names such a replay ``replay_after_rollback`` rather than ``reused``. This module is
the rule, written once; the SQL predicate ``rg_at_risk`` mirrors ``Window.covers``.

Choices, each a row of tests/unit/test_windows.py:

- Both ends are inclusive: a use at exactly T may or may not be in the snapshot, so it
  counts; a use at exactly R happened before the report, so it counts.
- T comes from the event, else from the latest ``snapshot.created`` of that snapshot at
  or before R, else it is unknown (``None``): then every earlier use counts.
- R is when the rollback happened (``occurred_at``), not when its report arrived: a late
  event must not put the fresh logins made after the revert at risk. A report that claims
  to come from the future is clamped to its arrival.
- A T later than R contradicts itself (clocks disagree); it is treated as unknown.
- A clone carries its source's state, so its window is on the source; a revert of a clone
  to a state older than the clone also puts the ancestors' uses since then at risk, and so
  does a window the clone already had when the event naming its source arrives late.

Pure: no I/O, no clock; times are integers of microseconds since the Unix epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .events import EventType, GenericEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(moment: datetime) -> int:
    """An aware datetime as exact integer microseconds (no float rounding)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True, slots=True)
class Window:
    """Uses on ``vm_id`` first seen in [start_us, end_us] are at risk; start None: since ever."""

    vm_id: str
    start_us: int | None
    end_us: int
    cause: str

    def covers(self, vm_id: str, ts_us: int) -> bool:
        return vm_id == self.vm_id and ts_us <= self.end_us and (
            self.start_us is None or self.start_us <= ts_us)

    def contains(self, other: Window) -> bool:
        """Every use ``other`` puts at risk, this one does too."""
        return other.vm_id == self.vm_id and other.end_us <= self.end_us and (
            self.start_us is None or (other.start_us is not None and self.start_us <= other.start_us))


@dataclass(frozen=True, slots=True)
class Ancestor:
    """A VM the rolled-back VM descends from, and when its line split off (clone state time)."""

    vm_id: str
    split_us: int


@dataclass(frozen=True, slots=True)
class EventContext:
    """What the ledger already knows when an event arrives."""

    received_us: int
    snapshot_times_us: tuple[int, ...] = ()
    ancestors: tuple[Ancestor, ...] = ()


@dataclass(frozen=True, slots=True)
class Use:
    """A credential's first use: where and when (a row of ``uses``)."""

    seq: int
    vm_id: str
    ts_us: int


def rolled_back_vm(event: GenericEvent) -> str | None:
    """The VM whose past a rollback event puts back in play (the source, for a clone)."""
    if not event.type.rolls_back:
        return None
    if event.type is EventType.VM_CLONED:
        return event.source_vm_id
    return event.vm_id


def report_time(event: GenericEvent, received_us: int) -> int:
    """R: when the rollback happened, never later than when we heard of it."""
    if event.occurred_at is None:
        return received_us
    return min(to_us(event.occurred_at), received_us)


def state_time(event: GenericEvent, snapshot_times_us: Sequence[int], end_us: int) -> int | None:
    """T: the time of the state put back, or None when nothing trustworthy says."""
    start: int | None
    if event.snapshot_created_at is not None:
        start = to_us(event.snapshot_created_at)
    else:
        earlier = [t for t in snapshot_times_us if t <= end_us]
        start = max(earlier) if earlier else None
    return None if start is None or start > end_us else start


def clone_split(event: GenericEvent, ctx: EventContext) -> int:
    """When a clone's line split from its source: its state time, else the clone itself."""
    end = report_time(event, ctx.received_us)
    start = state_time(event, ctx.snapshot_times_us, end)
    return end if start is None else start


def windows_for(event: GenericEvent, ctx: EventContext) -> tuple[Window, ...]:
    """Every window one event opens: on the rolled-back VM, then on its ancestors."""
    vm_id = rolled_back_vm(event)
    if vm_id is None:
        return ()
    end = report_time(event, ctx.received_us)
    start = state_time(event, ctx.snapshot_times_us, end)
    cause = event.type.value
    found = [Window(vm_id, start, end, cause)]
    for ancestor in ctx.ancestors:
        if start is None or start <= ancestor.split_us:
            found.append(Window(ancestor.vm_id, start, min(ancestor.split_us, end), cause + ":lineage"))
    return tuple(found)


def _lineage(cause: str) -> str:
    return cause if cause.endswith(":lineage") else cause + ":lineage"


def carried_to_source(event: GenericEvent, ctx: EventContext, clone_windows: Sequence[Window]) -> tuple[Window, ...]:
    """The windows a clone already had when the event naming its source arrives (events come
    late and out of order): each that reaches back to the clone's split or before puts the
    source's uses since its start at risk, up to the split, and its ancestors' as a revert
    of the clone would (``windows_for``). Empty for any other event."""
    source = rolled_back_vm(event) if event.type is EventType.VM_CLONED else None
    if source is None:
        return ()
    split = clone_split(event, ctx)
    found: list[Window] = []
    for window in clone_windows:
        if window.start_us is not None and window.start_us > split:
            continue
        end = min(split, window.end_us)
        found.append(Window(source, window.start_us, end, _lineage(window.cause)))
        for ancestor in ctx.ancestors:
            if window.start_us is None or window.start_us <= ancestor.split_us:
                found.append(Window(ancestor.vm_id, window.start_us, min(ancestor.split_us, end),
                                    _lineage(window.cause)))
    return tuple(found)


def not_contained(candidates: Iterable[Window], present: Iterable[Window]) -> tuple[Window, ...]:
    """The candidates that neither a present window nor an earlier candidate contains. A
    clone's windows carried to its source come back to the clone with the next clone event
    of a cycle (A a clone of B, then B of A: names reused, or a relay's mistake); keeping
    only what adds a use at risk stops them multiplying with every event."""
    kept: list[Window] = []
    seen = list(present)
    for window in candidates:
        if not any(other.contains(window) for other in seen):
            kept.append(window)
            seen.append(window)
    return tuple(kept)


def at_risk(uses: Iterable[Use], windows: Sequence[Window]) -> list[Use]:
    """The uses some window covers, each once, in ledger order (overlaps do not repeat)."""
    return sorted((u for u in uses if any(w.covers(u.vm_id, u.ts_us) for w in windows)),
                  key=lambda u: u.seq)
