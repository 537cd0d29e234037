"""A decision whose answer from PostgreSQL is lost: the service answers what the ledger holds.

The batch's connection goes half-open after the request was sent. The appender ends that
server session, looks the batch up by its id on a new connection and answers the decision
the ledger committed, or 503 "nothing was accepted" when it committed nothing, or a 503
saying the credential may have been used when it cannot find out (CONTRACT §3).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest_asyncio

from replayguard.core.credentials import nonce_digest
from replayguard.settings import Secret
from tests.conftest import Api, uid
from tests.integration.tcp_proxy import TcpProxy, proxied
from tests.waiting import until


@pytest_asyncio.fixture
async def through_proxy(api_factory: Callable[..., Any], database_url: str) -> AsyncIterator[tuple[Api, TcpProxy]]:
    async with proxied(database_url) as (proxy, dsn):
        api: Api = await api_factory(database_url=Secret(dsn), statement_timeout_ms=300)
        yield api, proxy


async def ledgered(api: Api, database_url: str, scope: str, nonce: str) -> list[str]:
    digest = nonce_digest(api.runtime.keys.pepper, scope, nonce.encode())
    conn = await asyncpg.connect(database_url)
    try:
        return [r["decision"] for r in await conn.fetch(
            "SELECT decision FROM ledger WHERE cred_digest = $1 ORDER BY seq", digest)]
    finally:
        await conn.close()


async def warm(api: Api, vm: str, scope: str) -> None:
    """One decision through the proxy (once the service serves them), so the appender holds
    a proxied connection, and the caller's token stays cached: first the token cache hears
    every token change committed so far (the tokens the test made: the LISTEN taking effect,
    and each change heard, drops what the cache read), else a request sent once the proxy
    froze would have to read its token, and would stop at that read."""
    tokens, start = api.runtime.api_tokens, time.monotonic()
    await until(lambda: tokens.listening_now and tokens._heard_until > start, "the token cache to hear every change")

    async def accepted() -> bool:
        status, answer = await api.post("/v1/nonces/consume", {"vm_id": vm, "scope": scope, "nonce": uid("warm")})
        return status == 200 and answer["decision"] == "accept"

    await until(accepted, "a first decision")


async def decided(api: Api, body: dict[str, Any]) -> dict[str, Any] | None:
    """The answer once the service decides again: the pool's other connections were frozen
    too, and each fails (503) once before it is replaced."""
    status, answer = await api.post("/v1/nonces/consume", body)
    return answer if status == 200 else None


async def test_a_committed_decision_whose_answer_was_lost_is_answered(
        through_proxy: tuple[Api, TcpProxy], database_url: str) -> None:
    """PostgreSQL commits the accept and its answer never arrives: the guest gets the accept
    the ledger holds (not a 503 while the nonce is spent), and a retry is ``reused``."""
    api, proxy = through_proxy
    vm, scope = uid("vm"), uid("scope")
    await warm(api, vm, scope)
    body = {"vm_id": vm, "scope": scope, "nonce": uid("lost")}
    assert proxy.freeze(replies_only=True) >= 1
    status, first = await api.post("/v1/nonces/consume", body)
    assert status == 200, first
    assert (first["decision"], first["reason"]) == ("accept", "ok"), first
    assert await ledgered(api, database_url, scope, body["nonce"]) == ["accept"]
    retry = await until(lambda: decided(api, body), "the retry to be decided", timeout=120)
    assert (retry["decision"], retry["reason"]) == ("reject", "reused"), retry
    assert retry["seq"] > first["seq"]


async def test_a_decision_that_never_reached_the_ledger_is_a_503_and_consumes_nothing(
        through_proxy: tuple[Api, TcpProxy], database_url: str) -> None:
    """The request is lost on its way: the answer is 503 "nothing was accepted", which is
    true: the ledger holds nothing for the nonce and the retry is accepted."""
    api, proxy = through_proxy
    vm, scope = uid("vm"), uid("scope")
    await warm(api, vm, scope)
    body = {"vm_id": vm, "scope": scope, "nonce": uid("lost")}
    assert proxy.freeze() >= 1
    status, first = await api.post("/v1/nonces/consume", body)
    assert status == 503 and first["error"]["code"] == "unavailable", first
    assert "nothing was accepted" in first["error"]["message"], first
    assert await ledgered(api, database_url, scope, body["nonce"]) == []
    retry = await until(lambda: decided(api, body), "the retry to be decided", timeout=120)
    assert (retry["decision"], retry["reason"]) == ("accept", "ok"), retry


async def test_a_lost_answer_that_cannot_be_checked_says_the_credential_may_be_used(
        api_factory: Callable[..., Any], database_url: str) -> None:
    """The answer is lost and no new connection gets through either: the 503 does not claim
    that nothing was accepted; it says the credential may have been used."""
    async with proxied(database_url) as (proxy, dsn):
        api: Api = await api_factory(database_url=Secret(dsn), statement_timeout_ms=300)
        vm, scope = uid("vm"), uid("scope")
        await warm(api, vm, scope)
        body = {"vm_id": vm, "scope": scope, "nonce": uid("lost")}
        proxy.freeze_new = True
        assert proxy.freeze(replies_only=True) >= 1
        status, first = await api.post("/v1/nonces/consume", body)
    assert status == 503 and first["error"]["code"] == "unavailable", first
    assert "nothing was accepted" not in first["error"]["message"], first
    assert "may have been used" in first["error"]["message"], first
    assert await ledgered(api, database_url, scope, body["nonce"]) == ["accept"]
