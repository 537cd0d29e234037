"""When a checkpoint is due (services/ledger.py ``_due``): by entries, by the wall clock,
by the monotonic time the leader has seen the newest checkpoint, and at once when the wall
clock stepped back behind it."""

from __future__ import annotations

from typing import Any

from replayguard.services.ledger import _due

S = 1_000_000  # one second in µs


def last(seq: int, ts_us: int) -> Any:
    return {"seq": seq, "ts_us": ts_us}


def test_nothing_is_due_without_new_entries_whatever_the_clocks_say() -> None:
    """No entry past the newest checkpoint: nothing to sign, even with a clock stepped back."""
    assert not _due(10, last(10, 100 * S), 1 * S, 5, 60 * S, 3600 * S)


def test_a_checkpoint_is_due_by_entries_or_by_the_wall_clock() -> None:
    """``every`` entries, or the interval by the checkpoint's stamp, make one due."""
    assert _due(15, last(10, 100 * S), 101 * S, 5, 60 * S, 0)
    assert _due(11, last(10, 100 * S), 160 * S, 5, 60 * S, 0)
    assert not _due(11, last(10, 100 * S), 159 * S, 5, 60 * S, 0)


def test_a_wall_clock_stepped_back_behind_the_newest_checkpoint_makes_one_due_at_once() -> None:
    """A stamp in the future measures nothing: the next entry is signed at once."""
    assert _due(11, last(10, 100 * S), 100 * S - 3600 * S, 1000, 60 * S, 0)


def test_the_interval_is_also_measured_on_the_monotonic_clock() -> None:
    """A wall clock that stands still relative to the stamp (the leader stamping every
    checkpoint ``recovered + 1`` after a recovery stamped ahead) still gets one per interval."""
    assert not _due(11, last(10, 100 * S), 100 * S, 1000, 60 * S, 59 * S)
    assert _due(11, last(10, 100 * S), 100 * S, 1000, 60 * S, 60 * S)


def test_the_first_checkpoint_is_due_once_there_is_an_entry() -> None:
    """No checkpoint yet: due as soon as the ledger holds an entry."""
    assert not _due(0, None, 1 * S, 5, 60 * S, 0)
    assert _due(1, None, 1 * S, 5, 60 * S, 0)
