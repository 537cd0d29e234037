"""Every kind of PostgreSQL session the service opens, for tests of what those sessions set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from replayguard.core.chain import GENESIS
from replayguard.pg import connections
from replayguard.services import chain_reader


@asynccontextmanager
async def service_sessions(dsn: str) -> AsyncIterator[tuple[list[asyncpg.Connection], int]]:
    """A connection of the service's pool, a one-off connection and the chain check child's
    session (the child run in this process), with how many entries the child checked: it
    checks the whole ledger first, finding nothing wrong, so its session is open."""
    pool = await connections.create_pool(dsn, size=2, statement_timeout_ms=30_000)
    one_off = await connections.connect(dsn)
    child = chain_reader._Child(dsn, 30_000)
    try:
        head = await one_off.fetchrow("SELECT seq, hash FROM ledger_head")
        result = await child.check({"start_seq": 0, "start_hash": GENESIS.hex(),
                                    "head_seq": head["seq"], "head_hash": bytes(head["hash"]).hex(), "pins": None})
        assert result.finding is None and child.conn is not None
        async with pool.acquire() as pooled:
            yield [pooled, one_off, child.conn], result.checked
    finally:
        await pool.close()
        await one_off.close()
        if child.conn is not None:
            await child.conn.close()


async def set_database_defaults(dsn: str, settings: dict[str, str]) -> None:
    """``ALTER DATABASE … SET name = value`` for each setting: defaults every later session
    of that database gets unless it sets its own."""
    admin = await asyncpg.connect(dsn)
    try:
        name = await admin.fetchval("SELECT current_database()")
        for setting, value in settings.items():
            await admin.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
    finally:
        await admin.close()
