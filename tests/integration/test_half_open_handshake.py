"""Opening a session into a half-open network fails within the client timeout.

A network can go half-open while a connection is being opened, or before: the TCP
connection is made but the startup, TLS or authentication messages never get an answer.
asyncpg then waits its default minute. Each kind of session the service opens bounds the
handshake like one call on the session (``session.connect_timeout_s``), so a pool acquire,
the alert feed's reconnect or the chain check's child fails and retries instead of holding
its caller. The guard below is far above that bound and far below asyncpg's minute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from replayguard.core.chain import GENESIS
from replayguard.errors import Unavailable
from replayguard.pg import connections
from replayguard.pg.session import connect_timeout_s
from replayguard.services import chain_reader
from tests.integration.tcp_proxy import proxied

TIMEOUT_MS = 500
GUARD_S = 30.0


async def _failure(attempt: Awaitable[Any]) -> BaseException:
    """What ``attempt`` raised; fails the test if it was still waiting after ``GUARD_S``."""
    task = asyncio.ensure_future(attempt)
    done, _ = await asyncio.wait({task}, timeout=GUARD_S)
    if not done:
        task.cancel()
        pytest.fail(f"still opening the session after {GUARD_S} s: the handshake is not bounded")
    exc = task.exception()
    assert exc is not None, "the session opened through a network that answers nothing"
    return exc


def test_the_handshake_is_bounded_like_one_call() -> None:
    """As long as one call on the session; asyncpg's minute only where calls have no timeout."""
    assert connect_timeout_s(TIMEOUT_MS) == 1.5
    assert connect_timeout_s(0) == 60.0


async def test_a_one_off_connection_into_a_half_open_network_times_out(database_url: str) -> None:
    """``connections.connect`` (the alert feed's own connection) gives up on a silent handshake."""
    async with proxied(database_url) as (proxy, dsn):
        proxy.freeze_new = True
        exc = await _failure(connections.connect(dsn, statement_timeout_ms=TIMEOUT_MS))
        assert isinstance(exc, TimeoutError)


async def test_a_pool_acquire_that_opens_a_connection_into_a_half_open_network_fails_closed(
        database_url: str) -> None:
    """The pool opens a second connection while the first is in use: the silent handshake
    becomes ``Unavailable`` (a 503) and the pool keeps working once the network answers."""
    async with proxied(database_url) as (proxy, dsn):
        pool = await connections.create_pool(dsn, size=2, statement_timeout_ms=TIMEOUT_MS)
        try:
            async with connections.acquire(pool) as held:
                proxy.freeze_new = True

                async def second() -> None:
                    async with connections.acquire(pool):
                        pass

                assert isinstance(await _failure(second()), Unavailable)
                proxy.freeze_new = False
                async with connections.acquire(pool) as other:
                    assert await other.fetchval("SELECT 1") == 1
                assert await held.fetchval("SELECT 1") == 1
        finally:
            await pool.close()


async def test_the_chain_checks_child_gives_up_on_a_silent_handshake(database_url: str) -> None:
    """The chain check's child fails its check (the worker then checks itself)."""
    async with proxied(database_url) as (proxy, dsn):
        proxy.freeze_new = True
        child = chain_reader._Child(dsn, TIMEOUT_MS)
        request = {"start_seq": 0, "start_hash": GENESIS.hex(), "head_seq": 0, "head_hash": GENESIS.hex(),
                   "pins": None}
        exc = await _failure(child.check(request))
        assert isinstance(exc, chain_reader.ChildFailed) and "TimeoutError" in str(exc)
