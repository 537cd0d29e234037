"""The pure parts of bench/decide_instructions.py: the seeded batches, the totals read from a
callgrind file, the arithmetic and the table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.bench_scripts import load

script = load("decide_instructions")


def _items(call: str) -> list[dict[str, Any]]:
    return json.loads(call[call.index("'") + 1:call.index("'::jsonb")])


def test_batches_are_seeded_and_again_presents_the_warm_ups_nonces() -> None:
    """The same seed gives the same calls; ``fresh`` presents nonces never seen, ``again`` only
    nonces of the warm-up, and every item has its own increasing time."""
    warm, fresh = script.batches("fresh", 2, 3, 4, seed=7)
    assert (warm, fresh) == script.batches("fresh", 2, 3, 4, seed=7)
    seen = {item["digest"] for call in warm for item in _items(call)}
    fresh_digests = [item["digest"] for call in fresh for item in _items(call)]
    assert len(seen) == 8 and len(set(fresh_digests)) == 12 and not seen & set(fresh_digests)
    warm_again, again = script.batches("again", 2, 3, 4, seed=7)
    assert warm_again == warm
    assert {item["digest"] for call in again for item in _items(call)} <= seen
    times = [item["ts_us"] for call in warm + fresh for item in _items(call)]
    assert times == sorted(set(times))


def test_totals_and_the_count_an_item() -> None:
    """The total is read from the file's ``totals:`` (or ``summary:``) line; an item costs the
    difference between the two runs over the measured items; a file without it is refused."""
    assert script.totals("events: Ir\nsummary: 1500\ntotals: 1500\n") == 1500
    assert script.per_item(1_000, 31_000, 100) == 300.0
    with pytest.raises(ValueError, match="no totals"):
        script.totals("events: Ir\n")


def test_the_report_sets_a_candidate_beside_this_checkout() -> None:
    """One row per kind; with a candidate, its ratio to this checkout."""
    one = script.report(["fresh"], ["abc"], [{"fresh": 1234.4}])
    assert one.splitlines() == ["| kind | abc |", "|---|---|", "| fresh | 1,234 |"]
    two = script.report(["fresh", "again"], ["abc", "def"], [{"fresh": 400.0, "again": 1000.0},
                                                              {"fresh": 300.0, "again": 1000.0}])
    assert two.splitlines()[2:] == ["| fresh | 400 | 300 | 0.750 |", "| again | 1,000 | 1,000 | 1.000 |"]


def test_first_error_finds_the_backends_error_among_its_log_lines() -> None:
    """A backend's ERROR (or FATAL) line is found among LOG lines and valgrind's own; output
    with none gives None."""
    log = ("==15705== Callgrind, a call-graph generating cache profiler\n"
           "2026-12-07 01:59:28.997 UTC [15705] LOG:  database system is ready\n"
           "2026-12-07 01:59:28.997 UTC [15705] ERROR:  function rg_nope(jsonb) does not exist at character 22\n"
           "2026-12-07 01:59:28.997 UTC [15705] STATEMENT:  SELECT count(*) FROM rg_nope('[]'::jsonb)\n")
    assert script.first_error(log) == "ERROR:  function rg_nope(jsonb) does not exist at character 22"
    assert script.first_error(log.replace("ERROR", "FATAL")).startswith("FATAL:")
    assert script.first_error("backend> \t 1: count = \"32\"\n2026 UTC [1] LOG:  checkpoint starting\n") is None
