"""The leader's state-check schedule (core/state_schedule.py): every new entry checked
once and promptly at any rate it can keep up with, a sweep that covers the whole ledger
newest first, and a new leader that starts at the head."""

from __future__ import annotations

import pytest

from replayguard.core.state_schedule import StateSchedule


def ranges(schedule: StateSchedule, head: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """One whole tick, split into its new-entry ranges (they come first, one per slice
    ``new`` moved) and the sweep's."""
    before = head if schedule.new is None or head < schedule.new else schedule.new
    got = list(schedule.tick(head))
    assert schedule.new is not None
    count = -(-(schedule.new - before) // schedule.slice)
    return got[:count], got[count:]


def seqs(spans: list[tuple[int, int]]) -> list[int]:
    return [seq for after, upto in spans for seq in range(after + 1, upto + 1)]


@pytest.mark.parametrize("rate", [0, 1, 999, 5_000, 5_001, 12_345, 19_999, 20_000])
def test_every_new_entry_is_checked_once_in_the_tick_after_it_at_any_rate_up_to_the_capacity(rate: int) -> None:
    """Below slice x slices_per_tick entries a tick, each tick checks exactly the entries
    appended since the last one, each once."""
    schedule = StateSchedule()
    head = 1_000
    schedule.new = schedule.sweep = head
    checked: list[int] = []
    for _ in range(6):
        start = head
        head += rate
        new, _sweep = ranges(schedule, head)
        assert seqs(new) == list(range(start + 1, head + 1))
        checked += seqs(new)
        assert schedule.new == head
    assert checked == list(range(1_001, head + 1))


def test_a_burst_beyond_the_capacity_is_caught_up_once_the_rate_falls() -> None:
    """30,000 entries a tick for three ticks falls behind by 10,000 a tick; quiet ticks then
    check the rest, each entry once, oldest first."""
    schedule = StateSchedule()
    schedule.new = schedule.sweep = 0
    head, checked = 0, []
    for burst in (30_000, 30_000, 30_000, 0, 0, 0):
        head += burst
        new, _ = ranges(schedule, head)
        checked += seqs(new)
    assert schedule.new == head == 90_000
    assert checked == list(range(1, 90_001))


def test_the_sweep_covers_the_ledger_newest_first_then_starts_again() -> None:
    """With no new entries the sweep goes down from the newest checked entry to the first
    in sweep_size steps, then again from the top."""
    schedule = StateSchedule(sweep_size=4_000)
    swept = [list(schedule.tick(10_000))[-1] for _ in range(4)]
    assert swept == [(6_000, 10_000), (2_000, 6_000), (0, 2_000), (6_000, 10_000)]


def test_a_new_leader_starts_at_the_head_and_sweeps_the_newest_entries_first() -> None:
    """The first tick has no new-entry range; its sweep covers the entries just below the
    head (those a previous leader may not have reached)."""
    assert list(StateSchedule().tick(12_000)) == [(7_000, 12_000)]
    assert list(StateSchedule().tick(0)) == []


def test_new_entries_come_before_the_sweep_and_the_sweep_restarts_from_the_newest_checked() -> None:
    """Once the sweep reaches the first entry it restarts from ``new``, which includes the
    entries checked as new meanwhile."""
    schedule = StateSchedule(sweep_size=5_000)
    assert list(schedule.tick(3_000)) == [(0, 3_000)]
    assert list(schedule.tick(4_000)) == [(3_000, 4_000), (0, 4_000)]


def test_a_shorter_ledger_starts_both_cursors_again_at_its_head() -> None:
    """A ledger cut back (the continuity guard's finding) is swept from its new head."""
    schedule = StateSchedule()
    list(schedule.tick(50_000))
    list(schedule.tick(60_000))
    assert list(schedule.tick(20_000)) == [(15_000, 20_000)]
    assert schedule.new == 20_000


def test_stopping_at_a_finding_goes_on_after_the_range_that_held_it() -> None:
    """A range counts as checked once handed out: the tick stopped there, and the next tick
    starts after it."""
    schedule = StateSchedule()
    list(schedule.tick(0))
    ticking = schedule.tick(12_000)
    assert next(ticking) == (0, 5_000)  # a finding here: the caller stops asking
    assert list(schedule.tick(12_000))[:2] == [(5_000, 10_000), (10_000, 12_000)]
