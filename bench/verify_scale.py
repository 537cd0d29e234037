#!/usr/bin/env python3
"""What a whole-ledger verification costs as signed checkpoints pile up.

A checkpoint is signed at most once a second under load and once a minute otherwise
(``checkpoint_interval_s``), so a quiet deployment keeps about one checkpoint per entry
and a busy one one per thousands. This creates its own database, appends ``--rows``
chained entries (``rg_append``), signs a checkpoint over every ``--every``-th one with the
service's key, and runs ``LedgerService.verify`` (the chain and its checkpoints; the
state pass is left out, as its cost does not depend on them) in a fresh process per
measurement, ``--repeat`` times each, alternating:

- ``cli``: in process, the way ``replayguard ledger verify`` checks;
- ``api``: on a serving worker with its chain child, the way ``GET /v1/ledger/verify``
  checks;

once over the ledger with its checkpoints and once over the same ledger with the
checkpoints moved aside (the baseline: the chain alone). Prints, per measurement, wall
time, CPU (the process and its children) and the peak RSS of the process tree, then the
ratios with checkpoints to without.

    .venv/bin/python bench/verify_scale.py --rows 100000 --every 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loop_blocks
import run

from replayguard.core import checkpoints as cps
from replayguard.keys import Keys
from replayguard.services.chain_reader import ChainProcess
from replayguard.services.ledger import LedgerService

KEYS = Keys(*(bytes([n]) * 32 for n in range(11, 15)))
_TS = 1764900000000000


async def build(dsn: str, rows: int, every: int) -> int:
    """Appends the entries (as ``bench/loop_blocks.py`` does) and signs the checkpoints;
    returns how many were signed."""
    await loop_blocks.append(dsn, rows)
    conn = await asyncpg.connect(dsn)
    key = KEYS.signing_key()
    records = []
    for seq, digest in await conn.fetch("SELECT seq, hash FROM ledger WHERE seq % $1 = 0 ORDER BY seq", every):
        cp = cps.sign(key, seq, bytes(digest), _TS + seq)
        records.append((cp.seq, cp.hash, cp.ts_us, cp.key_id, cp.signature))
    await conn.copy_records_to_table("checkpoints", records=records)
    await conn.execute("CREATE TABLE checkpoints_aside (LIKE checkpoints)")
    await conn.execute("VACUUM ANALYZE")
    await conn.close()
    return len(records)


async def set_checkpoints(dsn: str, present: bool) -> None:
    """Moves the checkpoints into the table verification reads, or aside."""
    conn = await asyncpg.connect(dsn)
    source, target = ("checkpoints_aside", "checkpoints") if present else ("checkpoints", "checkpoints_aside")
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {target} SELECT * FROM {source}")
        await conn.execute(f"DELETE FROM {source}")
    await conn.close()


async def verify_once(dsn: str, where: str) -> dict[str, object]:
    """One verification, in this (fresh) process."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    chain = ChainProcess(dsn, 600_000) if where == "api" else None
    ledger = LedgerService(pool, KEYS, 300, chain, serving=where == "api")
    started = time.perf_counter()
    report = await ledger.verify()
    wall = time.perf_counter() - started
    ledger.close()
    await pool.close()
    return {"ok": report.ok, "checked": report.checked, "checkpoints_checked": report.checkpoints,
            "wall_s": round(wall, 3)}


def measure(dsn: str, where: str) -> dict[str, object]:
    """``verify_once`` in a child process; its CPU and its tree's peak RSS."""
    proc = subprocess.Popen([sys.executable, __file__, "--one", where, "--dsn", dsn], stdout=subprocess.PIPE)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"the measurement failed (exit {proc.returncode})")
    result = json.loads(out)
    # The chain child (api) is killed at close and may be reaped after its parent exits:
    # its CPU is counted only when it was reaped, so the api rows' CPU is the worker's.
    result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    result["peak_rss_mb"] = round(peak[0] / 2**20, 1)
    return dict(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--rows", type=int, default=100_000, help="ledger entries")
    p.add_argument("--every", type=int, default=1, help="a checkpoint over every N-th entry (1: a quiet deployment)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--one", choices=("cli", "api"), help=argparse.SUPPRESS)
    p.add_argument("--dsn", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(verify_once(args.dsn, args.one))))
        return 0
    dsn = asyncio.run(run.create_database(args.pg_admin_url, "verify"))
    try:
        with tempfile.TemporaryDirectory(prefix="rg-verify-scale-") as data_dir:
            subprocess.run([sys.executable, "-m", "replayguard", "migrate", "--database-url", dsn,
                            "--data-dir", data_dir], check=True, capture_output=True)
        signed = asyncio.run(build(dsn, args.rows, args.every))
        print(f"{args.rows:,} entries, {signed:,} signed checkpoints")
        results: dict[tuple[str, bool], list[dict[str, object]]] = {}
        for n in range(args.repeat):
            for present in (True, False) if n % 2 == 0 else (False, True):
                asyncio.run(set_checkpoints(dsn, present))
                for where in ("cli", "api"):
                    result = measure(dsn, where)
                    results.setdefault((where, present), []).append(result)
                    label = "with checkpoints" if present else "chain alone"
                    print(f"  {where:3} {label:17} {result}", flush=True)
        wrong = [r for (_, present), rs in results.items() for r in rs
                 if not r["ok"] or r["checked"] != args.rows or r["checkpoints_checked"] != (signed if present else 0)]
        if wrong:
            print(f"a verification did not find the ledger whole and pinned: {wrong[0]}")
            return 1
        print("median of each: wall s, CPU s, peak RSS MB; ratio with checkpoints / chain alone")
        for where in ("cli", "api"):
            figures = {present: [round(statistics.median(float(str(r[k])) for r in results[(where, present)]), 2)
                                 for k in ("wall_s", "cpu_s", "peak_rss_mb")] for present in (True, False)}
            ratio = [round(a / b, 2) if b else None for a, b in zip(figures[True], figures[False], strict=True)]
            print(f"  {where:3} with {figures[True]} alone {figures[False]} ratio {ratio}")
    finally:
        asyncio.run(run.drop_database(args.pg_admin_url, dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
