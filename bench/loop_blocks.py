#!/usr/bin/env python3
"""How long the leader's checkpoint check holds a worker's event loop in one go.

A serving worker re-verifies the entries since the last checkpoint before it signs one
(``LedgerService.checkpoint_if_due``); a decision that arrives meanwhile waits for the
check's current uninterrupted stretch. This creates its own database, appends ``--rows``
chained entries (``rg_append``), then runs the check ``--repeat`` times (forgetting the
checkpoint in between, so each run verifies every row) beside a probe task that does
nothing but yield. The probe's gaps, in this thread's **CPU time** (``time.thread_time``),
are the check's stretches between two turns of the loop: another process taking the
core does not lengthen them, so the figure holds on a busy, shared machine where wall
times do not. Prints the longest stretch, its 99th percentile and the check's CPU time
in the worker's thread (measured apart, without the probe): once with the chain checked
in the worker's child process, as a serving worker checks, and once on its own loop,
what it does when the child fails.

    .venv/bin/python bench/loop_blocks.py --rows 8000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

from replayguard.keys import Keys
from replayguard.services.chain_reader import ChainProcess
from replayguard.services.ledger import LedgerService


async def append(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "SELECT rg_append(1764900000000000 + g, 'nonce', 'vm-' || (g % 256), 'bench', sha256(int8send(g)),"
        " 'accept', 'ok', '{\"ttl_s\": 300, \"flags\": [], \"epoch\": 0, \"receipt\": \"absent\"}'::jsonb)"
        " FROM generate_series(1, $1) g", rows)
    await conn.close()


async def measure(dsn: str, rows: int, repeat: int, where: str) -> dict[str, object]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    keys = Keys(os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(32))
    chain = ChainProcess(dsn, 30_000) if where == "child" else None
    ledger = LedgerService(pool, keys, chain=chain, serving=True)
    if chain is not None:  # the child starts once per worker: leave its start out
        await ledger.checkpoint_if_due(int(time.time() * 1e6), 1, 10**12)
    gaps: list[float] = []

    async def probe(stop: asyncio.Event) -> None:
        last = time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0)
            now = time.thread_time()
            gaps.append(now - last)
            last = now

    async def check() -> None:
        await pool.execute("DELETE FROM checkpoints")
        result = await ledger.checkpoint_if_due(int(time.time() * 1e6), 1, 10**12)
        assert result is not None and not hasattr(result, "problem"), result

    for _ in range(repeat):  # beside the probe: the stretches
        done = asyncio.Event()
        task = asyncio.create_task(probe(done))
        await asyncio.sleep(0)
        await check()
        done.set()
        await task
    started = time.thread_time()
    for _ in range(repeat):  # alone (the probe spins while the check waits): the worker's CPU
        await check()
    cpu = time.thread_time() - started
    await pool.close()
    ledger.close()
    gaps.sort()
    return {"where": where, "rows": rows, "runs": repeat, "max_ms": round(gaps[-1] * 1000, 2),
            "p99_ms": round(gaps[int(0.99 * len(gaps))] * 1000, 2),
            "worker_cpu_ms_per_check": round(cpu * 1000 / repeat, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--rows", type=int, default=8000, help="entries since the last checkpoint (about 1 s at c=64)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    dsn = asyncio.run(run.create_database(args.pg_admin_url, "blocks"))
    try:
        with tempfile.TemporaryDirectory(prefix="rg-loop-blocks-") as data_dir:
            subprocess.run([sys.executable, "-m", "replayguard", "migrate", "--database-url", dsn,
                            "--data-dir", data_dir], check=True, capture_output=True)
        asyncio.run(append(dsn, args.rows))
        for where in ("child", "loop"):
            print(asyncio.run(measure(dsn, args.rows, args.repeat, where)))
    finally:
        asyncio.run(run.drop_database(args.pg_admin_url, dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
