"""Fail closed: with the ledger's database down nothing is accepted, and it comes back alone.

The test owns its PostgreSQL (an embedded server in its own directory), stops it abruptly
under a running service, and starts it again on the same data and socket.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.core.credentials import nonce_digest
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid
from tests.integration.db_restore import refusing_sessions
from tests.integration.owned_servers import OwnedPostgres

ATTEMPTS = 5


async def _wait_ready(api: Api, timeout: float = 30) -> None:
    """Polls /readyz until it answers 200; the timeout only bounds a failing test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await api.client.get("/readyz")
        if resp.status == 200:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the service did not become ready again")


def _assert_unavailable(status: int, body: Any) -> None:
    assert status == 503, body
    assert set(body) == {"error"}
    assert body["error"]["code"] == "unavailable"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert set(body["error"]) <= {"code", "message", "field"}


@pytest.mark.slow
async def test_database_down_fails_closed_and_recovers(
    owned_pg: OwnedPostgres, api_factory: Callable[..., Any],
) -> None:
    """With PostgreSQL down decisions are 503 and nothing is accepted; it recovers unaided."""
    clock = FakeClock()
    api: Api = await api_factory(clock=clock, database_url=Secret(owned_pg.url))
    principal, vm, scope, nonce = uid("fc"), uid("vm"), uid("scope"), uid("nonce")
    token = await api.enroll(principal)
    totp = pyotp.TOTP(token["secret"])
    status, first = await api.post("/v1/otp/verify", {"vm_id": vm, "principal": principal,
                                                      "otp": totp.at(clock.now)})
    assert (status, first["decision"]) == (200, "accept")
    clock.advance(30)
    code = totp.at(clock.now)
    otp_body = {"vm_id": vm, "principal": principal, "otp": code}
    nonce_body = {"vm_id": vm, "scope": scope, "nonce": nonce}

    await asyncio.to_thread(owned_pg.stop)
    for _ in range(ATTEMPTS):
        _assert_unavailable(*await api.post("/v1/otp/verify", otp_body))
        _assert_unavailable(*await api.post("/v1/nonces/consume", nonce_body))
    resp = await api.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["ledger"] == "unavailable"

    await asyncio.to_thread(owned_pg.start)
    await _wait_ready(api)
    # Neither credential was consumed while the ledger was down: each is accepted once now.
    status, accepted = await api.post("/v1/otp/verify", otp_body)
    assert (status, accepted["decision"], accepted["reason"]) == (200, "accept", "ok")
    status, again = await api.post("/v1/otp/verify", otp_body)
    assert (status, again["decision"], again["reason"]) == (200, "reject", "reused")
    status, consumed = await api.post("/v1/nonces/consume", nonce_body)
    assert (status, consumed["decision"], consumed["reason"]) == (200, "accept", "ok")
    status, replayed = await api.post("/v1/nonces/consume", nonce_body)
    assert (status, replayed["decision"], replayed["reason"]) == (200, "reject", "reused")

    async with api.runtime.pool.acquire() as conn:
        otp_accepts = await conn.fetchval(
            "SELECT count(*) FROM ledger WHERE kind = 'otp' AND subject = $1 AND decision = 'accept'", principal)
        nonce_rows = await conn.fetch(
            "SELECT decision FROM ledger WHERE cred_digest = $1 ORDER BY seq",
            nonce_digest(api.runtime.keys.pepper, scope, nonce.encode()))
    assert otp_accepts == 2
    assert [r["decision"] for r in nonce_rows] == ["accept", "reject"]


@pytest.mark.slow
async def test_database_down_at_rest_then_back_keeps_deciding(
    owned_pg: OwnedPostgres, api_factory: Callable[..., Any],
) -> None:
    """A pool whose every connection died while idle serves decisions again after recovery."""
    api: Api = await api_factory(database_url=Secret(owned_pg.url), db_pool_size=4)
    scope = uid("scope")
    # Fill the pool with idle connections, which the restart will all invalidate.
    answers = await asyncio.gather(*(api.post("/v1/nonces/consume", {"vm_id": "v", "scope": scope,
                                                                     "nonce": f"n{i}"}) for i in range(8)))
    assert all(body["decision"] == "accept" for _, body in answers)
    await asyncio.to_thread(owned_pg.stop)
    await asyncio.to_thread(owned_pg.start)
    await _wait_ready(api)
    answers = await asyncio.gather(*(api.post("/v1/nonces/consume", {"vm_id": "v", "scope": scope,
                                                                     "nonce": f"n{i}"}) for i in range(16)))
    outcomes = sorted((status, body.get("reason")) for status, body in answers)
    assert outcomes == sorted([(200, "reused")] * 8 + [(200, "ok")] * 8), outcomes


