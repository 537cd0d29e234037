"""The SQL that mirrors the pure core agrees with it on generated cases.

``rg_at_risk`` (migrations/functions/rg_at_risk.sql) is the predicate ``Window.covers``
(replayguard/core/windows.py) written for PostgreSQL. Both are asked the same questions:
random windows (unknown starts included) and points at, just inside and just outside
every end, and they must give the same answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from replayguard.core.windows import Window
from replayguard.pg import connections

SEED = 20261202
VMS = ("vm-a", "vm-b", "vm-c")


def _cases(rng: random.Random, count: int) -> tuple[list[Window], list[tuple[str, int]]]:
    windows = []
    for _ in range(count):
        end = rng.randrange(1_000, 100_000)
        start = None if rng.random() < 0.2 else rng.randrange(0, end + 1)
        windows.append(Window(rng.choice(VMS), start, end, "snapshot.reverted"))
    points = {(rng.choice(VMS), rng.randrange(0, 110_000)) for _ in range(500)}
    for w in windows:  # the boundaries, on the window's VM and on another
        for ts in (w.end_us - 1, w.end_us, w.end_us + 1, *(() if w.start_us is None else
                                                            (w.start_us - 1, w.start_us, w.start_us + 1))):
            points.add((w.vm_id, ts))
            points.add((rng.choice(VMS), ts))
    return windows, sorted(points)


async def test_rg_at_risk_agrees_with_window_covers(fresh_database: Callable[[], Any]) -> None:
    """For every generated point, rg_at_risk finds a window exactly when some Window.covers it."""
    rng = random.Random(SEED)
    conn = await connections.connect(await fresh_database())
    try:
        for round_ in range(5):
            windows, points = _cases(rng, count=1 + round_ * 6)
            async with conn.transaction():
                await conn.executemany(
                    "INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq) VALUES ($1, $2, $3, $4, 0)",
                    [(w.vm_id, w.start_us, w.end_us, w.cause) for w in windows])
                rows = await conn.fetch(
                    "SELECT p.vm, p.ts, rg_at_risk(p.vm, p.ts) IS NOT NULL AS covered"
                    " FROM unnest($1::text[], $2::bigint[]) AS p(vm, ts)",
                    [vm for vm, _ in points], [ts for _, ts in points])
                await conn.execute("DELETE FROM rollback_windows")
            sql = {(r["vm"], r["ts"]): r["covered"] for r in rows}
            core = {(vm, ts): any(w.covers(vm, ts) for w in windows) for vm, ts in points}
            disagree = {p: (sql[p], core[p]) for p in core if sql[p] != core[p]}
            assert not disagree, f"seed {SEED}, round {round_}: (sql, core) differ at {disagree}"
            assert any(core.values()) and not all(core.values())
    finally:
        await conn.close()
