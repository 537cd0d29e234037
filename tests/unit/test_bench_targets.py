"""bench/targets.py judges run.py's figures as the performance issue states its targets.

The figures here are made up: what is tested is the judging (which target holds, what is
compared with what, what counts as not measured), never the machine's speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests.bench_scripts import load

targets = load("targets", "bench_targets")


def _phase(c: int, rate: float, p50: float, p99: float, p999: float | None = None, *, stalled: int = 0,
           seconds: list[int] | None = None, by: dict[str, tuple[float, float]] | None = None,
           rss: list[float] | None = None) -> dict[str, Any]:
    rows = [{"n": n} for n in (seconds or [100] * 12)]
    by_reason = {reason: {"p50_ms": a, "p99_ms": b} for reason, (a, b) in (by or {"ok": (p50, p99)}).items()}
    return {"concurrency": c, "rate": rate, "cpu": {"steal": 0.01}, "rss_mb_by_second": rss or [],
            "timeline": {"overall": {"p50_ms": p50, "p99_ms": p99, "p99.9_ms": p999 or p99 * 2},
                         "by_reason": by_reason, "seconds": rows, "stalls": [{}] * stalled}}


def _result(*phases: dict[str, Any], baseline: Sequence[tuple[int, float, float]] = ()) -> dict[str, Any]:
    return {"main": {"phases": list(phases)},
            "baseline": [{"concurrency": c, "batch": 1, "rows_per_s": r, "p99_ms": p99} for c, r, p99 in baseline]}


def _good() -> dict[str, dict[str, Any]]:
    cheap = {"ok": (1.0, 2.0), "invalid": (1.1, 2.2), "locked_out": (1.0, 1.9)}
    return {
        "c=1": _result(_phase(1, 900, 0.8, 1.9, 6.0), baseline=[(1, 1500, 0.9)]),
        "c=64": _result(_phase(64, 9000, 5.0, 9.0), baseline=[(64, 8500, 20.0)]),
        "2 workers": _result(_phase(64, 9100, 5.0, 8.9)),
        "wrong codes": _result(_phase(1, 900, 1, 2, by=cheap), _phase(64, 9000, 1, 2, by=cheap)),
        "locked out": _result(_phase(1, 900, 1, 2, by=cheap), _phase(64, 9000, 1, 2, by=cheap)),
        "long": _result(_phase(64, 9000, 5, 9, seconds=[100] * 600, rss=[100.0] * 600)),
    }


def _by_target(checks: list[Any]) -> dict[str, Any]:
    return {c.target: c for c in checks}


def test_every_target_holds_on_figures_that_meet_them() -> None:
    """Figures on the right side of every target: all fourteen hold, and the summary says so."""
    checks = targets.evaluate(_good())
    assert len(checks) == 14
    assert all(c.holds is True for c in checks), [c for c in checks if not c.holds]
    assert targets.summary([checks] * 3)[-1] == "every target measured held in all 3 consecutive runs"


@pytest.mark.parametrize(("change", "missed"), [
    (lambda r: r["c=1"]["main"]["phases"][0]["timeline"]["overall"].update({"p99_ms": 2.01}), "c=1 p99 ≤ 2 ms"),
    (lambda r: r["c=1"]["main"]["phases"][0]["timeline"]["overall"].update({"p99.9_ms": 20.5}),
     "c=1 p99.9 ≤ 20 ms"),
    (lambda r: r["c=64"]["main"]["phases"][0]["timeline"]["overall"].update({"p99_ms": 10.5}), "c=64 p99 ≤ 10 ms"),
    (lambda r: r["c=64"]["main"]["phases"][0]["timeline"]["overall"].update({"p50_ms": 2.0}),
     "c=64 p99 ≤ 4 x p50"),
    (lambda r: r["c=64"]["baseline"][0].update({"rows_per_s": 9001}), "c=64 decisions/s ≥ 1 x per-row baseline"),
    (lambda r: r["2 workers"]["main"]["phases"][0].update({"rate": 8999}),
     "2 workers decisions/s ≥ 1 worker's (c=64)"),
    (lambda r: r["2 workers"]["main"]["phases"][0]["timeline"]["overall"].update({"p99_ms": 9.1}),
     "2 workers p99 ≤ 1 worker's (c=64)"),
    (lambda r: r["2 workers"]["main"]["phases"][0]["timeline"].update({"stalls": [{}]}), "no stalled second"),
    (lambda r: r["wrong codes"]["main"]["phases"][1]["timeline"]["by_reason"].update(
        {"invalid": {"p50_ms": 1.0, "p99_ms": 2.6}}), "wrong codes as cheap as fresh (c=64, p50 and p99 ≤ 1.25 x)"),
    (lambda r: r["locked out"]["main"]["phases"][0]["timeline"]["by_reason"].update(
        {"locked_out": {"p50_ms": 1.3, "p99_ms": 2.0}}), "locked out as cheap as fresh (c=1, p50 and p99 ≤ 1.25 x)"),
    (lambda r: r["long"]["main"]["phases"][0]["timeline"].update(
        {"seconds": [{"n": 110 - k // 30} for k in range(600)]}), "long run: no downward trend"),
    (lambda r: r["long"]["main"]["phases"][0].update({"rss_mb_by_second": [100.0] * 540 + [106.0] * 60}),
     "long run: flat RSS"),
])
def test_each_target_is_missed_by_a_figure_just_past_it(change: Any, missed: str) -> None:
    """One figure just past its target misses that target and no other."""
    results = _good()
    change(results)
    checks = _by_target(targets.evaluate(results))
    assert [t for t, c in checks.items() if not c.holds] == [missed]
    assert targets.summary([list(checks.values())])[-1] == "not every target held in every run"


def test_what_was_not_measured_is_neither_held_nor_missed() -> None:
    """A measurement not made leaves its targets (and comparisons with it) unjudged, not failed."""
    results: dict[str, dict[str, Any] | None] = {**_good(), "long": None, "c=64": None}
    checks = _by_target(targets.evaluate(results))
    assert checks["long run: flat RSS"].holds is None
    assert checks["c=64 p99 ≤ 10 ms"].holds is None
    assert checks["2 workers decisions/s ≥ 1 worker's (c=64)"].holds is None  # nothing to compare with
    assert checks["c=1 p99 ≤ 2 ms"].holds is True
    lines = targets.summary([list(checks.values())])
    assert not any(line.startswith("long run") for line in lines)
    assert lines[-1] == "every target measured held in all 1 consecutive runs"


def test_a_latency_target_is_shown_beside_the_baseline_of_the_same_run() -> None:
    """The per-row baseline's p99 of the same run is printed beside the c=1 and c=64 p99 targets."""
    checks = _by_target(targets.evaluate(_good()))
    assert checks["c=1 p99 ≤ 2 ms"].beside.startswith("per-row baseline p99 0.90 ms")
    assert checks["c=64 p99 ≤ 10 ms"].beside.startswith("per-row baseline p99 20.00 ms")


