"""The leader's chain sweep (core/chain_sweep.py): the whole chain, first entry to head,
in spans of a bounded size, round after round; spans that count only once checked; a
ledger that grew or shrank in between."""

from __future__ import annotations

from replayguard.core.chain_sweep import ChainSweep
from replayguard.core.state_schedule import Span


def sweep_round(sweep: ChainSweep, head: int) -> list[Span]:
    """The spans of ticks whose checks all return, until a round ends."""
    spans, rounds = [], sweep.rounds
    while sweep.rounds == rounds:
        span = sweep.plan(head)
        assert span is not None
        spans.append(span)
        sweep.done(span, head)
    return spans


def test_each_round_covers_every_entry_once_in_bounded_spans() -> None:
    """A round covers entries 1..head once, in adjacent spans of at most ``size`` entries,
    and the next round starts again from the first entry."""
    sweep = ChainSweep(size=4)
    for _ in range(2):
        spans = sweep_round(sweep, 10)
        assert spans == [Span(0, 4, True), Span(4, 8, True), Span(8, 10, True)]


def test_entries_appended_during_a_round_are_swept_in_it() -> None:
    """The head read at each tick bounds its span: a round reaches the entries appended
    while it went on."""
    sweep = ChainSweep(size=4)
    first = sweep.plan(6)
    assert first == Span(0, 4, True)
    sweep.done(first, 6)
    assert sweep.rounds == 0 and sweep.plan(11) == Span(4, 8, True)


def test_a_span_whose_check_failed_is_planned_again() -> None:
    """A check that did not return (the database away) is not done: the next tick plans it again."""
    sweep = ChainSweep(size=4)
    sweep.done(sweep.plan(10) or Span(0, 0), 10)
    assert sweep.plan(10) == Span(4, 8, True)
    assert sweep.plan(10) == Span(4, 8, True)


def test_a_shorter_ledger_and_an_empty_one() -> None:
    """A ledger now shorter than the sweep's position starts the round again from the first
    entry; an empty ledger has nothing to sweep."""
    sweep = ChainSweep(size=4, at=8)
    assert sweep.plan(5) == Span(0, 4, True)
    assert ChainSweep().plan(0) is None
