"""The ledger's rare entries (key rotations, recoveries, principal unlocks) are read through
``ledger_rare_entries`` (migration 044), never by a scan of the ledger: the reads at every
start, continuity check and appender start stay the size of those entries, whatever the
ledger's length."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from replayguard.pg.appender import _FLOOR
from replayguard.services.continuity import _RECOVERIES
from replayguard.services.signing_rotation import _HANDOVERS
from tests.integration.test_state_verify import _ledger_rows_read
from tests.ledger_rows import append_nonces

T0_US = 1764900000000000


QUERIES = pytest.mark.parametrize("query", [_HANDOVERS, _RECOVERIES, _FLOOR], ids=["handovers", "recoveries", "floor"])


@QUERIES
@pytest.mark.parametrize("rare", [True, False], ids=["one of each", "none"])
async def test_rare_entries_are_read_by_index_not_by_reading_the_ledger(
        fresh_database: Callable[[], Any], query: str, rare: bool) -> None:
    """Among 20,000 decisions, one entry of each rare kind, or none: the query reads at most
    those (the ledger's other rows not at all); without the index (the control) it reads
    them all."""
    conn = await asyncpg.connect(await fresh_database())
    try:
        await conn.execute("SET max_parallel_workers_per_gather = 0")  # exact row counts
        await append_nonces(conn, 1, 10_000)
        kinds = ("key_rotation", "ledger_recovery", "principal_unlock") if rare else ()
        for n, kind in enumerate(kinds):
            await conn.execute("SELECT rg_append($1, $2, NULL, $3, NULL, NULL, NULL, $4::jsonb)", T0_US + n, kind,
                               "carol" if kind == "principal_unlock" else None,
                               '{"handover": {}, "statement": {}}')
        await append_nonces(conn, 10_001 + len(kinds), 20_000 + len(kinds))
        await conn.execute("ANALYZE ledger")

        async def rows_read() -> int:
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}")
            return _ledger_rows_read(json.loads(plan)[0]["Plan"])

        assert await rows_read() <= 3
        await conn.execute("DROP INDEX ledger_rare_entries")
        assert await rows_read() >= 20_000
    finally:
        await conn.close()
