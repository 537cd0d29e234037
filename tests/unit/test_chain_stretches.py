"""How a serving loop's chain check cuts a batch of rows into stretches between turns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from replayguard.services.chain_reader import stretches


@given(n=st.integers(0, 120), rows=st.integers(1, 60), pins=st.integers(1, 6),
       pinned=st.sets(st.integers(1, 120)))
def test_stretches_keep_every_row_in_order_and_bound_rows_and_checkpoints(
        n: int, rows: int, pins: int, pinned: set[int]) -> None:
    """Every row once, in order; no stretch longer than ``rows`` or holding more than
    ``pins`` checkpoints; a stretch ends early only on its ``pins``-th checkpoint."""
    records = [{"seq": seq} for seq in range(1, n + 1)]
    checkpoints = dict.fromkeys(pinned, b"")
    cut = list(stretches(records, rows, checkpoints, pins))
    assert [r for stretch in cut for r in stretch] == records
    for k, stretch in enumerate(cut):
        held = sum(r["seq"] in checkpoints for r in stretch)
        assert stretch and len(stretch) <= rows and held <= pins
        if k < len(cut) - 1 and len(stretch) < rows:
            assert held == pins and stretch[-1]["seq"] in checkpoints