@pytest.mark.slow
async def test_known_replay_is_not_answered_from_redis_while_the_ledger_is_down(
    owned_pg: OwnedPostgres, api_factory: Callable[..., Any],
) -> None:
    """While the ledger fails, even a replay seen before with Redis
    configured is answered 503, never an unrecorded reject."""
    from tests.conftest import REDIS_URL

    api: Api = await api_factory(database_url=Secret(owned_pg.url), redis_url=Secret(REDIS_URL))
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("nonce")}
    status, first = await api.post("/v1/nonces/consume", body)
    assert (status, first["decision"]) == (200, "accept")
    status, again = await api.post("/v1/nonces/consume", body)
    assert (status, again["decision"], again["seq"]) == (200, "reject", first["seq"] + 1)

    await asyncio.to_thread(owned_pg.stop)
    other = {**body, "nonce": uid("nonce")}
    _assert_unavailable(*await api.post("/v1/nonces/consume", other))  # the ledger is seen failing
    for _ in range(ATTEMPTS):
        _assert_unavailable(*await api.post("/v1/nonces/consume", body))
    await asyncio.to_thread(owned_pg.start)
    await _wait_ready(api)
    status, after = await api.post("/v1/nonces/consume", body)
    assert (status, after["decision"], after["reason"]) == (200, "reject", "reused")
    assert isinstance(after["seq"], int)  # written to the ledger


def _fatal_admin_shutdown() -> bytes:
    fields = (b"SFATAL\x00VFATAL\x00C57P01\x00"
              b"Mterminating connection due to administrator command\x00\x00")
    return b"E" + struct.pack("!i", len(fields) + 4) + fields


def _idle_pool_connections(api: Api) -> list[Any]:
    pool = api.runtime.pool
    return [h._con for h in pool._holders if h._con is not None and h._in_use is None and not h._con.is_closed()]


async def test_a_backend_terminated_under_an_idle_pool_connection_is_a_503_not_a_500(api: Api) -> None:
    """A decision request whose bearer token is read on a pool connection the server just
    terminated (its FATAL received, its close not yet seen) is answered 503 unavailable, never
    500. A background duty may hold a connection while the idle ones are poisoned and hand it
    back for the token read (then the answer is a decision): the request is sent again, with
    a new token, until one read met a terminated connection."""
    answers = []
    for _ in range(20):
        _, token = await api.runtime.api_tokens.create("callout", uid("fresh"))  # not cached: read from the database
        idle = _idle_pool_connections(api)
        assert idle, "the pool has idle connections"
        for conn in idle:
            conn._protocol.data_received(_fatal_admin_shutdown())
        try:
            resp = await api.client.post("/v1/nonces/consume",
                                         json={"vm_id": uid("vm"), "scope": "term", "nonce": uid()},
                                         headers={"Authorization": f"Bearer {token}"})
            body = await resp.json()
        finally:
            for conn in idle:
                conn.terminate()  # the close that follows the FATAL
        answers.append((resp.status, body.get("error", {}).get("code")))
        assert answers[-1] in ((200, None), (503, "unavailable")), (resp.status, body)
        if resp.status == 503:
            break
    assert answers[-1] == (503, "unavailable"), answers


async def test_a_database_that_refuses_sessions_is_a_503_not_a_500(
        api_factory: Callable[..., Any], database_url: str) -> None:
    """The server is up but the database takes no session (``ALLOW_CONNECTIONS false``, as
    while a restore or a copy of it runs: "not currently accepting connections"): requests
    that need a new pool connection are answered 503 ``unavailable``, never 500, and nothing
    is accepted; the service answers again once the database takes sessions."""
    api: Api = await api_factory(database_url=Secret(database_url))
    assert (await api.get("/v1/alerts"))[0] == 200
    async with refusing_sessions(database_url):
        for _ in range(3):  # the pool's connections were ended: each request needs a new one
            _assert_unavailable(*await api.get("/v1/alerts"))
            _assert_unavailable(*await api.post("/v1/nonces/consume",
                                                {"vm_id": uid("vm"), "scope": "refused", "nonce": uid()}))
    await _wait_ready(api)
    status, body = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "refused", "nonce": uid()})
    assert status == 200 and body["decision"] == "accept", body
