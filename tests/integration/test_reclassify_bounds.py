"""rg_reclassify's work under the head lock: the reuse alerts a late event reads.

Alerts are never purged, and a guest makes one reuse alert per credential it replays, so a
VM can hold any number of them. A window reads only those whose first use it covers (each
of which it reclassifies, so it leaves the `reuse` alerts), not every reuse alert the VM
ever had. These call ``rg_decide`` and ``rg_reclassify`` directly and count, with
``pg_stat_xact_user_tables``, the alert and ledger rows one reclassification fetched, on the machine's PostgreSQL
and on the embedded default's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.pg import connections
from tests.integration.test_decide_batch import TS, nonce

REPLAYED = 1500


async def _window(conn: Any, vm: str, start: int | None, end: int) -> tuple[list[int], int, int]:
    """Opens a window on ``vm`` and reclassifies what it explains in one transaction: the
    alerts reclassified, and the alert and ledger rows read meanwhile."""
    async with conn.transaction():
        before = await _fetched(conn)
        seq = await conn.fetchval("SELECT seq FROM ledger_head")
        wid = await conn.fetchval("INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, event_id, seq)"
                                  " VALUES ($1, $2, $3, 'snapshot.reverted', 'evt', $4) RETURNING id",
                                  vm, start, end, seq)
        out = await conn.fetchval("SELECT rg_reclassify($1, $2, $3, 'evt')", wid, end, seq)
        after = await _fetched(conn)
    return sorted(out), after["alerts"] - before["alerts"], after["ledger"] - before["ledger"]


async def _fetched(conn: Any) -> dict[str, int]:
    """The alert and ledger rows this backend read, by sequential scan and by index, and has
    not reported yet (counts of earlier transactions may be among them: read before and after)."""
    return {r["relname"]: r["read"] for r in await conn.fetch(
        "SELECT relname, seq_tup_read + idx_tup_fetch AS read FROM pg_stat_xact_user_tables"
        " WHERE relname IN ('alerts', 'ledger')")}


async def test_a_window_reads_the_reuse_alerts_it_covers_not_every_one_of_the_vm(
    fresh_database_on_both: Callable[[], Any],
) -> None:
    """A guest used and replayed 1,500 nonces (1,500 reuse alerts of its VM); a window after
    all of them reclassifies none and fetches a handful of alert and ledger rows, not the
    1,500; a window over the first ten uses reclassifies exactly their ten alerts (one of
    them written without ``first_ts_us``, as before migration 039), again without reading
    the others; one of unknown start then takes the rest."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        digests = [f"{n:064x}" for n in range(REPLAYED)]
        rows = await conn.fetch("SELECT r_verdict FROM rg_decide($1::jsonb, 5, 60000000, false)",
                                [nonce(TS + n, "vm-1", d) for n, d in enumerate(digests)])
        assert {r["r_verdict"] for r in rows} == {"accept"}
        rows = await conn.fetch("SELECT r_reason FROM rg_decide($1::jsonb, 5, 60000000, false)",
                                [nonce(TS + 10_000 + n, "vm-1", d) for n, d in enumerate(digests)])
        assert {r["r_reason"] for r in rows} == {"reused"}
        # One alert as a release before migration 039 wrote it: no first use's time.
        await conn.execute("UPDATE alerts SET details = details - 'first_ts_us'"
                           " WHERE kind = 'reuse' AND details->>'first_seq' = '6'")
        await conn.execute("ANALYZE alerts")
        later, alerts_read, ledger_read = await _window(conn, "vm-1", TS + 20_000, TS + 30_000)
        assert later == []
        assert alerts_read <= 20 and ledger_read <= 20, (alerts_read, ledger_read)

        first_ten, alerts_read, ledger_read = await _window(conn, "vm-1", TS, TS + 9)
        assert len(first_ten) == 10
        assert alerts_read <= 60 and ledger_read <= 60, (alerts_read, ledger_read)
        kinds = await conn.fetch("SELECT kind, count(*) FROM alerts GROUP BY kind ORDER BY kind")
        assert [(r["kind"], r["count"]) for r in kinds] == [
            ("replay_after_rollback", 10), ("reuse", REPLAYED - 10)]

        rest, _, _ = await _window(conn, "vm-1", None, TS + 30_000)
        assert len(rest) == REPLAYED - 10
    finally:
        await conn.close()


async def test_a_plan_made_while_alerts_were_few_still_reads_only_the_windows_alerts(
    fresh_database_on_both: Callable[[], Any],
) -> None:
    """PL/pgSQL keeps rg_reclassify's plan for the connection's life: planned while the VM
    had 20 reuse alerts (analysed), it still reads only the alerts a window covers once the
    VM has 1,520."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        async def replayed(first: int, count: int) -> None:
            items = [nonce(TS + n, "vm-1", f"{n:064x}") for n in range(first, first + count)]
            await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)", items)
            await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)",
                             [{**item, "ts_us": item["ts_us"] + 10**9} for item in items])

        await replayed(0, 20)
        await conn.execute("ANALYZE alerts")
        await conn.execute("ANALYZE ledger")
        for n in range(8):  # enough calls for PL/pgSQL to settle on a cached plan
            assert (await _window(conn, "vm-1", TS + 10**8 + n, TS + 10**8 + n + 1))[0] == []
        await replayed(20, REPLAYED)
        later, alerts_read, ledger_read = await _window(conn, "vm-1", TS + 10**8, TS + 10**8 + 1)
        assert later == []
        assert alerts_read <= 40 and ledger_read <= 40, (alerts_read, ledger_read)
    finally:
        await conn.close()