def test_the_c64_latency_target_says_what_it_asks_of_throughput() -> None:
    """64 connections each waiting for its answer wait 64 / rate on average (Little's law):
    a mean of 10 ms needs 6,400 answers a second, and p99 ≤ 10 ms, at a run whose p99 is
    2.3 x its mean, about 14,720. The line is information beside the target, never a
    verdict; a result without a mean (an older file) leaves it out."""
    results = _good()
    results["c=64"]["main"]["phases"][0]["timeline"]["overall"].update({"p99_ms": 23.0, "mean_ms": 10.0})
    check = _by_target(targets.evaluate(results))["c=64 p99 ≤ 10 ms"]
    assert check.holds is False
    assert ("closed loop: a mean of 10 ms needs 6,400/s, p99 at this run's p99/mean of 2.3 about 14,720/s; "
            in check.beside)
    assert "closed loop" not in _by_target(targets.evaluate(_good()))["c=64 p99 ≤ 10 ms"].beside


def test_the_durable_floor_of_the_same_run_is_shown_and_never_judged() -> None:
    """The durable floor's p99 stands beside the c=1 and c=64 p99 targets and its rate beside
    the throughput target; a floor that answered nothing is left out; no verdict moves."""
    results = _good()
    results["c=1"]["durable_floor"] = [{"concurrency": 1, "rate": 1000.0, "overall": {"p99_ms": 2.5}}]
    results["c=64"]["durable_floor"] = [{"concurrency": 64, "rate": 6000.0, "overall": {"p99_ms": 30.0}}]
    checks = _by_target(targets.evaluate(results))
    assert "durable floor p99 2.50 ms" in checks["c=1 p99 ≤ 2 ms"].beside
    assert "durable floor p99 30.00 ms" in checks["c=64 p99 ≤ 10 ms"].beside
    assert "durable floor 6000/s (1.50 x)" in checks["c=64 decisions/s ≥ 1 x per-row baseline"].beside
    assert all(c.holds is True for c in checks.values())
    results["c=1"]["durable_floor"][0]["overall"] = {}
    assert "durable floor" not in _by_target(targets.evaluate(results))["c=1 p99 ≤ 2 ms"].beside


