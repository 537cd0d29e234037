"""Prometheus metrics, one registry per application (no module-level state)."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .core.decisions import DecisionResult, Flag, Reason, Verdict
from .metrics_shared import Families, SharedMetrics

# Methods a client may send are unbounded; the label takes only these (else "other").
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Each bucket's ``le`` label as prometheus_client writes it (``0.0005``, ``1.0``, ``+Inf``).
_LE: tuple[str, ...] = tuple(floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf))  # type: ignore[no-untyped-call]


class FrontCounts:
    """What the fast HTTP front did, as plain counters (read at scrape time, so counting
    a request costs an addition, not a labelled child's lock)."""

    def __init__(self) -> None:
        self.answered = 0  # decision requests the fast front answered itself
        self.handed_over = 0  # connections it handed to aiohttp
        self.closed = 0  # requests whose start the front lost: the requests taken were answered, then close
        self.held = 0  # reads that ended inside a request the front kept for the next read

    def collect(self) -> Iterator[Metric]:
        answered = CounterMetricFamily(
            "replayguard_http_fast_answers", "Decision requests answered by the fast HTTP front "
            "(the others in replayguard_http_requests_total went through aiohttp)")
        answered.add_metric([], self.answered)
        yield answered
        connections = CounterMetricFamily(
            "replayguard_http_front_handoffs", "Connections the fast HTTP front gave up: handed to "
            "aiohttp, or closed after a read that mixed requests it takes with one it does not",
            labels=["outcome"])
        connections.add_metric(["aiohttp"], self.handed_over)
        connections.add_metric(["closed"], self.closed)
        yield connections
        held = CounterMetricFamily(
            "replayguard_http_front_held_reads", "Reads that ended inside a decision request the fast "
            "HTTP front kept until the rest arrived (a client that writes headers and body apart)")
        held.add_metric([], self.held)
        yield held


class BackgroundWork:
    """When the service's background duties ran and for how long (leader duties, the
    continuity check, the cyclic garbage collector), as plain numbers read at scrape time.

    A scraper that samples often (``bench/run.py`` does, ten times a second) can line a
    latency stall up with the duty that ran in that second; counting costs two clock
    reads per run, none on a decision's path.
    """

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.last_start: dict[str, float] = {}
        self.last_seconds: dict[str, float] = {}
        self._gc_started = 0.0

    @contextmanager
    def timed(self, task: str) -> Iterator[None]:
        started, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.record(task, wall, time.perf_counter() - started)

    def record(self, task: str, started_at: float, seconds: float) -> None:
        self.runs[task] = self.runs.get(task, 0) + 1
        self.seconds[task] = self.seconds.get(task, 0.0) + seconds
        self.last_start[task] = started_at
        self.last_seconds[task] = seconds

    def watch_gc(self) -> None:
        """Counts the cyclic collector's runs per generation (``gc.callbacks``)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._gc_started
            self.record(f"gc{info['generation']}", time.time() - seconds, seconds)

    def collect(self) -> Iterator[Metric]:
        # ``worker`` (the process id) tells apart the workers of ``serve --workers N``,
        # which answer scrapes in turn.
        labels = ["task", "worker"]
        runs = CounterMetricFamily("replayguard_background_runs", "Runs of a background duty", labels=labels)
        seconds = CounterMetricFamily("replayguard_background_seconds",
                                      "Wall time spent in a background duty", labels=labels)
        start = GaugeMetricFamily("replayguard_background_last_start_timestamp_seconds",
                                  "When a background duty last started (Unix time)", labels=labels)
        last = GaugeMetricFamily("replayguard_background_last_duration_seconds",
                                 "How long a background duty's last run took", labels=labels)
        worker = str(os.getpid())
        for task in sorted(self.runs):
            runs.add_metric([task, worker], self.runs[task])
            seconds.add_metric([task, worker], self.seconds[task])
            start.add_metric([task, worker], self.last_start[task])
            last.add_metric([task, worker], self.last_seconds[task])
        yield from (runs, seconds, start, last)


class RequestCounts:
    """HTTP requests and decisions as plain numbers, made into metric families at scrape time.

    Counting a request and its decision is a few dict updates and a bisect, under a
    microsecond; labelled prometheus_client children take a lock for each counter and each
    part of a histogram, about seven. Every caller runs on the worker's event loop, and so
    does the scrape (``Metrics.render``), so nothing else touches the dicts meanwhile.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # route: a count per latency bucket (the last one +Inf), then the sum of the latencies
        self.latency: dict[str, list[float]] = {}
        self.decisions: dict[tuple[str, Verdict, Reason], int] = {}
        self.flags: dict[Flag, int] = {}

    def http_request(self, route: str, method: str, status: int, elapsed_s: float) -> None:
        key = (route, method if method in KNOWN_METHODS else "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        row = self.latency.get(route)
        if row is None:
            row = self.latency[route] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect_left(LATENCY_BUCKETS, elapsed_s)] += 1  # the first bucket whose bound is >= elapsed_s
        row[-1] += elapsed_s

    def decision(self, kind: str, result: DecisionResult) -> None:
        key = (kind, result.verdict, result.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        for flag in result.flags:
            self.flags[flag] = self.flags.get(flag, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("replayguard_http_requests_total", "HTTP requests by route, method and status",
                                       labels=["route", "method", "status"])
        for (route, method, status), n in sorted(self.requests.items()):
            requests.add_metric([route, method, str(status)], n)
        yield requests
        latency = HistogramMetricFamily("replayguard_http_request_duration_seconds", "HTTP request latency by route",
                                        labels=["route"])
        for route, row in sorted(self.latency.items()):
            cumulative, buckets = 0.0, []
            for le, in_bucket in zip(_LE, row[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((le, cumulative))
            latency.add_metric([route], buckets, row[-1])
        yield latency
        decisions = CounterMetricFamily("replayguard_decisions_total", "Decisions by kind, verdict and reason",
                                        labels=["kind", "decision", "reason"])
        for (kind, verdict, reason), n in sorted(self.decisions.items(), key=lambda kv: str(kv[0])):
            decisions.add_metric([kind, verdict.value, reason.value], n)
        yield decisions
        flags = CounterMetricFamily("replayguard_decision_flags_total", "Flags raised on decisions", labels=["flag"])
        for flag, n in sorted(self.flags.items(), key=lambda kv: kv[0].value):
            flags.add_metric([flag.value], n)
        yield flags


class CheckGauge(Gauge):
    """A gauge a check sets (``replayguard_ledger_up``, ``replayguard_redis_up``), which
    keeps when it was last set: the workers of ``serve --workers N`` report the value of the
    newest check among them (``metrics_shared``, ``latest``). The time is the system's
    monotonic clock, the same in every process of the host and not moved by a clock step."""

    checked_at = 0.0

    def set(self, value: float) -> None:
        super().set(value)
        self.checked_at = time.monotonic()


class Metrics:
    def __init__(self, *, redis: bool = False) -> None:
        """``redis``: whether Redis is configured (``replayguard_redis_up`` exists only then)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.front = FrontCounts()
        self.registry.register(self.front)
        self.background = BackgroundWork()
        self.registry.register(self.background)
        self.counts = RequestCounts()
        self.registry.register(self.counts)
        self.http_request = self.counts.http_request
        self.decision = self.counts.decision
        self.batch_size = Histogram(
            "replayguard_ledger_batch_size", "Decisions per ledger transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )
        self.ledger_call = Histogram(
            "replayguard_ledger_call_duration_seconds", "One ledger transaction of decisions (rg_decide and its "
            "commit), from its send to its answer as the worker saw them",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.token_read_size = Histogram(
            "replayguard_token_read_batch_size", "Principals per token read (concurrent cache misses share one)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry,
        )
        self.ledger_up = CheckGauge(
            "replayguard_ledger_up", "1 when the last ledger check succeeded", registry=self.registry,
        )
        # Only with redis_url: a gauge at 0 without Redis would read as "Redis down" (ReplayguardRedisDown).
        self.redis_up = CheckGauge(
            "replayguard_redis_up", "1 when Redis answered the last check", registry=self.registry,
        ) if redis else None
        self.shared: SharedMetrics | None = None

    def share(self, directory: Path) -> None:
        """One of several workers: ``render`` reports them all (``metrics_shared``), and
        ``publish`` gives the others this worker's figures."""
        self.shared = SharedMetrics(directory)

    def checks(self) -> dict[str, float]:
        """When the gauges set by checks were last set, by name (for ``metrics_shared``)."""
        checks = {"replayguard_ledger_up": self.ledger_up.checked_at}
        if self.redis_up is not None:
            checks["replayguard_redis_up"] = self.redis_up.checked_at
        return checks

    def publish(self) -> None:
        if self.shared is not None:
            self.shared.publish(self.registry.collect(), self.checks())

    async def publish_in_thread(self) -> None:
        """``publish`` with the file written off the event loop (its figures are taken on it)."""
        if self.shared is not None:
            number, _, data = self.shared.take(self.registry.collect(), self.checks())
            await asyncio.to_thread(self.shared.write, number, data)

    def ledger_batch(self, size: int, seconds: float) -> None:
        """One committed group of decisions: how many, and how long its transaction took."""
        self.batch_size.observe(size)
        self.ledger_call.observe(seconds)

    def render(self) -> bytes:
        if self.shared is None:
            return generate_latest(self.registry)
        return generate_latest(Families(self.shared.collect(self.registry.collect(), self.checks())))
