"""bench/timeline.py's stall rule, bench/run.py's report and RSS sampler, on made-up seconds and on
real processes (no database)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from tests.bench_scripts import load
from tests.waiting import until

timeline = load("timeline")
run = load("run", "bench_run")


def _second(t: int, p99: float, slowest: float) -> dict[str, Any]:
    return {"t": t, "n": 1000, "p50_ms": 0.7, "p99_ms": p99, "max_ms": slowest}


@pytest.mark.parametrize(("slowest", "stalled"), [(6.0, False), (19.9, False), (20.1, True), (250.0, True)])
def test_a_second_stalls_only_past_five_median_p99s_and_the_issues_p999_allowance(
    slowest: float, stalled: bool,
) -> None:
    """With a median second's p99 of 1.2 ms, an answer of 6 ms is 5 x that and still no stall:
    the c=1 target lets answers up to 20 ms be one in a thousand. Past 20 ms it is one, with
    the marks of its second; the partial first and last seconds are never judged."""
    rows = [_second(t, 1.2, 3.0) for t in range(10)]
    rows[5]["max_ms"] = slowest
    rows[0]["max_ms"] = rows[-1]["max_ms"] = 500.0
    threshold, found = timeline.stalls(rows, [(5.4, "checkpoint x1 10.0 ms"), (6.1, "purge x1 1.0 ms")])
    assert threshold == timeline.STALL_FLOOR_MS == 20.0
    assert [(s["t"], s["marks"]) for s in found] == ([(5, ["checkpoint x1 10.0 ms"])] if stalled else [])


def test_the_threshold_follows_the_median_second_when_that_is_higher() -> None:
    """At c=64, median p99 15 ms: a second stalls past 75 ms, not past 20."""
    rows = [_second(t, 15.0, 40.0) for t in range(10)]
    rows[3]["max_ms"], rows[4]["max_ms"] = 60.0, 80.0
    threshold, found = timeline.stalls(rows, [])
    assert threshold == 75.0 and [s["t"] for s in found] == [4]


def test_every_wall_clock_second_is_a_row_and_only_judged_drops_the_partial_ends() -> None:
    """``seconds`` keeps the partial first and last seconds (their answers count in the run's
    figures); ``judged`` is the one place that leaves them out."""
    samples = [(1_900, 800, "ok"), (2_000, 700, "ok"), (2_999, 900, "ok"), (3_500, 1_000, "ok"),
               (4_050, 5_000, "ok")]
    rows = timeline.seconds(samples)
    assert [(r["t"], r["n"], r["max_ms"]) for r in rows] == [(1, 1, 0.8), (2, 2, 0.9), (3, 1, 1.0),
                                                            (4, 1, 5.0)]
    assert [r["t"] for r in timeline.judged(rows)] == [2, 3]


def test_the_runs_figures_are_exact_over_every_answer() -> None:
    """Percentiles are ranks of the sorted answers and the mean is their exact mean (in µs
    from decisions.lua, reported in ms), so Little's law can be checked on it."""
    samples = [(1_000 + k, latency, "ok") for k, latency in enumerate([900] * 98 + [5_000, 40_000])]
    figures = timeline.overall(samples)
    assert figures == {"n": 100, "p50_ms": 0.9, "p95_ms": 0.9, "p99_ms": 40.0, "p99.9_ms": 40.0, "max_ms": 40.0,
                       "mean_ms": (98 * 900 + 5_000 + 40_000) / 100 / 1000}


