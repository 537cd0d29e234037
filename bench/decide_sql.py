"""What ``rg_decide`` costs PostgreSQL an item, for the function as migrated and for a candidate.

Two databases are migrated from this checkout; the candidate's gets the function defined in
``--candidate`` (an edited copy of migrations/functions/rg_decide.sql, or an older one from
git). The same batches (seeded, so the same nonces and times) then go to both over one
connection each, the two alternating first round by round, with synchronous_commit off so
that the WAL flush does not hide the function's own work. Printed per function: items/s,
a call's p50 and p99, the backend's CPU and the wall time an item, the backend's peak RSS,
and the candidate's ratios to the baseline. Last, the two ledgers' heads are compared: the
same batches must chain to the same hash, so a candidate that decides anything differently
(an answer, a payload, the order) fails the run (exit status 1).

    .venv/bin/python bench/decide_sql.py --candidate /tmp/rg_decide.sql
    git show HEAD~5:migrations/functions/rg_decide.sql > /tmp/old.sql
    .venv/bin/python bench/decide_sql.py --candidate /tmp/old.sql --replay-share 0.3

The backend's CPU is read from /proc, so it is shown only when PostgreSQL runs on this
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import run  # noqa: E402 - bench/run.py, beside this file: its database, table and commit helpers

from replayguard import logging as rglog  # noqa: E402
from replayguard.pg import schema  # noqa: E402

T0_US = 1_790_000_000_000_000
DECIDE = "SELECT * FROM rg_decide($1::jsonb, 5, 60000000, true)"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", type=Path,
                   help="a file defining rg_decide; without it both databases run the migrated function "
                        "(the ratios then show the noise)")
    p.add_argument("--batch", type=int, default=64, help="items a call (default 64, the c=64 batch)")
    p.add_argument("--calls", type=int, default=300, help="measured calls a round and function (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating which function goes first")
    p.add_argument("--warmup", type=int, default=20, help="calls before each round's measurement")
    p.add_argument("--vms", type=int, default=200, help="distinct VMs the items come from")
    p.add_argument("--replay-share", type=float, default=0.0,
                   help="share of items that present a nonce used before (answered reused, with an alert)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pg-admin-url", default=os.environ.get("REPLAYGUARD_BENCH_PG",
                                                            "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = p.parse_args(argv)
    if args.batch < 1 or args.calls < 1 or args.rounds < 1 or not 0 <= args.replay_share < 1:
        p.error("--batch, --calls and --rounds must be positive and --replay-share in [0, 1)")
    return args


class Batches:
    """The same sequence of batches for both databases: fresh nonces, some presented again."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._rng = random.Random(args.seed)
        self._args = args
        self._used: list[str] = []
        self._ts = T0_US

    def next(self) -> list[dict[str, Any]]:
        items = []
        for _ in range(self._args.batch):
            self._ts += 1000
            if self._used and self._rng.random() < self._args.replay_share:
                digest = self._rng.choice(self._used)
            else:
                digest = self._rng.randbytes(32).hex()
                self._used.append(digest)
            items.append({"kind": "nonce", "ts_us": self._ts, "vm_id": f"vm-{self._rng.randrange(self._args.vms)}",
                          "subject": "bench", "payload": {"ttl_s": 300}, "receipt": "absent",
                          "expires_us": self._ts + 300_000_000, "digest": digest})
        return items


@dataclass
class Side:
    name: str
    dsn: str
    conn: asyncpg.Connection | None = None
    pid: int = 0
    call_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float | None = 0.0
    items: int = 0

    def backend_cpu(self) -> float | None:
        """Seconds on a CPU, to the nanosecond (/proc's schedstat; stat counts 10 ms ticks)."""
        try:
            return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def backend_peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


