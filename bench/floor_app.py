#!/usr/bin/env python3
"""The floors: the cheapest aiohttp handler for a decision-shaped POST, with or without a commit.

``bench/run.py`` starts it beside the service and drives it with the same wrk, Python and
uvloop, so every run also measures what this machine charges before any of replayguard's
own code runs:

- the **HTTP floor** (no database): the framework and the system calls. The service's CPU
  per decision divided by this floor's CPU per request is comparable across machines and
  runs, where decisions per second are not (bench/README.md, "the HTTP floor");
- the **durable floor** (with a database URL): each request also commits the per-row
  baseline's ledger-shaped row (``bench/ledger_row.py``) in a transaction of its own, on
  one of ``CONNECTIONS`` connections, before it is answered: the plainest service that
  answers over HTTP only after a commit. Where it misses a latency target on a machine,
  the hops and the commit around a decision miss it there, whatever the decision costs.
  It commits once a request, where replayguard's group commit shares a commit between
  the requests that wait together.

Both echo the request's ``X-Request-Id`` and answer ``"reason":"ok"``, so
``bench/decisions.lua`` times their answers as it times the service's.

Usage: floor_app.py PORT [DATABASE_URL CONNECTIONS]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledger_row import BASELINE_DDL, PAYLOAD, ROW_SQL  # bench/ledger_row.py, beside this file

BODY = (b'{"decision":"accept","reason":"ok","flags":[],"seq":1,'
        b'"receipt":"rg1.eyJ2bSI6InZtLTEiLCJzZXEiOjEsImVwIjowfQ.c2lnbmF0dXJl"}')


def handler(commit: Callable[[], Awaitable[None]] | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def decide(request: web.Request) -> web.Response:
        await request.read()
        if commit is not None:
            await commit()
        headers = {"X-Request-Id": rid} if (rid := request.headers.get("X-Request-Id")) else None
        return web.Response(body=BODY, content_type="application/json", headers=headers)
    return decide


async def durable(dsn: str, connections: int) -> tuple[asyncpg.Pool, Callable[[], Awaitable[None]]]:
    """A pool and the commit of one ledger-shaped row on it (autocommit: one round trip)."""
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections,
                                     server_settings={"synchronous_commit": "on"})
    assert pool is not None  # create_pool returns the pool when awaited
    await pool.execute(BASELINE_DDL)
    seq = [await pool.fetchval("SELECT coalesce(max(seq), 0) FROM bench_ledger")]

    async def commit() -> None:
        seq[0] += 1
        n, now = seq[0], int(time.time() * 1e6)
        await pool.execute(ROW_SQL, os.urandom(32), f"vm-{n % 256}", n, now, PAYLOAD, os.urandom(32), os.urandom(32))
    return pool, commit


async def serve(port: int, dsn: str | None, connections: int) -> None:
    pool, commit = await durable(dsn, connections) if dsn else (None, None)
    app = web.Application()
    app.router.add_post("/v1/nonces/consume", handler(commit))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        if pool is not None:
            await pool.close()


def main() -> None:
    port = int(sys.argv[1])
    dsn, connections = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else (None, 0)
    uvloop.run(serve(port, dsn, connections))


if __name__ == "__main__":
    main()
