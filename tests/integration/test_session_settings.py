"""The service's PostgreSQL sessions never JIT-compile a plan, whatever the database asks.

PostgreSQL compiles a plan with LLVM at each execution once its estimated cost passes
``jit_above_cost``; the state check's query passes it once the ledger holds a few million
entries and then costs several times its work (``replayguard/pg/session.py``). Here the
database asks for JIT on every plan (``jit_above_cost = 0``): a plain session compiles the
state check's query, and each kind of session the service opens does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from replayguard.pg import connections
from replayguard.services.state_check import _CHECK
from tests.integration.service_sessions import service_sessions, set_database_defaults
from tests.ledger_rows import append_nonces


async def _database_that_asks_for_jit(fresh_database: Callable[[], Any]) -> str:
    dsn: str = await fresh_database()
    admin = await asyncpg.connect(dsn)
    try:
        await append_nonces(admin, 1, 50)
    finally:
        await admin.close()
    await set_database_defaults(dsn, {"jit": "on", "jit_above_cost": "0"})
    return dsn


async def _compiled(conn: asyncpg.Connection) -> bool:
    """Whether running the state check's query over the 50 entries JIT-compiled its plan."""
    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_CHECK}", 0, 50, 0, "scope", 0)
    return "JIT" in json.loads(plan)[0]


async def test_no_session_of_the_service_compiles_a_plan_where_a_plain_one_does(
        fresh_database: Callable[[], Any]) -> None:
    """Differential: the database asks for JIT on every plan; a plain session compiles the
    state check's query (where the server has JIT), the pool's, a one-off connection's and
    the chain check child's sessions report ``jit = off`` and do not."""
    dsn = await _database_that_asks_for_jit(fresh_database)
    plain = await asyncpg.connect(dsn)
    try:
        assert await plain.fetchval("SHOW jit_above_cost") == "0"
        if await plain.fetchval("SELECT pg_jit_available()"):  # the control: JIT is there to be asked for
            assert await _compiled(plain)
    finally:
        await plain.close()

    async with service_sessions(dsn) as (sessions, checked):
        assert checked == 50
        for session in sessions:
            assert await session.fetchval("SHOW jit") == "off"
            assert not await _compiled(session)


async def test_a_connection_with_timeout_zero_waits_and_one_with_a_timeout_is_cancelled(
        fresh_database: Callable[[], Any]) -> None:
    """``connections.connect(statement_timeout_ms=0)`` means no timeout on the server and on the
    client (a statement of 1.2 s finishes, past the one-second margin the client adds); with
    300 ms the server cancels a statement of one second."""
    dsn = await fresh_database()
    unbounded = await connections.connect(dsn, statement_timeout_ms=0)
    try:
        assert await unbounded.fetchval("SHOW statement_timeout") == "0"
        await unbounded.execute("SELECT pg_sleep(1.2)")
    finally:
        await unbounded.close()
    bounded = await connections.connect(dsn, statement_timeout_ms=300)
    try:
        with pytest.raises(asyncpg.QueryCanceledError):
            await bounded.execute("SELECT pg_sleep(1)")
    finally:
        await bounded.close()