def test_the_report_shows_the_answers_latency_and_wrk_s_corrected_p99_apart() -> None:
    """wrk corrects its histogram for coordinated omission, which raises its tail above the
    answers' own: the decision table's latency columns are the timeline's, and wrk's p99
    has a column of its own; a phase without a timeline falls back to wrk's figures."""
    samples = [(1_000 + k, latency, "ok") for k, latency in enumerate([900] * 98 + [5_000, 40_000])]
    phase = {"concurrency": 64, "rate": 1000.0, "p50_ms": 1.0, "p95_ms": 9.0, "p99_ms": 31.0, "max_ms": 40.0,
             "errors": 0, "reasons": {"ok": 100}, "peak_rss_mb": 100.0, "pg": {"mean_batch": 30.0},
             "cpu": {"service": 0.5, "postgres": 0.5, "loadgen": 0.2, "other": 0.0},
             "timeline": {"overall": timeline.overall(samples)}}
    result = {"args": {"baseline_batch": 0, "mix": "1:0:0:0"},
              "main": {"phases": [phase], "storage": {"ledger_rows": 1, "uses_rows": 1, "bytes_per_entry": 1,
                                                       "ledger_bytes_per_row": 1, "uses_bytes_per_row": 1}}}
    row = run.report(result).splitlines()[3].split("|")
    assert [cell.strip() for cell in row[3:9]] == ["0.90", "0.90", "40.00", "40.00", "40.0", "31.00"]
    del phase["timeline"]
    assert run.answers(phase)["p99_ms"] == 31.0


def test_the_process_tree_and_its_rss_are_read_from_proc_as_psutil_sees_them() -> None:
    """``tree_pids`` finds every descendant, three levels down (psutil agrees), ``rss_bytes`` reads a live
    process's resident set and 0 for one that is gone, and the sampler's peak covers the tree."""
    script = "import time; time.sleep(60)"
    for _ in range(2):  # a child of a child of a child: three levels below this process
        script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {script!r}]); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while len(psutil.Process(child.pid).children(recursive=True)) < 2:
            assert time.monotonic() < deadline, "the descendants did not start"
            time.sleep(0.05)
        members = run.tree_pids(child.pid)
        expected = [child.pid, *(p.pid for p in psutil.Process(child.pid).children(recursive=True))]
        assert sorted(members) == sorted(expected) and len(members) == 3
        assert child.pid in run.tree_pids(os.getpid())
        assert [p.pid for p in run.tree(child.pid)] == members
        rss = sum(run.rss_bytes(pid) for pid in run.tree_pids(child.pid))
        assert rss >= psutil.Process(child.pid).memory_info().rss > 0
        sampler = run.Sampler([child.pid])
        try:
            deadline = time.monotonic() + 20
            while sampler.peak == 0:
                assert time.monotonic() < deadline, "the sampler took no sample"
                time.sleep(0.05)
        finally:
            sampler.stop()
        assert sampler.peak >= psutil.Process(child.pid).memory_info().rss
    finally:
        for proc in psutil.Process(child.pid).children(recursive=True):
            proc.kill()
        child.kill()
        child.wait()
    assert run.tree_pids(child.pid) == [] and run.rss_bytes(child.pid) == 0


def test_the_sampler_keeps_each_processs_rss_by_second_under_a_label_naming_its_role() -> None:
    """``phase_by_process`` holds, per process of the tree, its RSS in the seconds
    ``phase_series`` holds (0 before it started), labelled ``serve <pid>`` for a serving
    process and ``chain child <pid>`` for a worker's chain check; ``start_phase`` clears it."""
    child_script = "# chain_reader\nimport time; time.sleep(60)"
    script = ("import subprocess, sys, time; time.sleep(1.5);"
              f" subprocess.Popen([sys.executable, '-c', {child_script!r}]); time.sleep(60)")
    serve = subprocess.Popen([sys.executable, "-c", script, "serve"])
    sampler = run.Sampler([serve.pid])
    try:
        asyncio.run(until(lambda: any(label.startswith("chain child ") for label in sampler.phase_by_process),
                          "the sampler to see the chain child", timeout=20))
        sampler.stop()
        by_process, series = sampler.phase_by_process, sampler.phase_series
        (child_label,) = (label for label in by_process if label.startswith("chain child "))
        assert set(by_process) == {f"serve {serve.pid}", child_label}
        assert run.process_label(int(child_label.rpartition(" ")[2])) == child_label
        serving, checking = by_process[f"serve {serve.pid}"], by_process[child_label]
        assert len(serving) == len(checking) == len(series)
        assert all(rss > 0 for rss in serving) and checking[0] == 0 and checking[-1] > 0
        assert series[-1] == serving[-1] + checking[-1]
        sampler.start_phase()
        assert sampler.phase_by_process == {} and sampler.phase_series == [] and sampler.phase_peak == 0
    finally:
        sampler.stop()  # a second stop is a no-op
        for proc in psutil.Process(serve.pid).children(recursive=True):
            proc.kill()
        serve.kill()
        serve.wait()
    assert run.process_label(serve.pid) == f"gone {serve.pid}"


