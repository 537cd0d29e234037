"""The rows a statement under the head lock reads, whatever plan PostgreSQL kept for it.

PL/pgSQL keeps a statement's plan for the connection's life (after five calls a generic
one, made without the arguments' values); a LANGUAGE sql function's statements are planned
without them at every call up to PostgreSQL 17, and from 18 are kept like PL/pgSQL's; and
pooled connections live long: a plan made while a table was small, or for no value in
particular, must not read a whole table once it grew. Each test plans the statements while
the tables are small (analysed), grows them, and counts with ``pg_stat_xact_user_tables``
the rows one call read, by sequential scan and by index; each runs on the machine's
PostgreSQL and on the embedded default's (``fresh_database_on_both``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.pg import connections
from replayguard.services.events import _WINDOWS_OF
from tests.integration.test_decide_batch import TS, nonce

DECIDE = "SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)"


async def _read(conn: Any, table: str) -> int:
    """The rows of ``table`` this backend read, by sequential scan and by index, and has not
    reported yet (counts of earlier transactions may be among them: read before and after)."""
    row = await conn.fetchrow(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables WHERE relname = $1", table)
    return int(row[0])


async def _reading(conn: Any, table: str, sql: str, *args: Any) -> tuple[list[Any], int]:
    """Runs ``sql`` in a transaction of its own: its rows, and the rows of ``table`` it read."""
    async with conn.transaction():
        before = await _read(conn, table)
        rows = await conn.fetch(sql, *args)
        return rows, await _read(conn, table) - before


def _receipt(item: dict[str, Any], seq: int) -> dict[str, Any]:
    """``item`` presenting the guest's receipt of ledger entry ``seq`` (its own VM's)."""
    return {**item, "receipt": "valid", "receipt_vm_id": item["vm_id"], "receipt_seq": seq}


async def _two_receipts(conn: Any, vm: str, ts: int, digest: int) -> int:
    """Two decisions of ``vm``, the second presenting the first's receipt: the first's seq,
    a receipt now stale."""
    first = (await conn.fetch(DECIDE, [_receipt(nonce(ts, vm, f"{digest:064x}"), 0)]))[0]["r_seq"]
    await conn.fetch(DECIDE, [_receipt(nonce(ts + 1, vm, f"{digest + 1:064x}"), first)])
    return int(first)


async def _small_ledger(conn: Any) -> None:
    """300 decisions of 30 VMs, analysed."""
    await conn.fetch(DECIDE, [nonce(TS + n, f"vm-{n % 30}", f"{n:064x}") for n in range(300)])
    await conn.execute("ANALYZE")


async def test_a_stale_receipt_reads_the_vms_entries_not_the_ledger(fresh_database_on_both: Callable[[], Any]) -> None:
    """rg_receipt_window, planned while the ledger held 300 entries of 30 VMs: once 20,000
    entries of a busy VM follow a small VM's receipt, that stale receipt reads a few ledger
    rows (the small VM's), not the 20,000; and a stale receipt of the busy VM from before
    its 20,000 entries reads its first and newest 1,000 (the scan's bound), not all."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await _small_ledger(conn)
        for n in range(8):  # enough calls for any plan cache to settle
            seq = await _two_receipts(conn, f"warm-{n}", TS + 1000, 10**5 + 10 * n)
            stale = _receipt(nonce(TS + 2000, f"warm-{n}", f"{10**5 + 10 * n + 2:064x}"), seq)
            rows, _ = await _reading(conn, "ledger", DECIDE, [stale])
            assert rows[0]["r_flags"] == ["rollback_detected"]
        small = await _two_receipts(conn, "vm-small", TS + 10**6, 10**6)
        busy = await _two_receipts(conn, "vm-busy", TS + 10**6, 10**6 + 2)
        for first in range(0, 20_000, 5_000):
            await conn.fetch(DECIDE, [nonce(TS + 2 * 10**6 + n, "vm-busy", f"{n + 2 * 10**6:064x}")
                                      for n in range(first, first + 5_000)])
        rows, read = await _reading(conn, "ledger", DECIDE,
                                    [_receipt(nonce(TS + 3 * 10**6, "vm-small", f"{3 * 10**6:064x}"), small)])
        assert rows[0]["r_flags"] == ["rollback_detected"]
        assert read <= 50, read
        rows, read = await _reading(conn, "ledger", DECIDE,
                                    [_receipt(nonce(TS + 3 * 10**6, "vm-busy", f"{3 * 10**6 + 1:064x}"), busy)])
        assert rows[0]["r_flags"] == ["rollback_detected"]
        assert read <= 2 * 1000 + 50, read
    finally:
        await conn.close()


def _event(n: int, vm: str) -> list[Any]:
    """rg_ingest_event's arguments for a revert of ``vm`` (event ``evt-n``) with its window."""
    event = {"event_id": f"evt-{n}", "type": "snapshot.reverted", "vm_id": vm, "occurred_us": TS + 10**9}
    window = [{"vm_id": vm, "start_us": TS + 5, "end_us": TS + 10**9, "cause": "snapshot.reverted"}]
    return [TS + 10**9, event, window, {}]


INGEST = "SELECT * FROM rg_ingest_event($1, $2::jsonb, '\\x00', $3::jsonb, $4::jsonb, false)"


async def test_an_event_reads_the_vms_it_names_not_every_vm(fresh_database_on_both: Callable[[], Any]) -> None:
    """An event that opens a window moves the epoch of the VMs it names: with 5,000 VMs
    known (analysed) it reads a few rows of `vms`, not all 5,000."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await _small_ledger(conn)
        for n in range(8):
            await _reading(conn, "vms", INGEST, *_event(n, f"vm-{n}"))
        await conn.fetch(DECIDE, [nonce(TS + 10**6 + n, f"many-{n}", f"{n + 10**6:064x}") for n in range(5_000)])
        await conn.execute("ANALYZE vms")
        for n in range(8, 16):
            _, read = await _reading(conn, "vms", INGEST, *_event(n, f"many-{n}"))
            assert read <= 20, read
    finally:
        await conn.close()


async def test_an_events_context_reads_its_own_event_not_every_event(fresh_database_on_both: Callable[[], Any]) -> None:
    """rg_event_context, planned while 8 events were recorded (analysed): once 5,000 more
    are, looking up whether an event id is new reads a few rows of `hypervisor_events`,
    not every event."""
    conn = await connections.connect(await fresh_database_on_both())
    context = "SELECT rg_event_context($1, $2, $1, 'snap', $1)->>'existing'"
    try:
        await _small_ledger(conn)
        for n in range(8):
            await _reading(conn, "hypervisor_events", context, f"vm-{n}", f"evt-{n}")
            await conn.fetch(INGEST, *_event(n, f"vm-{n}"))
        await conn.execute("ANALYZE hypervisor_events")
        for n in range(8):
            await _reading(conn, "hypervisor_events", context, f"vm-{n}", f"evt-{n}")
        await conn.execute(
            "INSERT INTO hypervisor_events (event_id, body_digest, type, vm_id, seq, received_us, payload)"
            " SELECT 'evt-' || g, '\\x00', 'snapshot.created', 'other-' || g, 10^9 + g, 0, '{}'"
            " FROM generate_series(1, 5000) g")
        rows, read = await _reading(conn, "hypervisor_events", context, "vm-3", "evt-3")
        assert rows[0][0] is not None
        assert read <= 5, read
        rows, read = await _reading(conn, "hypervisor_events", context, "vm-9", "evt-9")
        assert rows[0][0] is None
        assert read <= 5, read
    finally:
        await conn.close()


async def test_a_replay_reads_its_vms_windows_not_every_window(fresh_database_on_both: Callable[[], Any]) -> None:
    """rg_at_risk, for a credential presented again: beside a VM with 20,000 rollback
    windows (analysed), a replay on a VM with one window covering its first use reads a
    few rows of `rollback_windows`, not the 20,000, and is still found inside it."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await _small_ledger(conn)
        await conn.execute("INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)"
                           " SELECT 'vm-reverted', 0, 1, 'snapshot.reverted', 1 FROM generate_series(1, 20000)")
        await conn.execute("INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)"
                           " VALUES ('vm-3', $1, $2, 'snapshot.reverted', 1)", TS, TS + 10**9)
        await conn.execute("ANALYZE")
        for n in range(8):  # enough calls for any plan cache to settle
            digest = f"{10**6 + n:064x}"
            await conn.fetch(DECIDE, [nonce(TS + 10**6, "vm-3", digest)])
            rows, read = await _reading(conn, "rollback_windows", DECIDE, [nonce(TS + 10**6 + 1, "vm-3", digest)])
            assert rows[0]["r_reason"] == "replay_after_rollback"
            assert read <= 5, read
    finally:
        await conn.close()


async def test_a_clones_windows_are_read_by_vm_not_every_window(fresh_database_on_both: Callable[[], Any]) -> None:
    """The windows a clone's event reads of its VMs (the events service's prepared
    statement, kept per connection), planned while 20 windows of five VMs were recorded
    (analysed): once a VM has 20,000 more, reading a VM's four windows reads a few rows,
    not all of them, and gives them oldest first."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await conn.execute("INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)"
                           " SELECT 'vm-' || (g % 5), g, g + 1, 'snapshot.reverted', 1 FROM generate_series(1, 20) g")
        await conn.execute("ANALYZE rollback_windows")
        for n in range(8):  # enough calls for the prepared statement to settle on a generic plan
            await _reading(conn, "rollback_windows", _WINDOWS_OF, [f"vm-{n % 5}"])
        await conn.execute("INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)"
                           " SELECT 'vm-reverted', 0, 1, 'snapshot.reverted', 1 FROM generate_series(1, 20000)")
        rows, read = await _reading(conn, "rollback_windows", _WINDOWS_OF, ["vm-1"])
        assert [r["start_us"] for r in rows] == [1, 6, 11, 16]
        assert read <= 10, read
    finally:
        await conn.close()
