"""``metrics.RequestCounts`` exposes what prometheus_client's own counters and histogram would.

A differential test: the same requests and decisions go to ``RequestCounts`` and to
prometheus_client ``Counter``/``Histogram`` objects of the same names, labels and buckets;
the two expositions must agree line for line (``_created`` series aside, which only the
library's objects have).
"""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from replayguard.core.decisions import DecisionResult, Flag, Reason, Verdict
from replayguard.metrics import KNOWN_METHODS, LATENCY_BUCKETS, Metrics

# Every bucket bound itself (a latency equal to a bound falls in that bucket), between them, past the last.
LATENCIES = (0.0, *LATENCY_BUCKETS, *(b * 1.01 for b in LATENCY_BUCKETS), 0.0001, 7.0, 60.0)


def _reference() -> tuple[CollectorRegistry, Counter, Histogram, Counter, Counter]:
    registry = CollectorRegistry(auto_describe=True)
    return (registry,
            Counter("replayguard_http_requests_total", "HTTP requests by route, method and status",
                    ["route", "method", "status"], registry=registry),
            Histogram("replayguard_http_request_duration_seconds", "HTTP request latency by route", ["route"],
                      buckets=LATENCY_BUCKETS, registry=registry),
            Counter("replayguard_decisions_total", "Decisions by kind, verdict and reason",
                    ["kind", "decision", "reason"], registry=registry),
            Counter("replayguard_decision_flags_total", "Flags raised on decisions", ["flag"], registry=registry))


def _lines(text: bytes, families: tuple[str, ...]) -> list[str]:
    """The HELP, TYPE and sample lines of the metrics whose names start with one of ``families``."""
    def name(line: str) -> str:
        return line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
    return sorted(line for line in text.decode().splitlines()
                  if name(line).startswith(families) and not name(line).endswith("_created"))


def test_the_exposition_matches_prometheus_client_for_the_same_observations() -> None:
    """Random requests (known and unknown methods, latencies on and off the bucket bounds) and
    decisions (every verdict, reason and flag) render the same samples, HELP and TYPE lines."""
    rng = random.Random(7)
    metrics = Metrics()
    registry, requests, latency, decisions, flags = _reference()
    for _ in range(3000):
        route = rng.choice(["/v1/nonces/consume", "/v1/otp/verify", "/healthz"])
        method = rng.choice([*KNOWN_METHODS, "BREW", "get"])
        status = rng.choice([200, 400, 404, 503])
        elapsed = rng.choice(LATENCIES)
        metrics.http_request(route, method, status, elapsed)
        requests.labels(route, method if method in KNOWN_METHODS else "other", str(status)).inc()
        latency.labels(route).observe(elapsed)

        kind = rng.choice(["otp", "nonce"])
        raised = tuple(rng.sample(list(Flag), rng.choice([0, 0, 1, 2])))
        result = DecisionResult(rng.choice(list(Verdict)), rng.choice(list(Reason)), raised, 1, None)
        metrics.decision(kind, result)
        decisions.labels(kind, result.verdict.value, result.reason.value).inc()
        for flag in raised:
            flags.labels(flag.value).inc()

    families = ("replayguard_http_requests", "replayguard_http_request_duration", "replayguard_decision")
    ours, theirs = _lines(metrics.render(), families), _lines(generate_latest(registry), families)
    assert ours == theirs
    assert any('le="0.0005"' in line for line in ours) and any('le="+Inf"' in line for line in ours)


def test_a_registry_lookup_sees_the_counts() -> None:
    """``registry.get_sample_value`` (what tests and the Redis check read) finds a decision count."""
    metrics = Metrics()
    result = DecisionResult(Verdict.REJECT, Reason.REUSED, (), 1, None)
    for _ in range(3):
        metrics.decision("nonce", result)
    labels = {"kind": "nonce", "decision": "reject", "reason": "reused"}
    assert metrics.registry.get_sample_value("replayguard_decisions_total", labels) == 3.0
    assert metrics.registry.get_sample_value("replayguard_decisions_total", {**labels, "kind": "otp"}) is None
