"""Analyst query latency at size: seeds a ledger of ``--entries`` rows (default one
million, chained correctly by a plpgsql loop) plus alerts, then prints p50/p99 over HTTP
of the alert list, alert detail, VM timeline and ledger listing — and the same against a
small baseline database, as a ratio. The indexes should keep every ratio near 1.

    .venv/bin/python bench/analyst_queries.py --entries 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replayguard import logging as rglog
from replayguard.core import checkpoints as cps
from replayguard.http.app import create_app
from replayguard.http.state import RUNTIME
from replayguard.keys import load_keys
from replayguard.pg import connections, schema
from replayguard.settings import Secret, Settings

ADMIN = os.environ.get("REPLAYGUARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
T0_US = 1_790_000_000_000_000

SEED_FN = """
CREATE OR REPLACE FUNCTION bench_seed(p_count bigint, p_vms integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE v_seq bigint; v_prev bytea; i bigint;
BEGIN
    SELECT seq, hash INTO v_seq, v_prev FROM ledger_head WHERE id FOR UPDATE;
    FOR i IN 1..p_count LOOP
        v_seq := v_seq + 1;
        v_prev := rg_chain_insert(v_prev, v_seq, 1790000000000000 + v_seq * 1000, 'nonce',
            'bench-vm-' || (v_seq % p_vms), 'scope', sha256(int8send(v_seq)),
            CASE WHEN v_seq % 50 = 0 THEN 'reject' ELSE 'accept' END,
            CASE WHEN v_seq % 50 = 0 THEN 'reused' ELSE 'ok' END, '{"ttl_s": 300}'::jsonb);
        IF v_seq % 50 <> 0 THEN  -- an accepted nonce is remembered (here: as purged), as verify checks
            INSERT INTO spent_nonces VALUES (sha256(int8send(v_seq)), v_seq) ON CONFLICT DO NOTHING;
        END IF;
    END LOOP;
    UPDATE ledger_head SET seq = v_seq, hash = v_prev WHERE id;
END $$;
"""
VMS_SQL = """
INSERT INTO vms (vm_id, first_seen_us, last_seen_us)
    SELECT 'bench-vm-' || g, $2, $2 FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING;
"""
ALERT_ROWS = """
INSERT INTO alerts (kind, severity, vm_id, principal, dedup_key, first_seen_us, last_seen_us, updated_us,
                    summary, details)
SELECT (ARRAY['reuse', 'replay_after_rollback', 'rollback_detected'])[1 + g % 3],
       (ARRAY['warning', 'critical', 'critical'])[1 + g % 3], 'bench-vm-' || (g % $2), 'scope',
       'bench:' || g, $3::bigint + g, $3::bigint + g, $3::bigint + g, 'bench alert', '{}'::jsonb
FROM generate_series(1, $1) g;
"""
ENTRY_ROWS = """
INSERT INTO alert_entries SELECT a.id, s FROM alerts a,
    LATERAL (VALUES (1 + (a.id * 7919) % $1), (1 + (a.id * 104729) % $1)) v(s) ON CONFLICT DO NOTHING;
"""


async def create_db(prefix: str) -> str:
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = ADMIN.rpartition("/")[0] + "/" + name
    await schema.migrate_dsn(dsn)
    return dsn


async def drop_db(dsn: str) -> None:
    admin = await asyncpg.connect(ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rpartition("/")[2]}" WITH (FORCE)')
    finally:
        await admin.close()


async def seed(dsn: str, entries: int, alerts: int, vms: int, settings: Settings) -> None:
    """Chained ledger rows in batches, VMs, alerts linked to entries, and a signed checkpoint
    of the head (so the service does not re-verify the whole seeded ledger on start)."""
    conn = await connections.connect(dsn, statement_timeout_ms=0)
    try:
        await conn.execute(SEED_FN)
        for start in range(0, entries, 50_000):
            await conn.execute("SELECT bench_seed($1, $2)", min(50_000, entries - start), vms)
        await conn.execute(VMS_SQL, vms, T0_US)
        await conn.execute(ALERT_ROWS, alerts, vms, T0_US)
        await conn.execute(ENTRY_ROWS, max(entries, 1))
        # The state a real ledger of that age leaves: every accepted nonce spent (verify
        # checks the state agrees with the ledger).
        await conn.execute("INSERT INTO spent_nonces (digest, first_seq) SELECT cred_digest, seq FROM ledger"
                           " WHERE decision = 'accept' AND kind = 'nonce' AND cred_digest IS NOT NULL"
                           " ON CONFLICT DO NOTHING")
        await conn.execute("ANALYZE")
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
        keys = load_keys(settings.replace(database_url=Secret(dsn)))
        cp = cps.sign(keys.signing_key(), head["seq"], bytes(head["hash"]), T0_US)
        await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5)", cp.seq, cp.hash, cp.ts_us,
                           cp.key_id, cp.signature)
    finally:
        await conn.close()


async def timed(call: Callable[[], Awaitable[int]], n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        status = await call()
        samples.append((time.perf_counter() - start) * 1000)
        if status != 200:
            raise RuntimeError(f"unexpected status {status}")
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


async def measure(dsn: str, settings: Settings, entries: int, alerts: int, vms: int, n: int) -> dict[str, Any]:
    app = create_app(settings.replace(database_url=Secret(dsn)))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        _, token = await app[RUNTIME].api_tokens.create("analyst", "bench")
        headers = {"Authorization": f"Bearer {token}"}
        rnd = random.Random(7)

        def get(path: Callable[[], str]) -> Callable[[], Awaitable[int]]:
            async def call() -> int:
                async with client.get(path(), headers=headers) as resp:
                    await resp.read()
                    return resp.status
            return call

        queries = {
            "alert list": get(lambda: "/v1/alerts?limit=50"),
            "alert list (vm, critical)":
                get(lambda: f"/v1/alerts?vm_id=bench-vm-{rnd.randrange(vms)}&severity=critical"),
            "alert detail": get(lambda: f"/v1/alerts/{rnd.randint(1, alerts)}"),
            "vm timeline": get(lambda: f"/v1/vms/bench-vm-{rnd.randrange(vms)}/timeline?limit=100"),
            "ledger listing": get(lambda: f"/v1/ledger?after_seq={rnd.randrange(entries)}&limit=100"),
            "ledger listing (vm)": get(lambda: f"/v1/ledger?vm_id=bench-vm-{rnd.randrange(vms)}&limit=100"),
        }
        results = {name: await timed(call, n) for name, call in queries.items()}
        start = time.perf_counter()
        async with client.get("/v1/ledger/verify", headers=headers) as resp:
            ok = (await resp.json())["ok"]
        results["full verify (one call)"] = ((time.perf_counter() - start) * 1000, float(ok))
        return results
    finally:
        await client.close()


async def run(opts: argparse.Namespace) -> dict[str, dict[str, Any]]:
    rglog.configure("warning")
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), db_pool_size=4, checkpoint_every=10_000_000,
                            checkpoint_interval_s=86400)
        for label, entries in (("baseline", opts.baseline_entries), ("large", opts.entries)):
            alerts = max(10, entries // 100)
            dsn = await create_db("rg_bench")
            try:
                started = time.perf_counter()
                await seed(dsn, entries, alerts, opts.vms, settings)
                print(f"{label}: seeded {entries} entries, {alerts} alerts in {time.perf_counter() - started:.1f}s",
                      file=sys.stderr)
                out[label] = await measure(dsn, settings, entries, alerts, opts.vms, opts.requests)
            finally:
                if not opts.keep:
                    await drop_db(dsn)
    report(out)
    return out


def report(out: dict[str, dict[str, Any]]) -> None:
    print(f"{'query':32} {'p50 ms':>9} {'p99 ms':>9} {'base p50':>9} {'ratio':>7}")
    for name, (p50, p99) in out["large"].items():
        base = out["baseline"][name][0]
        print(f"{name:32} {p50:9.2f} {p99:9.2f} {base:9.2f} {p50 / base if base else 0:7.2f}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="ledger entries in the large database")
    parser.add_argument("--baseline-entries", type=int, default=1_000, help="entries in the baseline database")
    parser.add_argument("--vms", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=200, help="requests per query")
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(run(parse()))