def test_the_durable_floors_stalled_seconds_are_shown_beside_the_services_and_never_judged() -> None:
    """The stalled seconds of every durable floor of the run (counted as the service's are)
    stand beside "no stalled second"; a floor of an older result.json, with no count, is
    left out; the verdict is the service's alone."""
    results = _good()
    results["c=1"]["durable_floor"] = [{"concurrency": 1, "rate": 1000.0, "overall": {"p99_ms": 1.0},
                                        "stalls": [{}, {}], "seconds_measured": 58}]
    results["c=64"]["durable_floor"] = [{"concurrency": 64, "rate": 6000.0, "overall": {"p99_ms": 30.0},
                                         "stalls": [], "seconds_measured": 8},
                                        {"concurrency": 16, "rate": 5000.0, "overall": {"p99_ms": 9.0}}]
    check = _by_target(targets.evaluate(results))["no stalled second"]
    assert (check.holds, check.beside) == (True, "seconds with an answer over 100 ms: 0; durable floor 2 of 66")
    results["c=64"]["main"]["phases"][0]["timeline"]["stalls"] = [{}]
    check = _by_target(targets.evaluate(results))["no stalled second"]
    assert (check.holds, check.beside) == (False, "seconds with an answer over 100 ms: 0; durable floor 2 of 66")


def test_seconds_with_an_answer_over_100_ms_are_counted_beside_the_stalls_and_never_judged() -> None:
    """The stall rule is relative to the phase's median second, so it moves with the host's
    hour; beside it stands how many whole seconds of every phase held an answer over 100 ms
    (the partial first and last seconds left out), which does not judge the target."""
    results = _good()
    rows = results["c=64"]["main"]["phases"][0]["timeline"]["seconds"]
    for i, ms in ((0, 500.0), (3, 100.0), (4, 100.1), (7, 240.0), (len(rows) - 1, 900.0)):
        rows[i]["max_ms"] = ms
    results["wrong codes"]["main"]["phases"][1]["timeline"]["seconds"][5]["max_ms"] = 150.0
    check = _by_target(targets.evaluate(results))["no stalled second"]
    assert (check.holds, check.beside) == (True, "seconds with an answer over 100 ms: 3")


def test_a_run_with_no_answer_of_a_kind_does_not_count_as_cheap() -> None:
    """With no locked-out answers in a phase, "as cheap" is not judged rather than passed."""
    results = _good()
    del results["locked out"]["main"]["phases"][1]["timeline"]["by_reason"]["locked_out"]
    checks = _by_target(targets.evaluate(results))
    check = checks["locked out as cheap as fresh (c=64, p50 and p99 ≤ 1.25 x)"]
    assert check.holds is None and check.measured == "no locked_out answers"


def test_trend_is_the_fitted_change_over_the_mean() -> None:
    """The trend is a least-squares line's change from first to last value, over the mean."""
    assert targets.trend([100.0] * 50) == 0.0
    assert targets.trend([100.0, 110.0]) == pytest.approx(10 / 105)
    assert targets.trend([float(100 - k) for k in range(11)]) == pytest.approx(-10 / 95)
    assert targets.trend([]) == 0.0 and targets.trend([0.0, 0.0]) == 0.0


def test_the_long_runs_first_minute_is_shown_beside_the_trend_and_never_judged() -> None:
    """A run that is faster only in its first minute (a ledger starting empty) still misses
    the trend, which judges the whole run; the first minute, the rest and the trend from the
    second minute are shown beside it."""
    results = _good()
    # 602 seconds: the partial first and last are left out, leaving a minute at 130/s and 540 s at 100/s
    seconds = [130] * 61 + [100] * 541
    results["long"] = _result(_phase(64, 9000, 5, 9, seconds=seconds, rss=[100.0] * 600))
    check = _by_target(targets.evaluate(results))["long run: no downward trend"]
    assert not check.holds
    assert check.beside.startswith("first minute 130/s, the rest 100/s, from the second minute +0.0 %; ")


