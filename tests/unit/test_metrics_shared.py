"""``metrics_shared``: how several workers' metrics read as one service's, and the private
directory they share them through."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from replayguard.core.decisions import DecisionResult, Flag, Reason, Verdict
from replayguard.metrics import Metrics
from replayguard.metrics_shared import (
    GAUGE_MERGE,
    PREFIX,
    Families,
    SharedMetrics,
    Snapshot,
    make_directory,
    merge,
    remove_stale,
    snapshot,
)

ACCEPT = DecisionResult(Verdict.ACCEPT, Reason.OK, (), 1, None)
REUSED = DecisionResult(Verdict.REJECT, Reason.REUSED, (Flag.ROLLBACK_DETECTED,), 2, None)


def _samples(families: Snapshot) -> list[tuple[str, dict[str, str], float]]:
    return [sample for _, _, _, samples in families for sample in samples]


def _values(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(Families(families)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _gauge(name: str, value: float, labels: dict[str, str] | None = None) -> Snapshot:
    return [(name, "gauge", "help", [(name, labels or {}, value)])]


def test_counters_and_histograms_are_summed_and_created_is_the_earliest() -> None:
    """Two workers' decision counters, request histogram and library histogram add up; a
    ``_created`` series is the earliest of the two, not their sum."""
    one, two = Metrics(), Metrics()
    for _ in range(3):
        one.decision("otp", ACCEPT)
        one.http_request("/v1/otp/verify", "POST", 200, 0.003)
    two.decision("otp", ACCEPT)
    two.decision("nonce", REUSED)
    two.http_request("/v1/otp/verify", "POST", 200, 0.0001)
    one.ledger_batch(3, 0.002)
    two.ledger_batch(200, 0.3)
    a, b = snapshot(one.registry.collect()), snapshot(two.registry.collect())
    got = _values(merge({1: a, 2: b}))
    assert got[("replayguard_decisions_total", (("decision", "accept"), ("kind", "otp"), ("reason", "ok")))] == 4
    assert got[("replayguard_decisions_total", (("decision", "reject"), ("kind", "nonce"), ("reason", "reused")))] == 1
    assert got[("replayguard_decision_flags_total", (("flag", "rollback_detected"),))] == 1
    route = ("route", "/v1/otp/verify")
    assert got[("replayguard_http_request_duration_seconds_bucket", (("le", "0.0005"), route))] == 1
    assert got[("replayguard_http_request_duration_seconds_bucket", (("le", "0.005"), route))] == 4
    assert got[("replayguard_http_request_duration_seconds_count", (route,))] == 4
    assert got[("replayguard_http_request_duration_seconds_sum", (route,))] == pytest.approx(0.0091)
    assert got[("replayguard_ledger_batch_size_bucket", (("le", "4.0"),))] == 1
    assert got[("replayguard_ledger_batch_size_bucket", (("le", "+Inf"),))] == 2
    assert got[("replayguard_ledger_batch_size_sum", ())] == 203
    created = [value for name, _, value in _samples(a) + _samples(b) if name == "replayguard_ledger_batch_size_created"]
    assert len(created) == 2 and got[("replayguard_ledger_batch_size_created", ())] == min(created)


@pytest.mark.parametrize(("name", "values", "expected"), [
    ("replayguard_ledger_up", (1, 0), 0),
    ("replayguard_ledger_up", (1, 1), 1),
    ("replayguard_ledger_rollback", (0, 1), 1),
    ("replayguard_alert_feed_leader", (0, 1), 1),
    ("replayguard_sse_subscribers", (3, 4), 7),
    ("replayguard_postgres_sync_standbys", (1, 0), 0),
])
def test_each_gauge_reads_as_its_rule_says(name: str, values: tuple[float, float], expected: float) -> None:
    """min, max or sum across the workers, as GAUGE_MERGE says for that gauge."""
    got = _values(merge({1: _gauge(name, values[0]), 2: _gauge(name, values[1])}))
    assert got == {(name, ()): expected}


def test_a_gauge_without_a_rule_is_kept_per_worker_and_a_worker_label_is_kept() -> None:
    """A gauge GAUGE_MERGE does not name gets one series per worker (a ``worker`` label);
    the background gauges, labelled by worker already, keep theirs."""
    got = _values(merge({1: _gauge("replayguard_new", 5), 2: _gauge("replayguard_new", 6)}))
    assert got == {("replayguard_new", (("worker", "1"),)): 5, ("replayguard_new", (("worker", "2"),)): 6}
    name = "replayguard_background_last_start_timestamp_seconds"
    got = _values(merge({1: _gauge(name, 10, {"task": "purge", "worker": "1"}),
                         2: _gauge(name, 20, {"task": "purge", "worker": "2"})}))
    assert got == {(name, (("task", "purge"), ("worker", "1"))): 10, (name, (("task", "purge"), ("worker", "2"))): 20}


def test_every_scrape_counts_at_least_what_the_one_before_did(tmp_path: Path) -> None:
    """Scrapes answered by either of two workers in turn, while both keep deciding, never count
    fewer decisions than the scrape before, and count all of them once both have published."""
    workers = [Metrics(), Metrics()]
    for pid, metrics in enumerate(workers, start=1):
        metrics.shared = SharedMetrics(tmp_path, pid=pid)

    def counted(metrics: Metrics) -> float:
        return sum(s.value for f in text_string_to_metric_families(metrics.render().decode())
                   if f.name == "replayguard_decisions" for s in f.samples)

    totals = []
    for step in range(30):
        workers[step % 3 == 0].decision("otp", ACCEPT)  # uneven: one worker decides twice as often
        if step % 4 == 0:
            workers[step % 8 == 0].publish()
        totals.append(counted(workers[step % 2]))
    assert totals == sorted(totals) and totals[-1] <= 30, totals
    workers[0].publish()
    workers[1].publish()
    assert counted(workers[0]) == counted(workers[1]) == 30


def test_a_checks_gauge_reads_as_the_newest_check_of_any_worker(tmp_path: Path) -> None:
    """replayguard_ledger_up is set by each worker's own /readyz, which a probe reaches on
    one worker at a time. After an outage seen by worker 1's probe, the ledger is back and
    worker 2's probe finds it writable: the service's last check says up, whichever worker
    answers the scrape; a later failed check says down again. (The lowest value of all the
    workers was reported: 0 until a probe happened to reach worker 1 again, which with
    many workers kept ReplayguardLedgerUnavailable firing long after the recovery.)"""
    workers = [Metrics(redis=True), Metrics(redis=True)]
    for pid, metrics in enumerate(workers, start=1):
        metrics.shared = SharedMetrics(tmp_path, pid=pid)

    def up(metrics: Metrics) -> dict[str, float]:
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(metrics.render().decode())
                if f.name in ("replayguard_ledger_up", "replayguard_redis_up")}

    def later_than(metrics: Metrics) -> None:
        before = time.monotonic()
        while time.monotonic() <= before:  # the next check is strictly later than any before it
            pass

    for metrics, ok in ((workers[0], 1), (workers[0], 0), (workers[1], 1)):
        later_than(metrics)
        metrics.ledger_up.set(ok)
        assert metrics.redis_up is not None
        metrics.redis_up.set(ok)
        metrics.publish()
    assert up(workers[0]) == up(workers[1]) == {"replayguard_ledger_up": 1, "replayguard_redis_up": 1}
    later_than(workers[0])
    workers[0].ledger_up.set(0)
    assert up(workers[0])["replayguard_ledger_up"] == up(workers[1])["replayguard_ledger_up"] == 0


def test_the_catalogue_says_how_each_gauge_reads_across_workers() -> None:
    """deploy/prometheus/README.md's "workers" column is GAUGE_MERGE for every gauge, and
    GAUGE_MERGE names only gauges of the catalogue (a new gauge asks for a decision)."""
    catalogue = (Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "README.md").read_text()
    rows = [[cell.strip() for cell in line.split("|")[1:5]] for line in catalogue.splitlines()
            if line.startswith("| `replayguard_")]
    gauges = {name.strip("`"): workers for name, kind, _, workers in rows if kind == "gauge"}
    assert gauges == {name: "per worker" if how == "worker" else how for name, how in GAUGE_MERGE.items()}
    assert all(workers in ("sum", "per worker") for _, kind, _, workers in rows if kind != "gauge")


def test_the_directory_is_private_and_stale_ones_of_this_user_go(tmp_path: Path) -> None:
    """A new directory is empty, 0700 and this user's; one left by a serve that is gone is
    removed, one of a serve still running and other entries are not."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{PREFIX}{int(gone.stdout)}-abc"
    stale.mkdir()
    (stale / "1.json").write_text("{}")
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    live.mkdir()
    other = tmp_path / f"{PREFIX}notapid"
    other.mkdir()
    made = make_directory(tmp_path)
    info = made.lstat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid() and not list(made.iterdir())
    assert not stale.exists() and live.exists() and other.exists()
    remove_stale(tmp_path)
    assert made.exists()


def test_the_directory_goes_under_systemds_runtime_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under the shipped unit (``RuntimeDirectory=``, which systemd passes as
    ``RUNTIME_DIRECTORY``) the directory is made there; without it, in the temporary directory."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    assert make_directory().parent == tmp_path / "run"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert make_directory().parent == tmp_path / "tmp"
