"""Redis makes refusals cheaper and never decisions different.

Against a Redis the test owns: the hot cache refuses a known replay (and the ledger still
records it), caches a lockout, and when Redis stops, restarts empty or is flushed, the
service keeps deciding exactly as PostgreSQL says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pyotp
import pytest
import redis.asyncio as aioredis

from replayguard.appender import MAX_BATCH, MAX_DEFERRED
from replayguard.core.credentials import nonce_digest
from replayguard.settings import Secret
from tests.conftest import Api, uid
from tests.integration.owned_servers import OwnedRedis


def decisions(api: Api, kind: str, reason: str, source: str) -> float:
    """The value of replayguard_decisions_total for one label set (0 when never seen)."""
    labels = {"kind": kind, "decision": "accept" if reason == "ok" else "reject", "reason": reason,
              "source": source}
    return api.runtime.metrics.registry.get_sample_value("replayguard_decisions_total", labels) or 0.0


async def consume(api: Api, vm: str, scope: str, nonce: str) -> tuple[str, str]:
    status, body = await api.post("/v1/nonces/consume", {"vm_id": vm, "scope": scope, "nonce": nonce})
    assert status == 200, body
    return body["decision"], body["reason"]


async def ledger_rows(api: Api, digest: bytes) -> list[tuple[str, str, bool]]:
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT decision, reason, coalesce((payload->>'hot_cache')::boolean, false) AS hot FROM ledger"
            " WHERE cred_digest = $1 ORDER BY seq", digest)
    return [(r["decision"], r["reason"], r["hot"]) for r in rows]


async def readyz(api: Api) -> tuple[int, Any]:
    resp = await api.client.get("/readyz")
    return resp.status, await resp.json()


async def wait_redis_ready(api: Api, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = await readyz(api)
        if status == 200:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("Redis did not come back")


async def test_hot_cache_refuses_known_replay_and_ledger_records_it(
    owned_redis: OwnedRedis, api_factory: Callable[..., Any],
) -> None:
    """A replay on the same VM is refused from Redis, and the reject still reaches the ledger."""
    api: Api = await api_factory(redis_url=Secret(owned_redis.url))
    vm, scope, nonce = uid("vm"), uid("scope"), uid("nonce")
    assert await consume(api, vm, scope, nonce) == ("accept", "ok")
    assert await consume(api, vm, scope, nonce) == ("reject", "reused")
    assert decisions(api, "nonce", "reused", "redis") == 1
    assert decisions(api, "nonce", "reused", "ledger") == 0
    await api.runtime.appender.wait_idle()  # the deferred record of the hot reject
    digest = nonce_digest(api.runtime.keys.pepper, scope, nonce.encode())
    assert await ledger_rows(api, digest) == [("accept", "ok", False), ("reject", "reused", True)]
    resp = await api.client.get("/metrics")
    assert ('replayguard_decisions_total{decision="reject",kind="nonce",reason="reused",source="redis"} 1.0'
            in await resp.text())


async def test_a_replay_flood_is_recorded_as_fast_as_it_is_answered(
    owned_redis: OwnedRedis, api_factory: Callable[..., Any],
) -> None:
    """Many concurrent replays refused from Redis: never more than one batch of answered
    rejects waits for its ledger record, and every one of them reaches the ledger."""
    api: Api = await api_factory(redis_url=Secret(owned_redis.url))
    vm, scope, nonce = uid("vm"), uid("scope"), uid("nonce")
    assert await consume(api, vm, scope, nonce) == ("accept", "ok")
    appender = api.runtime.appender
    peak = 0

    async def replay() -> None:
        nonlocal peak
        assert await consume(api, vm, scope, nonce) == ("reject", "reused")
        peak = max(peak, appender._deferred)

    await asyncio.gather(*(replay() for _ in range(3 * MAX_DEFERRED)))
    await appender.wait_idle()
    assert 0 < peak <= MAX_BATCH
    assert decisions(api, "nonce", "reused", "redis") + decisions(api, "nonce", "reused", "ledger") == 3 * MAX_DEFERRED
    digest = nonce_digest(api.runtime.keys.pepper, scope, nonce.encode())
    assert len(await ledger_rows(api, digest)) == 1 + 3 * MAX_DEFERRED


async def test_hot_cache_refuses_known_totp_replay(
    owned_redis: OwnedRedis, api_factory: Callable[..., Any],
) -> None:
    """A replayed TOTP code on the same VM is refused from Redis and recorded as reused."""
    api: Api = await api_factory(redis_url=Secret(owned_redis.url))
    principal, vm = uid("hot"), uid("vm")
    token = await api.enroll(principal)
    body = {"vm_id": vm, "principal": principal, "otp": pyotp.TOTP(token["secret"]).at(api.clock.now)}
    status, first = await api.post("/v1/otp/verify", body)
    assert (status, first["decision"]) == (200, "accept")
    status, second = await api.post("/v1/otp/verify", body)
    assert (status, second["decision"], second["reason"]) == (200, "reject", "reused")
    assert decisions(api, "otp", "reused", "redis") == 1
    await api.runtime.appender.wait_idle()
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT decision, reason, payload->>'hot_cache' AS hot FROM ledger"
                                " WHERE kind = 'otp' AND subject = $1 ORDER BY seq", principal)
    assert [(r["decision"], r["reason"], r["hot"]) for r in rows] == [("accept", "ok", None),
                                                                     ("reject", "reused", "true")]


async def test_lockout_is_cached_in_redis(owned_redis: OwnedRedis, api_factory: Callable[..., Any]) -> None:
    """Once PostgreSQL locks a principal out, Redis refuses it (even the right code) until expiry."""
    api: Api = await api_factory(redis_url=Secret(owned_redis.url), lockout_threshold=3, lockout_period_s=300)
    principal, vm = uid("lock"), uid("vm")
    token = await api.enroll(principal)
    good = pyotp.TOTP(token["secret"]).at(api.clock.now)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    for _ in range(3):
        status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": wrong})
        assert (status, body["reason"]) == (200, "invalid")
    client = aioredis.from_url(owned_redis.url)
    try:
        assert await client.exists(f"rg:lock:{principal}") == 1
    finally:
        await client.aclose()
    status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": good})
    assert (status, body["decision"], body["reason"]) == (200, "reject", "locked_out")
    assert decisions(api, "otp", "locked_out", "redis") == 1
    await api.runtime.appender.wait_idle()
    async with api.runtime.pool.acquire() as conn:
        last = await conn.fetchrow("SELECT reason, payload->>'hot_cache' AS hot FROM ledger"
                                   " WHERE subject = $1 ORDER BY seq DESC LIMIT 1", principal)
    assert (last["reason"], last["hot"]) == ("locked_out", "true")
    # After the period the lock has expired everywhere, and the (unused) code is accepted.
    api.clock.advance(301)
    fresh = pyotp.TOTP(token["secret"]).at(api.clock.now)
    status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": fresh})
    assert (status, body["decision"]) == (200, "accept")


async def test_unlock_clears_the_lockout_cached_in_redis(owned_redis: OwnedRedis,
                                                       api_factory: Callable[..., Any]) -> None:
    """An admin unlock removes the Redis copy of the lockout, so the valid code is accepted at once."""
    api: Api = await api_factory(redis_url=Secret(owned_redis.url), lockout_threshold=2, lockout_period_s=3600)
    principal, vm = uid("unlock"), uid("vm")
    token = await api.enroll(principal)
    good = pyotp.TOTP(token["secret"]).at(api.clock.now)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    for _ in range(2):
        await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": wrong})
    status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": good})
    assert body["reason"] == "locked_out"
    status, body = await api.post(f"/v1/principals/{principal}/unlock", {"note": "n"}, role="admin")
    assert status == 200, body
    client = aioredis.from_url(owned_redis.url)
    try:
        assert await client.exists(f"rg:lock:{principal}") == 0
    finally:
        await client.aclose()
    status, body = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal, "otp": good})
    assert (status, body["decision"], body["reason"]) == (200, "accept", "ok"), body


@pytest.mark.slow
async def test_decisions_stay_correct_when_redis_stops_restarts_and_flushes(
    owned_redis: OwnedRedis, api_factory: Callable[..., Any],
) -> None:
    """Redis stopped, restarted empty or flushed: accept once, reuse refused by PostgreSQL."""
    api: Api = await api_factory(redis_url=Secret(owned_redis.url))
    vm, scope = uid("vm"), uid("scope")
    principal = uid("rd")
    totp = pyotp.TOTP((await api.enroll(principal))["secret"])
    assert await consume(api, vm, scope, "before") == ("accept", "ok")
    assert await consume(api, vm, scope, "before") == ("reject", "reused")
    assert decisions(api, "nonce", "reused", "redis") == 1

    # Redis goes away: PostgreSQL alone decides, /readyz says Redis is unavailable.
    await asyncio.to_thread(owned_redis.stop)
    assert await consume(api, vm, scope, "before") == ("reject", "reused")
    assert await consume(api, vm, scope, "during") == ("accept", "ok")
    assert await consume(api, vm, scope, "during") == ("reject", "reused")
    otp_body = {"vm_id": vm, "principal": principal, "otp": totp.at(api.clock.now)}
    assert (await api.post("/v1/otp/verify", otp_body))[1]["decision"] == "accept"
    assert (await api.post("/v1/otp/verify", otp_body))[1]["reason"] == "reused"
    assert decisions(api, "nonce", "reused", "ledger") == 2
    assert decisions(api, "nonce", "reused", "redis") == 1
    status, ready = await readyz(api)
    assert status == 503 and (ready["checks"]["ledger"], ready["checks"]["redis"]) == ("ok", "unavailable")

    # Redis returns empty: everything it forgot is still refused, by PostgreSQL.
    await asyncio.to_thread(owned_redis.start)
    await wait_redis_ready(api)
    for nonce in ("before", "during"):
        assert await consume(api, vm, scope, nonce) == ("reject", "reused")
    assert (await api.post("/v1/otp/verify", otp_body))[1]["reason"] == "reused"
    assert await consume(api, vm, scope, "after") == ("accept", "ok")
    assert await consume(api, vm, scope, "after") == ("reject", "reused")
    assert decisions(api, "nonce", "reused", "redis") == 2  # the hot cache works again

    # FLUSHALL mid-run: the same again.
    client = aioredis.from_url(owned_redis.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    ledger_before = decisions(api, "nonce", "reused", "ledger")
    for nonce in ("before", "during", "after"):
        assert await consume(api, vm, scope, nonce) == ("reject", "reused")
    assert decisions(api, "nonce", "reused", "ledger") == ledger_before + 3
    assert await consume(api, vm, scope, "flushed") == ("accept", "ok")
    assert await consume(api, vm, scope, "flushed") == ("reject", "reused")
    await api.runtime.appender.wait_idle()
    for nonce, accepts in (("before", 1), ("during", 1), ("after", 1), ("flushed", 1)):
        rows = await ledger_rows(api, nonce_digest(api.runtime.keys.pepper, scope, nonce.encode()))
        assert [d for d, _, _ in rows].count("accept") == accepts
        assert all(reason in ("ok", "reused") for _, reason, _ in rows)
