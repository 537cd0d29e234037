"""Redis down, restarted or flushed: the service decides exactly as PostgreSQL says.

Against a Redis the test owns. Redis carries only the alert fan-out; /readyz reports it.
The differential test of a Redis that lies is tests/integration/test_hostile_cache.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pyotp
import pytest
import redis.asyncio as aioredis

from replayguard.core.credentials import nonce_digest
from replayguard.settings import Secret
from tests.conftest import Api, uid
from tests.integration.owned_servers import OwnedRedis


def decisions(api: Api, kind: str, reason: str) -> float:
    """The value of replayguard_decisions_total for one label set (0 when never seen)."""
    labels = {"kind": kind, "decision": "accept" if reason == "ok" else "reject", "reason": reason}
    return api.runtime.metrics.registry.get_sample_value("replayguard_decisions_total", labels) or 0.0


async def consume(api: Api, vm: str, scope: str, nonce: str) -> tuple[str, str]:
    status, body = await api.post("/v1/nonces/consume", {"vm_id": vm, "scope": scope, "nonce": nonce})
    assert status == 200, body
    return body["decision"], body["reason"]


async def ledger_rows(api: Api, digest: bytes) -> list[tuple[str, str]]:
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT decision, reason FROM ledger WHERE cred_digest = $1 ORDER BY seq", digest)
    return [(r["decision"], r["reason"]) for r in rows]


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


async def test_unlock_with_redis_configured_accepts_the_valid_code_at_once(
    owned_redis: OwnedRedis, api_factory: Callable[..., Any],
) -> None:
    """With Redis configured, an admin unlock (in PostgreSQL, where
    the lockout lives) lets the valid code through at once."""
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

    # Redis goes away: PostgreSQL alone decides, /readyz says Redis is unavailable.
    await asyncio.to_thread(owned_redis.stop)
    assert await consume(api, vm, scope, "before") == ("reject", "reused")
    assert await consume(api, vm, scope, "during") == ("accept", "ok")
    assert await consume(api, vm, scope, "during") == ("reject", "reused")
    otp_body = {"vm_id": vm, "principal": principal, "otp": totp.at(api.clock.now)}
    assert (await api.post("/v1/otp/verify", otp_body))[1]["decision"] == "accept"
    assert (await api.post("/v1/otp/verify", otp_body))[1]["reason"] == "reused"
    assert decisions(api, "nonce", "reused") == 3
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

    # FLUSHALL mid-run: the same again.
    client = aioredis.from_url(owned_redis.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    before = decisions(api, "nonce", "reused")
    for nonce in ("before", "during", "after"):
        assert await consume(api, vm, scope, nonce) == ("reject", "reused")
    assert decisions(api, "nonce", "reused") == before + 3
    assert await consume(api, vm, scope, "flushed") == ("accept", "ok")
    assert await consume(api, vm, scope, "flushed") == ("reject", "reused")
    for nonce, accepts in (("before", 1), ("during", 1), ("after", 1), ("flushed", 1)):
        rows = await ledger_rows(api, nonce_digest(api.runtime.keys.pepper, scope, nonce.encode()))
        assert [d for d, _ in rows].count("accept") == accepts
        assert all(reason in ("ok", "reused") for _, reason in rows)
