"""deploy/prometheus stays true to /metrics: every metric is documented and every rule names a real one."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from replayguard.settings import Secret
from tests.conftest import REPO, Api, dead_url

PROM = REPO / "deploy" / "prometheus"
_SUFFIXES = ("_bucket", "_sum", "_count")
REDIS_ONLY = {"replayguard_redis_up"}  # exported only with redis_url


@pytest.fixture
def dead_redis() -> Iterator[str]:
    """A redis:// URL on a loopback port that refuses connections (no Redis needed)."""
    with dead_url() as url:
        yield "redis://" + url.removeprefix("http://") + "/0"


async def _exposed(api: Api) -> set[str]:
    resp = await api.client.get("/metrics")
    text = await resp.text()
    return {line.split()[2] for line in text.splitlines()
            if line.startswith("# TYPE ") and not line.split()[2].endswith("_created")}


def _samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name]


async def test_every_metric_is_in_the_reference(api_factory: Callable[..., Any], dead_redis: str) -> None:
    """Each metric family /metrics exposes (Redis configured, so every one is) has a row in
    deploy/prometheus/README.md, and no row is stale."""
    api: Api = await api_factory(redis_url=Secret(dead_redis))
    documented = set(re.findall(r"^\| `(replayguard_[a-z_]+)` \|", (PROM / "README.md").read_text(), re.MULTILINE))
    assert documented == await _exposed(api)


async def test_rules_name_only_exposed_metrics(api_factory: Callable[..., Any], dead_redis: str) -> None:
    """Every metric an example rule queries exists, and every rule has a summary and a severity."""
    api: Api = await api_factory(redis_url=Secret(dead_redis))
    exposed = await _exposed(api)
    rules = yaml.safe_load((PROM / "replayguard-rules.yml").read_text())["groups"][0]["rules"]
    assert rules
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        for name in re.findall(r"replayguard_[a-z_]+", rule["expr"]):
            base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
            assert base in exposed, (rule["alert"], name)


async def test_redis_up_is_not_exported_without_redis(api: Api) -> None:
    """Without redis_url, /metrics has no replayguard_redis_up (a 0 would fire
    ReplayguardRedisDown on every deployment without Redis, which needs none), and
    replayguard_ledger_up is 1 from the start, before any /readyz."""
    text = await (await api.client.get("/metrics")).text()
    assert _samples(text, "replayguard_ledger_up") == ["replayguard_ledger_up 1.0"]
    assert (await api.client.get("/readyz")).status == 200
    text = await (await api.client.get("/metrics")).text()
    assert not [line for line in text.splitlines() if "replayguard_redis_up" in line]
    assert set(REDIS_ONLY).isdisjoint(await _exposed(api))


async def test_redis_up_is_0_while_the_configured_redis_is_down(api_factory: Callable[..., Any],
                                                                dead_redis: str) -> None:
    """With redis_url set and Redis unreachable, /readyz is 503 and replayguard_redis_up is 0."""
    api: Api = await api_factory(redis_url=Secret(dead_redis))
    resp = await api.client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["checks"]["redis"] == "unavailable"
    text = await (await api.client.get("/metrics")).text()
    assert _samples(text, "replayguard_redis_up") == ["replayguard_redis_up 0.0"]
