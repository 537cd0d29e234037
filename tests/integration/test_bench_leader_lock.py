"""bench/run.py's ``leader_lock``: the benchmark holds the lock the service leads by, so the
service it measures runs none of the leader's duties (``--follower``, bench/service_cpu.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg

from replayguard.services import alertfeed
from tests.bench_scripts import load


async def test_the_lock_is_held_in_the_database_given_until_the_block_ends(fresh_database: Callable[[], Any]) -> None:
    """Inside the block no other session takes the alert feed's leader lock in that database,
    another database's lock stays free, and once the block ends the lock can be taken."""
    run = load("run", "bench_run_leader_lock")
    dsn, other_dsn = await fresh_database(), await fresh_database()
    conn, other = await asyncpg.connect(dsn), await asyncpg.connect(other_dsn)
    take = "SELECT pg_try_advisory_lock($1)"
    try:
        with run.leader_lock(dsn):
            assert await conn.fetchval(take, alertfeed._LEADER_LOCK) is False
            assert await other.fetchval(take, alertfeed._LEADER_LOCK) is True
        for _ in range(100):  # the holder's session ends with its process
            if await conn.fetchval(take, alertfeed._LEADER_LOCK):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the leader lock was still held after the block")
    finally:
        await conn.close()
        await other.close()
