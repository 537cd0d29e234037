"""The database's defaults are not the service's: its sessions pin the isolation and lock wait
their transactions rely on.

``rg_decide`` relies on READ COMMITTED: it waits for the head lock and then reads the
state the previous holder committed. A database or role whose default is REPEATABLE READ
or SERIALIZABLE (some sites set it everywhere) makes that wait end in a serialization
failure whenever two appenders (workers, instances) meet at the head, and a default
``lock_timeout`` cancels the wait outright: each answered 503 for no fault of the ledger.
Every session the service opens sets ``default_transaction_isolation = 'read committed'``
and ``lock_timeout = 0`` (``statement_timeout_ms`` still bounds every statement). A database
that ends idle sessions needs nothing pinned: a session the server ended is replaced before
its next use.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg

from replayguard.settings import Secret
from tests.conftest import uid
from tests.integration.service_sessions import service_sessions, set_database_defaults

RACERS = 120


async def _database_with_strict_defaults(fresh_database: Callable[[], Any]) -> str:
    dsn: str = await fresh_database()
    await set_database_defaults(dsn, {"default_transaction_isolation": "serializable", "lock_timeout": "1ms"})
    return dsn


async def test_every_session_reads_committed_and_waits_for_locks(fresh_database: Callable[[], Any]) -> None:
    """Differential: the database defaults to SERIALIZABLE and a 1 ms lock timeout; a plain session
    gets them, and the pool's, a one-off connection's and the chain check child's sessions do not."""
    dsn = await _database_with_strict_defaults(fresh_database)
    plain = await asyncpg.connect(dsn)
    try:  # the control: the database's defaults reach a session that does not set its own
        assert await plain.fetchval("SHOW transaction_isolation") == "serializable"
        assert await plain.fetchval("SHOW lock_timeout") == "1ms"
    finally:
        await plain.close()
    async with service_sessions(dsn) as (sessions, _):
        for session in sessions:
            assert await session.fetchval("SHOW transaction_isolation") == "read committed"
            assert await session.fetchval("SHOW lock_timeout") == "0"


async def test_two_appenders_racing_under_strict_database_defaults_answer_every_request(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Two instances (two appenders meeting at the head lock) on a database that defaults to
    SERIALIZABLE and a 1 ms lock timeout: 120 fresh nonces at once are all accepted, none 503,
    and a nonce raced across both is accepted exactly once."""
    dsn = await _database_with_strict_defaults(fresh_database)
    one = await api_factory(database_url=Secret(dsn))
    other = await api_factory(database_url=Secret(dsn))
    scope = uid("scope")
    fresh = [(one if i % 2 else other).post("/v1/nonces/consume",
                                            {"vm_id": f"vm-{i % 8}", "scope": scope, "nonce": f"n-{i}"})
             for i in range(RACERS)]
    raced = [(one if i % 2 else other).post("/v1/nonces/consume",
                                            {"vm_id": f"vm-{i % 8}", "scope": scope, "nonce": "shared"})
             for i in range(16)]
    answers = await asyncio.gather(*fresh, *raced)
    statuses = Counter(status for status, _ in answers)
    assert statuses == {200: RACERS + 16}, statuses
    assert all(body["decision"] == "accept" for _, body in answers[:RACERS])
    assert Counter(body["reason"] for _, body in answers[RACERS:]) == {"ok": 1, "reused": 15}


async def test_a_database_that_ends_idle_sessions_does_not_fail_the_next_decision(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """The database ends sessions idle for 300 ms (``idle_session_timeout``): after a quiet
    second the next decisions, on the appender's kept session and the pool's, are answered."""
    dsn: str = await fresh_database()
    await set_database_defaults(dsn, {"idle_session_timeout": "300ms"})
    api = await api_factory(database_url=Secret(dsn))
    scope = uid("scope")
    backends = set()
    for round_ in range(3):
        status, body = await api.post("/v1/nonces/consume",
                                      {"vm_id": "vm-idle", "scope": scope, "nonce": f"n-{round_}"})
        assert (status, body.get("decision")) == (200, "accept"), body
        backends.add((await api.runtime.appender._conn.get()).get_server_pid())
        status, page = await api.get("/v1/vms?limit=5")
        assert status == 200, page
        await asyncio.sleep(1.0)
    assert len(backends) == 3  # the control: each quiet second ended the appender's session