async def connect(side: Side) -> None:
    conn = await asyncpg.connect(side.dsn)
    await conn.set_type_codec("jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                              schema="pg_catalog")
    await conn.execute("SET synchronous_commit = off")
    side.conn, side.pid = conn, await conn.fetchval("SELECT pg_backend_pid()")


async def calls(side: Side, batches: list[list[dict[str, Any]]], *, measure: bool) -> None:
    assert side.conn is not None
    before = side.backend_cpu()
    started = time.perf_counter()
    for items in batches:
        t = time.perf_counter()
        rows = await side.conn.fetch(DECIDE, items)
        if measure:
            side.call_ms.append((time.perf_counter() - t) * 1000)
        if len(rows) != len(items):
            raise SystemExit(f"{side.name} answered {len(rows)} rows for {len(items)} items")
    if measure:
        side.wall_s += time.perf_counter() - started
        after = side.backend_cpu()
        side.cpu_s = None if before is None or after is None or side.cpu_s is None else side.cpu_s + after - before
        side.items += sum(len(b) for b in batches)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(side: Side) -> dict[str, Any]:
    return {
        "items/s": side.items / side.wall_s,
        "p50 ms": statistics.median(side.call_ms),
        "p99 ms": quantile(side.call_ms, 0.99),
        "cpu us/item": None if side.cpu_s is None else side.cpu_s / side.items * 1e6,
        "wall us/item": side.wall_s / side.items * 1e6,
        "peak RSS MB": side.backend_peak_rss_mb(),
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


async def bench(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], bool]:
    base = Side("baseline", await run.create_database(args.pg_admin_url, "decide_base"))
    cand = Side("candidate", await run.create_database(args.pg_admin_url, "decide_cand"))
    try:
        for side in (base, cand):
            await schema.migrate_dsn(side.dsn)
            await connect(side)
        if args.candidate is not None:
            assert cand.conn is not None
            await cand.conn.execute(args.candidate.read_text())
        batches = Batches(args)
        for round_no in range(args.rounds):
            warm = [batches.next() for _ in range(args.warmup)]
            measured = [batches.next() for _ in range(args.calls)]
            order = (base, cand) if round_no % 2 == 0 else (cand, base)
            for side in order:
                await calls(side, warm, measure=False)
                await calls(side, measured, measure=True)
            print(f"round {round_no + 1}/{args.rounds}: "
                  + ", ".join(f"{s.name} {fmt(summary(s)['cpu us/item'])} us CPU an item so far" for s in (base, cand)),
                  file=sys.stderr, flush=True)
        heads = []
        for side in (base, cand):
            assert side.conn is not None
            heads.append(await side.conn.fetchrow("SELECT seq, hash FROM ledger_head WHERE id"))
        return {"baseline": summary(base), "candidate": summary(cand)}, heads[0] == heads[1]
    finally:
        for side in (base, cand):
            if side.conn is not None:
                await side.conn.close()
            await run.drop_database(args.pg_admin_url, side.dsn)


def report(args: argparse.Namespace, figures: dict[str, dict[str, Any]], same: bool) -> str:
    cols = ["items/s", "p50 ms", "p99 ms", "cpu us/item", "wall us/item", "peak RSS MB"]
    names = {"baseline": f"rg_decide at {run.commit()}",
             "candidate": str(args.candidate) if args.candidate else f"rg_decide at {run.commit()} (again)"}
    rows = [["function", *cols]]
    for key in ("baseline", "candidate"):
        rows.append([names[key], *(fmt(figures[key][c], 0 if c == "items/s" else 2 if "ms" in c else 1)
                                   for c in cols)])
    lines = [f"rg_decide, {args.batch}-item batches of nonces ({args.replay_share:.0%} presented again), "
             f"{args.rounds} x {args.calls} calls, synchronous_commit off", "", run.table(rows), ""]
    ratios = []
    for c in ("cpu us/item", "wall us/item"):
        b, k = figures["baseline"][c], figures["candidate"][c]
        if b and k is not None:
            ratios.append(f"{c.split()[0]} {k / b:.2f}")
    lines.append("candidate / baseline: " + (", ".join(ratios) or "-"))
    lines.append("ledgers: the same head hash" if same
                 else "ledgers: DIFFERENT head hashes (the candidate decides differently)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rglog.configure("warning")  # not a line per migration applied
    figures, same = asyncio.run(bench(args))
    print(report(args, figures, same))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
