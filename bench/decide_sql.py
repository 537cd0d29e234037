"""What ``rg_decide`` costs PostgreSQL an item, for the function as migrated and for a candidate.

Two databases are migrated from this checkout; the candidate's gets the function defined in
``--candidate`` (an edited copy of migrations/functions/rg_decide.sql, or an older one from
git). The same batches (seeded, so the same credentials and times) then go to both over one
connection each, the two alternating first round by round, with synchronous_commit off so
that the WAL flush does not hide the function's own work (``--sync``: on, as the service
commits, to see what a call costs whole).

``--mix`` weighs five kinds of item: a fresh nonce; a nonce presented again (reused, with
an alert); a TOTP code (accepted once per step and token, reused after); a wrong TOTP code
(invalid, then locked out at the fifth, with a brute-force alert); a nonce with a receipt
from the guest (its VM's latest, or now and then an older one, a rollback that opens a
window and makes the VM refuse, or another VM's, a clone). A receipt names an entry of an
earlier batch, as a guest's does.

Printed per function: items/s, a call's p50 and p99, the backend's CPU and the wall time an
item, the backend's peak RSS; then the candidate's ratios to the baseline and the answers
and flags the batches got. Last, the two ledgers are compared: the same batches must chain
to the same head hash with the same answers, so a candidate that decides anything
differently (an answer, a payload, the order) fails the run (exit status 1), and the report
shows the first entry at which the two ledgers part.

    .venv/bin/python bench/decide_sql.py --candidate /tmp/rg_decide.sql --mix 4:2:2:1:1
    git show HEAD~5:migrations/functions/rg_decide.sql > /tmp/old.sql
    .venv/bin/python bench/decide_sql.py --candidate /tmp/old.sql --mix 4:2:2:1:1

The backend's CPU is read from /proc, so it is shown only when PostgreSQL runs on this
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import run  # noqa: E402 - bench/run.py, beside this file: its database, table and commit helpers
import timeline  # noqa: E402 - bench/timeline.py: its percentile

from replayguard import logging as rglog  # noqa: E402
from replayguard.pg import schema  # noqa: E402

T0_US = 1_790_000_000_000_000
PERIOD_S = 30
KINDS = ("fresh", "again", "totp", "wrong", "receipt")
DECIDE = "SELECT * FROM rg_decide($1::jsonb, 5, 2000000, true)"  # locked out at 5 failures, for 2 s


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
    p.add_argument("--mix", default="1:0:0:0:0",
                   help="weights of fresh-nonce:nonce-again:totp:wrong-totp:receipt items (default 1:0:0:0:0)")
    p.add_argument("--tokens", type=int, default=50, help="TOTP tokens, one principal each")
    p.add_argument("--rollback-share", type=float, default=0.005,
                   help="share of receipts that are an older one of the VM (a rollback: the VM then refuses)")
    p.add_argument("--clone-share", type=float, default=0.005,
                   help="share of receipts that are another VM's latest (a clone: the VM then refuses)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sync", action="store_true",
                   help="commit with synchronous_commit on, as the service does: the WAL flush is then in "
                        "every call's time and CPU")
    p.add_argument("--pg-admin-url", default=os.environ.get("REPLAYGUARD_BENCH_PG",
                                                            "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = p.parse_args(argv)
    try:
        args.weights = [float(w) for w in args.mix.split(":")]
    except ValueError:
        p.error("--mix takes five numbers, e.g. 4:2:2:1:1")
    if len(args.weights) != len(KINDS) or min(args.weights) < 0 or sum(args.weights) <= 0:
        p.error("--mix takes five weights, fresh-nonce:nonce-again:totp:wrong-totp:receipt")
    if args.batch < 1 or args.calls < 1 or args.rounds < 1 or args.tokens < 1 or args.vms < 2:
        p.error("--batch, --calls, --rounds and --tokens must be positive, --vms at least 2")
    if min(args.rollback_share, args.clone_share) < 0 or args.rollback_share + args.clone_share > 1:
        p.error("--rollback-share and --clone-share are shares of the receipts, together at most 1")
    return args


def fingerprint(token: int) -> bytes:
    return hashlib.sha256(f"bench-credential-{token}".encode()).digest()


def step_digest(token: int, step: int) -> str:
    return hashlib.sha256(f"bench-use-{token}-{step}".encode()).hexdigest()


async def enrol(conn: asyncpg.Connection, tokens: int) -> None:
    """The TOTP tokens the items name, one principal each (the secret is not needed here)."""
    await conn.executemany(
        "INSERT INTO otp_tokens (id, principal, type, secret_ct, digits, period, algorithm, fingerprint)"
        " VALUES ($1, $2, 'totp', '\\x00', 6, $3, 'SHA1', $4)",
        [(f"tok-{t}", f"user-{t}", PERIOD_S, fingerprint(t)) for t in range(tokens)])
    await conn.executemany("INSERT INTO otp_credentials (fingerprint) VALUES ($1)",
                           [(fingerprint(t),) for t in range(tokens)])


class Batches:
    """The same sequence of batches for both databases. Item k of the run gets ledger seq
    k + 1 (one per item, from an empty ledger), so receipts can name entries exactly."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._rng = random.Random(args.seed)
        self._args = args
        self._used: list[str] = []
        self._ts = T0_US
        self._seq = 0
        self._receipts: dict[str, list[int]] = {}  # a VM's receipts of earlier batches, oldest first

    def _nonce(self, vm_id: str, digest: str) -> dict[str, Any]:
        return {"kind": "nonce", "ts_us": self._ts, "vm_id": vm_id, "subject": "bench", "payload": {"ttl_s": 300},
                "receipt": "absent", "expires_us": self._ts + 300_000_000, "digest": digest}

    def _totp(self, vm_id: str, wrong: bool) -> dict[str, Any]:
        token = self._rng.randrange(self._args.tokens)
        step = self._ts // (PERIOD_S * 1_000_000)
        steps = [] if wrong else [step]
        return {"kind": "otp", "ts_us": self._ts, "vm_id": vm_id, "subject": f"user-{token}",
                "payload": {"context": "bench"}, "receipt": "absent", "expires_us": self._ts + 90_000_000,
                "token_id": f"tok-{token}", "credential": fingerprint(token).hex(), "steps": steps,
                "step_digests": {str(s): step_digest(token, s) for s in steps},
                "period_s": PERIOD_S, "drift_steps": 1, "clock_scope": "bench"}

    def next(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        issued: dict[str, int] = {}  # receipts issued in this batch, usable from the next one
        for _ in range(self._args.batch):
            self._ts += 1000
            self._seq += 1
            vm_id = f"vm-{self._rng.randrange(self._args.vms)}"
            kind = self._rng.choices(KINDS, weights=self._args.weights)[0]
            if kind == "again" and self._used:
                item = self._nonce(vm_id, self._rng.choice(self._used))
            elif kind in ("totp", "wrong"):
                item = self._totp(vm_id, wrong=kind == "wrong")
            else:
                digest = self._rng.randbytes(32).hex()
                self._used.append(digest)
                item = self._nonce(vm_id, digest)
                if kind == "receipt" and vm_id not in issued:
                    item |= self._receipt(vm_id)
                    issued[vm_id] = self._seq
            items.append(item)
        for vm_id, seq in issued.items():
            self._receipts.setdefault(vm_id, []).append(seq)
        return items

    def _receipt(self, vm_id: str) -> dict[str, Any]:
        """The VM's latest receipt; now and then an older one (a rollback) or another VM's (a clone)."""
        mine = self._receipts.get(vm_id, [])
        draw = self._rng.random()
        if draw < self._args.clone_share and self._receipts:
            source = self._rng.choice(sorted(self._receipts))
            if source != vm_id:
                return {"receipt": "valid", "receipt_vm_id": source, "receipt_seq": self._receipts[source][-1]}
        if draw < self._args.clone_share + self._args.rollback_share and len(mine) > 1:
            return {"receipt": "valid", "receipt_vm_id": vm_id, "receipt_seq": mine[-2]}
        return {"receipt": "valid", "receipt_vm_id": vm_id, "receipt_seq": mine[-1] if mine else 0}


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
    answers: Counter[str] = field(default_factory=Counter)

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


async def connect(side: Side, sync: bool = False) -> None:
    conn = await asyncpg.connect(side.dsn)
    await conn.set_type_codec("jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                              schema="pg_catalog")
    await conn.execute(f"SET synchronous_commit = {'on' if sync else 'off'}")
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
            side.answers.update(row["r_reason"] for row in rows)
            side.answers.update(flag for row in rows for flag in row["r_flags"])
    if measure:
        side.wall_s += time.perf_counter() - started
        after = side.backend_cpu()
        side.cpu_s = None if before is None or after is None or side.cpu_s is None else side.cpu_s + after - before
        side.items += sum(len(b) for b in batches)


def summary(side: Side) -> dict[str, Any]:
    return {
        "items/s": side.items / side.wall_s,
        "p50 ms": statistics.median(side.call_ms),
        "p99 ms": timeline.percentile(sorted(side.call_ms), 0.99),
        "cpu us/item": None if side.cpu_s is None else side.cpu_s / side.items * 1e6,
        "wall us/item": side.wall_s / side.items * 1e6,
        "peak RSS MB": side.backend_peak_rss_mb(),
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


async def bench(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Both sides' figures, and where the ledgers part (None when they end the same)."""
    base = Side("baseline", await run.create_database(args.pg_admin_url, "decide_base"))
    cand = Side("candidate", await run.create_database(args.pg_admin_url, "decide_cand"))
    try:
        for side in (base, cand):
            await schema.migrate_dsn(side.dsn)
            await connect(side, args.sync)
            assert side.conn is not None
            await enrol(side.conn, args.tokens)
            if await side.conn.fetchval("SELECT seq FROM ledger_head WHERE id") != 0:
                raise SystemExit("the ledger is not empty after enrolment: receipts would name the wrong entries")
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
        figures = {"baseline": summary(base), "candidate": summary(cand)}
        figures["baseline"]["answers"] = base.answers
        if heads[0] == heads[1] and base.answers == cand.answers:
            return figures, None
        return figures, await first_difference(base, cand)
    finally:
        for side in (base, cand):
            if side.conn is not None:
                await side.conn.close()
            await run.drop_database(args.pg_admin_url, side.dsn)


async def first_difference(base: Side, cand: Side) -> str:
    """The first ledger entry at which the two ledgers part, both sides' version of it."""
    assert base.conn is not None and cand.conn is not None
    query = ("SELECT seq, kind, vm_id, subject, decision, reason, payload::text AS payload, hash"
             " FROM ledger ORDER BY seq")
    mine, theirs = await base.conn.fetch(query), await cand.conn.fetch(query)
    for a, b in zip(mine, theirs, strict=False):
        if a["hash"] != b["hash"]:
            show = [{k: v for k, v in dict(r).items() if k != "hash"} for r in (a, b)]
            return f"first different entry: baseline {show[0]}\n                        candidate {show[1]}"
    return f"the ledgers have {len(mine)} and {len(theirs)} entries"


def report(args: argparse.Namespace, figures: dict[str, dict[str, Any]], difference: str | None) -> str:
    cols = ["items/s", "p50 ms", "p99 ms", "cpu us/item", "wall us/item", "peak RSS MB"]
    names = {"baseline": f"rg_decide at {run.commit()}",
             "candidate": str(args.candidate) if args.candidate else f"rg_decide at {run.commit()} (again)"}
    rows = [["function", *cols]]
    for key in ("baseline", "candidate"):
        rows.append([names[key], *(fmt(figures[key][c], 0 if c == "items/s" else 2 if "ms" in c else 1)
                                   for c in cols)])
    answers = ", ".join(f"{name} {n:,}" for name, n in figures["baseline"]["answers"].most_common())
    lines = [f"rg_decide, {args.batch}-item batches, mix {args.mix} (fresh-nonce:nonce-again:totp:wrong-totp:"
             f"receipt), {args.rounds} x {args.calls} calls, "
             f"synchronous_commit {'on' if args.sync else 'off'}", "", run.table(rows), "",
             f"measured answers and flags: {answers}"]
    ratios = []
    for c in ("cpu us/item", "wall us/item"):
        b, k = figures["baseline"][c], figures["candidate"][c]
        if b and k is not None:
            ratios.append(f"{c.split()[0]} {k / b:.2f}")
    lines.append("candidate / baseline: " + (", ".join(ratios) or "-"))
    lines.append("ledgers: the same head hash" if difference is None
                 else f"ledgers: DIFFERENT head hashes (the candidate decides differently)\n{difference}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rglog.configure("warning")  # not a line per migration applied
    figures, difference = asyncio.run(bench(args))
    print(report(args, figures, difference))
    return 0 if difference is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
