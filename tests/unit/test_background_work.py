"""The service's background duties are counted for ``/metrics`` (``metrics.BackgroundWork``)."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from replayguard.metrics import BackgroundWork


def test_a_timed_duty_counts_its_runs_and_time_even_when_it_fails() -> None:
    """Each run of a duty adds one run and its duration, also when the duty raises."""
    work = BackgroundWork()
    with work.timed("purge"):
        pass
    with pytest.raises(RuntimeError), work.timed("purge"):
        raise RuntimeError("the database went away")
    assert work.runs == {"purge": 2}
    assert work.seconds["purge"] >= work.last_seconds["purge"] >= 0.0


def test_the_counts_are_exposed_per_task_and_worker() -> None:
    """The scrape carries runs, seconds, last start and last duration, labelled by task and pid."""
    work = BackgroundWork()
    work.record("checkpoint", 1_700_000_000.0, 0.25)
    registry = CollectorRegistry()
    registry.register(work)
    text = generate_latest(registry).decode()
    assert 'replayguard_background_runs_total{task="checkpoint",worker="' in text
    assert 'replayguard_background_seconds_total{task="checkpoint"' in text
    assert "replayguard_background_last_start_timestamp_seconds{" in text
    assert "replayguard_background_last_duration_seconds{" in text


def test_garbage_collections_are_counted_per_generation_while_watched() -> None:
    """While watched, a full collection counts as a gc2 run; once unwatched, none is counted."""
    work = BackgroundWork()
    work.watch_gc()
    try:
        gc.collect()
    finally:
        work.unwatch_gc()
    assert work.runs.get("gc2", 0) >= 1
    counted = dict(work.runs)
    gc.collect()
    assert work.runs == counted