def test_the_long_runs_cpu_a_decision_in_its_first_and_last_minute_is_shown_beside_the_trend() -> None:
    """The CPU a decision costs the service and PostgreSQL, minute by minute from the phase's
    intervals and its answers per second, is shown for the first and the last minute."""
    results = _good()
    seconds = [100] * 182
    long = _phase(64, 100, 5, 9, seconds=seconds, rss=[100.0] * 180)
    for k, row in enumerate(long["timeline"]["seconds"]):
        row["t"] = 1000 + k
    long["cpu"].update(by_interval=[{"service": 0.5, "postgres": 0.6, "machine_busy": 1.5, "steal": 0.0},
                                    {"service": 0.5, "postgres": 0.6, "machine_busy": 1.5, "steal": 0.0},
                                    {"service": 0.6, "postgres": 0.9, "machine_busy": 1.6, "steal": 0.0}],
                       by_interval_s=60.0, by_interval_from=1000.5)
    # each minute from 1000.5 holds 60 of the seconds' rows: 6,000 answers
    assert targets.run.cpu_by_minute(long) == [pytest.approx((5000.0, 6000.0)), pytest.approx((5000.0, 6000.0)),
                                           pytest.approx((6000.0, 9000.0))]
    results["long"] = _result(long)
    check = _by_target(targets.evaluate(results))["long run: no downward trend"]
    assert "CPU a decision, service/PostgreSQL: first minute 5000/6000 µs, last 6000/9000 µs; " in check.beside


def test_a_long_run_without_intervals_shows_no_cpu_by_minute() -> None:
    """A long phase whose CPU was not timed by interval shows nothing in their place."""
    long = _phase(64, 100, 5, 9, seconds=[100] * 182, rss=[100.0] * 180)
    assert targets.run.cpu_by_minute(long) == [] and targets.cpu_first_and_last(long) == ""


def test_flat_rss_names_each_processs_second_and_last_minute() -> None:
    """Beside "flat RSS" each process of the tree gives its peak in the second minute and
    in the last; a process that ran only in the first minute, or a run without the
    per-process series, adds nothing."""
    results = _good()
    long = _phase(64, 9000, 5, 9, seconds=[100] * 600, rss=[100.0] * 540 + [106.0] * 60)
    long["rss_mb_by_process"] = {"serve 7": [74.0] * 600, "chain child 8": [26.0] * 540 + [32.0] * 60,
                                 "chain child 5": [20.0] * 60 + [0.0] * 540}
    results["long"] = _result(long)
    check = _by_target(targets.evaluate(results))["long run: flat RSS"]
    assert not check.holds
    assert check.beside == "by process, second → last minute: serve 7 74 → 74 MB, chain child 8 26 → 32 MB"
    del long["rss_mb_by_process"]
    assert _by_target(targets.evaluate(results))["long run: flat RSS"].beside == ""


def test_the_hosts_probes_in_the_first_and_last_minute_are_shown_beside_the_cpu_a_decision() -> None:
    """With ``probe_ms`` and ``cache_probe_ms`` in the phase's intervals, each probe's CPU in
    the first and the last minute follows the CPU a decision; without one, it is left out."""
    long = _phase(64, 100, 5, 9, seconds=[100] * 182, rss=[100.0] * 180)
    for k, row in enumerate(long["timeline"]["seconds"]):
        row["t"] = 1000 + k
    long["cpu"].update(by_interval=[{"service": 0.5, "postgres": 0.6, "probe_ms": 15.4, "cache_probe_ms": 12.7},
                                    {"service": 0.5, "postgres": 0.6, "probe_ms": 16.0, "cache_probe_ms": 13.0},
                                    {"service": 0.6, "postgres": 0.9, "probe_ms": 18.46, "cache_probe_ms": 17.04}],
                       by_interval_s=60.0, by_interval_from=1000.5)
    assert targets.run.probe_by_minute(long) == [15.4, 16.0, 18.46]
    assert targets.run.probe_by_minute(long, "cache_probe_ms") == [12.7, 13.0, 17.04]
    assert targets.cpu_first_and_last(long) == (
        "CPU a decision, service/PostgreSQL: first minute 5000/6000 µs, last 6000/9000 µs;"
        " a fixed piece of work (the host's speed): first minute 15.4 ms of CPU, last 18.5 ms;"
        " reads over 16 MiB (the shared cache): first minute 12.7 ms of CPU, last 17.0 ms; ")
    for split in long["cpu"]["by_interval"]:
        del split["probe_ms"]
    assert targets.run.probe_by_minute(long) == []
    assert targets.cpu_first_and_last(long) == (
        "CPU a decision, service/PostgreSQL: first minute 5000/6000 µs, last 6000/9000 µs;"
        " reads over 16 MiB (the shared cache): first minute 12.7 ms of CPU, last 17.0 ms; ")
    for split in long["cpu"]["by_interval"]:
        del split["cache_probe_ms"]
    assert targets.cpu_first_and_last(long).endswith("last 6000/9000 µs; ")
