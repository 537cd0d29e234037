"""Prometheus metrics, one registry per application (no module-level state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from .core.decisions import DecisionResult

# Methods a client may send are unbounded; the label takes only these (else "other").
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FrontCounts:
    """What the fast HTTP front did, as plain counters (read at scrape time, so counting
    a request costs an addition, not a labelled child's lock)."""

    def __init__(self) -> None:
        self.answered = 0  # decision requests the fast front answered itself
        self.handed_over = 0  # connections it handed to aiohttp
        self.closed = 0  # mixed pipelined reads: the requests taken were answered, then close
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.front = FrontCounts()
        self.registry.register(self.front)
        self.requests = Counter(
            "replayguard_http_requests_total", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "replayguard_http_request_duration_seconds", "HTTP request latency by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.decisions = Counter(
            "replayguard_decisions_total", "Decisions by kind, verdict and reason",
            ["kind", "decision", "reason"], registry=self.registry,
        )
        self.flags = Counter(
            "replayguard_decision_flags_total", "Flags raised on decisions", ["flag"], registry=self.registry,
        )
        self.batch_size = Histogram(
            "replayguard_ledger_batch_size", "Decisions per ledger transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )
        self.token_read_size = Histogram(
            "replayguard_token_read_batch_size", "Principals per token read (concurrent cache misses share one)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry,
        )
        self.ledger_up = Gauge(
            "replayguard_ledger_up", "1 when the last ledger check succeeded", registry=self.registry,
        )
        self.redis_up = Gauge(
            "replayguard_redis_up", "1 when Redis answered the last check", registry=self.registry,
        )

        # Labelled children, looked up once per label set rather than once per request.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def http_request(self, route: str, method: str, status: int, elapsed_s: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.latency, route).observe(elapsed_s)

    def decision(self, kind: str, result: DecisionResult) -> None:
        self._child(self.decisions, kind, result.verdict.value, result.reason.value).inc()
        for flag in result.flags:
            self._child(self.flags, flag.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
