"""bench/floor_app.py's durable floor, on a real database: an answer only after its row is committed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg

from replayguard.pg.schema import migrate_dsn
from tests.bench_scripts import load


async def test_each_answer_of_the_durable_floor_follows_its_own_commit(fresh_database: Callable[[], Any]) -> None:
    """Every answer of the durable floor echoes its X-Request-Id and says ``ok``, and by then its
    decision-shaped row (a ``bench_ledger`` and a ``bench_spent`` row) is committed: one row of each
    per request, counted from another connection. The HTTP floor, without a database, echoes the
    id as well and commits nothing."""
    run = load("run", "bench_run_floor")
    dsn = await fresh_database()
    await migrate_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        for db in ((dsn, "2"), ()):
            with run.floor_app(*db) as (_proc, port):
                async with aiohttp.ClientSession() as http:
                    for k in range(5):
                        async with http.post(f"http://127.0.0.1:{port}/v1/nonces/consume", json={"nonce": k},
                                             headers={"X-Request-Id": f"floor-{k}"}) as answer:
                            assert answer.status == 200
                            assert answer.headers["X-Request-Id"] == f"floor-{k}"
                            assert (await answer.json())["reason"] == "ok"
                        if db:
                            assert await conn.fetchval("SELECT count(*) FROM bench_ledger") == k + 1
                            assert await conn.fetchval("SELECT count(*) FROM bench_spent") == k + 1
        assert await conn.fetchval("SELECT count(*) FROM bench_ledger") == 5  # the HTTP floor added none
    finally:
        await conn.close()
