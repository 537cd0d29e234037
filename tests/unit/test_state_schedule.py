"""The leader's state-check schedule (core/state_schedule.py): every new entry checked
once and promptly at any rate it can keep up with, a sweep that covers the whole ledger
newest first, a new leader that starts at the head, and spans that count only once
checked."""

from __future__ import annotations

import pytest

from replayguard.core.state_schedule import Span, StateSchedule


def tick(schedule: StateSchedule, head: int) -> tuple[list[Span], list[Span]]:
    """One tick whose checks all return: its new-entry spans and its sweep spans."""
    spans = schedule.plan(head)
    for span in spans:
        schedule.done(span)
    return [s for s in spans if not s.sweep], [s for s in spans if s.sweep]


def seqs(spans: list[Span]) -> list[int]:
    return [seq for span in spans for seq in range(span.after + 1, span.upto + 1)]


@pytest.mark.parametrize("rate", [0, 1, 999, 5_000, 5_001, 12_345, 19_999, 20_000])
def test_every_new_entry_is_checked_once_in_the_tick_after_it_at_any_rate_up_to_the_capacity(rate: int) -> None:
    """Below slice x slices_per_tick entries a tick, each tick checks exactly the entries
    appended since the last one, each once."""
    schedule = StateSchedule(new=1_000, sweep=1_000)
    head, checked = 1_000, []
    for _ in range(6):
        start, head = head, head + rate
        new, _ = tick(schedule, head)
        assert seqs(new) == list(range(start + 1, head + 1))
        checked += seqs(new)
        assert schedule.new == head
    assert checked == list(range(1_001, head + 1))


def test_a_burst_beyond_the_capacity_is_caught_up_once_the_rate_falls() -> None:
    """30,000 entries a tick for three ticks falls behind by 10,000 a tick; quiet ticks then
    check the rest, each entry once, oldest first."""
    schedule = StateSchedule(new=0, sweep=0)
    head, checked = 0, []
    for burst in (30_000, 30_000, 30_000, 0, 0, 0):
        head += burst
        checked += seqs(tick(schedule, head)[0])
    assert schedule.new == head == 90_000
    assert checked == list(range(1, 90_001))


def test_the_sweep_covers_the_ledger_newest_first_then_starts_again() -> None:
    """With no new entries the sweep goes down from the newest checked entry to the first
    in sweep_size steps, then again from the top."""
    schedule = StateSchedule(sweep_size=4_000)
    swept = [tick(schedule, 10_000)[1] for _ in range(4)]
    assert swept == [[Span(6_000, 10_000, True)], [Span(2_000, 6_000, True)], [Span(0, 2_000, True)],
                     [Span(6_000, 10_000, True)]]


def test_a_new_leader_starts_at_the_head_and_sweeps_the_newest_entries_first() -> None:
    """The first tick has no new-entry span; its sweep covers the entries just below the
    head (those a previous leader may not have reached)."""
    assert StateSchedule().plan(12_000) == [Span(7_000, 12_000, True)]
    assert StateSchedule().plan(0) == []


def test_the_sweep_restarts_from_the_newest_entry_checked() -> None:
    """Once the sweep reaches the first entry it restarts from the top, which includes the
    entries checked as new meanwhile."""
    schedule = StateSchedule()
    assert tick(schedule, 3_000) == ([], [Span(0, 3_000, True)])
    assert tick(schedule, 4_000) == ([Span(3_000, 4_000)], [Span(0, 4_000, True)])


def test_a_shorter_ledger_starts_both_cursors_again_at_its_head() -> None:
    """A ledger cut back (the continuity guard's finding) is swept from its new head."""
    schedule = StateSchedule()
    tick(schedule, 50_000)
    tick(schedule, 60_000)
    assert schedule.plan(20_000) == [Span(15_000, 20_000, True)]
    assert schedule.new == 20_000


def test_a_span_whose_check_failed_is_planned_again() -> None:
    """A check that raised (the database away) leaves its span, and those after it, for
    the next tick."""
    schedule = StateSchedule(new=0, sweep=0)
    first = schedule.plan(12_000)
    schedule.done(first[0])  # the second check raised: nothing more is done this tick
    assert schedule.plan(12_000)[:2] == [Span(5_000, 10_000), Span(10_000, 12_000)]


def test_a_finding_does_not_hold_the_cursor_on_its_span() -> None:
    """The tick stops at a finding, but its span is done: the next tick starts after it."""
    schedule = StateSchedule(new=0, sweep=0)
    found_in = schedule.plan(12_000)[0]
    schedule.done(found_in)
    assert schedule.plan(12_000)[0] == Span(5_000, 10_000)


def test_the_first_entry_is_swept_like_any_other() -> None:
    """A sweep that has come down to entry 1 checks it (Span(0, 1)) before starting again,
    and a ledger of one entry is swept too."""
    schedule = StateSchedule(new=10, sweep=1, sweep_size=4)
    assert schedule.plan(10) == [Span(0, 1, True)]
    schedule.done(Span(0, 1, True))
    assert schedule.plan(10) == [Span(6, 10, True)]  # then again from the newest entry checked
    assert StateSchedule().plan(1) == [Span(0, 1, True)]


def test_spans_done_out_of_order_never_move_the_new_cursor_back() -> None:
    """The new-entry cursor only moves forward, whichever of a tick's spans returns first."""
    schedule = StateSchedule(new=0, sweep=0, slice=10)
    first, second = schedule.plan(20)[:2]
    schedule.done(second)
    schedule.done(first)
    assert schedule.new == 20