def test_the_hosts_speed_probe_times_the_same_work_in_this_threads_cpu() -> None:
    """``host_probe_ms`` does the same work each time (the same result) and times it in
    thread CPU time, which is positive."""
    assert run._probe_work() == run._probe_work()
    assert run.host_probe_ms() > 0


def test_the_shared_cache_probe_reads_the_same_lines_of_16_mib_each_time() -> None:
    """``cache_probe_ms`` builds its buffer and its reads once: 200,000 reads at line
    offsets spread over the 16 MiB (more than a core's own cache), the same ones on every
    call, timed in thread CPU time."""
    assert run.cache_probe_ms() > 0
    block, read = run._cache_probe
    assert len(block) == 16 << 20
    values = read(block)
    assert len(values) == 200_000
    assert run.cache_probe_ms() > 0 and run._cache_probe == (block, read) and read(block) == values
    assert set(read(bytearray(range(256)) * (len(block) // 256))) == {0, 64, 128, 192}  # whole lines
    assert set(read(bytearray(b"".join(bytes([mib]) * (1 << 20) for mib in range(16))))) == set(range(16))


def test_the_storage_line_gives_an_empty_table_whole_not_per_row() -> None:
    """A run of fresh nonces writes no ``uses`` row, and one of wrong codes accepts nothing: a
    table without rows is reported as the size of its empty pages and indexes, not divided by
    one row into a figure per row."""
    rows = {"ledger_rows": 1000, "uses_rows": 500, "spent_rows": 400, "bytes_per_entry": 700.0,
            "ledger_bytes_per_row": 400.0, "uses_bytes": 300_000, "uses_bytes_per_row": 600.0,
            "spent_bytes": 60_000, "spent_bytes_per_row": 150.0}
    assert run.storage_line(rows) == ("Storage: 1000 ledger rows, 400 spent nonces, 500 uses; 700.0 bytes per"
                                      " ledger entry (ledger 400.0 B/row, spent_nonces 150.0 B/row,"
                                      " uses 600.0 B/row; indexes and TOAST included)")
    empty = {**rows, "uses_rows": 0, "uses_bytes": 32_768, "uses_bytes_per_row": None, "bytes_per_entry": 432.8}
    assert run.storage_line(empty) == ("Storage: 1000 ledger rows, 400 spent nonces, 0 uses; 432.8 bytes per"
                                       " ledger entry (ledger 400.0 B/row, spent_nonces 150.0 B/row,"
                                       " uses empty, 32768 B of pages and indexes; indexes and TOAST included)")


def _ledger_scrape(worker: str, buckets: dict[str, int]) -> str:
    """A /metrics page of one worker: a background counter naming it, and the ledger call buckets."""
    lines = [f'replayguard_background_runs_total{{task="alert_tail",worker="{worker}"}} 1.0']
    lines += [f'replayguard_ledger_call_duration_seconds_bucket{{le="{le}"}} {n}.0' for le, n in buckets.items()]
    return "\n".join(lines) + "\n"


def test_slow_ledger_transactions_are_counted_between_two_scrapes_of_one_worker() -> None:
    """The mark says how many transactions took SLOW_LEDGER_S or more since the worker's last
    scrape, of how many, and the bucket that held the slowest; none without a slow one, none
    on a worker's first scrape (nothing to compare with), and each worker against its own."""
    fast = {"0.005": 100, "0.025": 110, "0.05": 110, "0.1": 110, "5.0": 110, "+Inf": 110}
    slow = {"0.005": 200, "0.025": 215, "0.05": 217, "0.1": 218, "5.0": 218, "+Inf": 218}
    marks = timeline.Marks(["http://127.0.0.1:9"], "token", "postgresql://127.0.0.1/bench")
    last: dict[tuple[str, str], Any] = {}
    marks._service(10.0, _ledger_scrape("7", fast), last)
    marks._service(11.0, _ledger_scrape("8", slow), last)  # another worker's first scrape
    assert marks.marks == [] and marks.scrapes == 2
    marks._service(12.0, _ledger_scrape("7", slow), last)
    assert [label for _, label in marks.marks] == [
        "pid 7 ledger calls over 25 ms: 3 of 108, the slowest under 100 ms"]
    marks._service(13.0, _ledger_scrape("7", slow), last)
    assert len(marks.marks) == 1  # nothing new: no mark
    labels = [timeline.slow_ledger_calls({5.0: 0.0, math.inf: 0.0}, {5.0: 0.0, math.inf: 2.0}),
              timeline.slow_ledger_calls(None, {math.inf: 2.0}),
              timeline.slow_ledger_calls({0.025: 5.0, math.inf: 5.0}, {0.025: 9.0, math.inf: 9.0})]
    assert labels == ["ledger calls over 25 ms: 2 of 2, the slowest over 5 s", None, None]
    assert timeline.marks_by_kind(marks.marks) == {"ledger calls over 25 ms": 1}


def test_each_stall_is_counted_under_its_strongest_evidence() -> None:
    """A stalled second with a slow probe commit is the server's, whatever else ran in it;
    one with only a slow ledger transaction (from any worker) is the decision's transaction;
    one with neither, background work or not, is the worker's or a core's. The report says
    how many of each."""
    rows = [_second(t, 1.0, 1.0) for t in range(100, 120)]
    for t in (102, 104, 106, 108):
        rows[t - 100] = _second(t, 80.0, 90.0)
    marks = [(102.5, "pg slow commit: 45 ms (a one-row probe)"), (102.6, "ledger calls over 25 ms: 3 of 400, x"),
             (104.5, "pid 12 ledger calls over 25 ms: 1 of 200, the slowest under 50 ms"),
             (106.5, "state_check x1 80.0 ms")]
    _, found = timeline.stalls(rows, marks)
    assert [r["t"] for r in found] == [102, 104, 106, 108]
    assert timeline.stall_evidence(found) == {"server commits": 1, "ledger transactions": 1, "neither": 2}
    report = timeline.report("c=64", rows, marks, timeline.overall([(100_000, 1_000, "ok")]))
    assert report.splitlines()[-1] == (
        "    stalls with a slow server commit / slow ledger transactions only / neither: 1 / 1 / 2")
    assert "stalls with" not in timeline.report("c=64", rows[:1], [], timeline.overall([(100_000, 1_000, "ok")]))


def test_each_scrape_adds_the_last_finished_run_of_each_duty_once() -> None:
    """A scrape names, per duty and worker, when its last finished run started and how long
    it took (prometheus_client's float format included); a later scrape of the same run adds
    nothing, and a run's start without its duration is not a run."""
    page = ('replayguard_background_last_start_timestamp_seconds{task="state_check",worker="7"} 1.7966297072e+09\n'
            'replayguard_background_last_duration_seconds{task="state_check",worker="7"} 0.05\n'
            'replayguard_background_last_start_timestamp_seconds{task="purge",worker="7"} 1796629707.5\n')
    marks = timeline.Marks(["http://127.0.0.1:9"], "token", "postgresql://127.0.0.1/bench")
    marks._service(1796629708.0, page, {})
    marks._service(1796629709.0, page, {})
    assert marks.duty_runs() == [("state_check", 1796629707.2, 1796629707.2 + 0.05)]


def test_the_tail_report_sets_each_duty_s_share_of_the_slowest_answers_beside_its_share_of_all() -> None:
    """An answer counts for a duty when its time from send to answer meets one of the duty's
    runs; the slowest 1 % here all ran during the state check, which few answers meet
    otherwise, and none during the purge; ``any`` joins every duty's runs."""
    # 10,000 answers, 1 ms each, one answer every ms from t = 1,000 s; the 50 slowest (30 ms)
    # answered inside the state check's runs.
    samples = [(1_000_000 + i, 1_000, "ok") for i in range(10_000)]
    for k in range(50):
        samples[2_000 + k * 100] = (1_000_000 + 2_000 + k, 30_000, "ok")
    runs = [("state_check", 1001.99, 1002.06), ("purge", 1005.0, 1005.2), ("state_check", 1009.0, 1009.01)]
    tail = timeline.tail_during(samples, runs)
    assert tail["tail_n"] == 50 and tail["over_ms"] == 1.0
    duties = tail["duties"]
    assert list(duties) == ["any", "state_check", "purge"]
    assert duties["state_check"] == {"runs": 2, "tail": 1.0, "all": pytest.approx(0.01, abs=0.003)}
    assert duties["purge"] == {"runs": 1, "tail": 0.0, "all": pytest.approx(0.02, abs=0.003)}
    assert duties["any"]["tail"] == 1.0
    line = timeline.tail_line(tail)
    assert line is not None and line.startswith("    slowest 1 % (over 1.00 ms, n=50)")
    assert line.endswith("any 100%/3%, state_check 100%/1%, purge 0%/2%")
    assert timeline.tail_during(samples, []) == {} and timeline.tail_line({}) is None


def test_cpu_between_two_readings_is_cores_used_and_the_rest_is_other() -> None:
    """cpu_between divides each side's CPU seconds by the wall time between the readings;
    a process born in between counts from zero, and ``other`` is what no side used."""
    before = ({1: 10.0}, {7: 3.0}, 1.0, 100.0, 50.0, 0.5)
    after = ({1: 12.0, 2: 1.0}, {7: 5.0}, 2.0, 106.0, 52.0, 0.7)
    assert run.cpu_between(before, after) == {"service": 1.5, "postgres": 1.0, "loadgen": 0.5,
                                              "machine_busy": 3.0, "steal": 0.1, "other": -0.1}


def test_the_cpu_meter_splits_a_phase_into_whole_intervals() -> None:
    """With ``every``, the meter also gives the CPU of each whole interval (the partial last
    one left out) and the host's two probes at its end, beside the phase's, and when the
    intervals began."""
    class Me:
        def pids(self) -> list[int]:
            return [os.getpid()]
    began = time.time()
    start = time.monotonic()
    with run.cpu_meter(Me(), "no_such_database", every=0.2) as cpu:
        while len(cpu["by_interval"]) < 2:  # this process is the "service": keep it busy,
            sum(range(10_000))
            time.sleep(0)  # and let the meter's thread take the GIL
    elapsed = time.monotonic() - start
    # Only whole intervals are kept: never more than the time the phase took holds.
    assert 2 <= len(cpu["by_interval"]) <= elapsed / 0.2
    assert cpu["by_interval_s"] == 0.2 and began <= cpu["by_interval_from"] <= time.time()
    assert all(set(split) == {"service", "postgres", "machine_busy", "steal", "probe_ms", "cache_probe_ms"}
               for split in cpu["by_interval"])
    assert all(split["service"] > 0 and split["probe_ms"] > 0 and split["cache_probe_ms"] > 0
               for split in cpu["by_interval"])
    assert cpu["service"] > 0 and "other" in cpu


def test_a_phase_without_intervals_has_none() -> None:
    """Without ``every`` the meter gives the phase's figures alone."""
    class Me:
        def pids(self) -> list[int]:
            return [os.getpid()]
    with run.cpu_meter(Me(), "no_such_database") as cpu:
        time.sleep(0.01)
    assert "by_interval" not in cpu and set(cpu) >= {"service", "postgres", "machine_busy"}
