"""rg_ingest_event's scans of a VM's newest ledger entries, under the head lock.

Under receipt_reaction = refuse a revert, restore or clone reads at most the newest 10,000
ledger entries of a VM (which receipt its disk went back to). PL/pgSQL keeps a statement's
plan for the connection's life, and a pooled connection lives long: a plan made while the
ledger was small must not read the whole ledger once it grew, nor may a VM with a long
history make the scan read all of it. These call ``rg_ingest_event`` directly, on one
connection, and count with ``pg_stat_xact_user_tables`` the ledger rows one event read, on
the machine's PostgreSQL and on the embedded default's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.pg import connections
from tests.integration.test_decide_batch import TS, nonce

SCAN = 10_000  # c_scan in rg_ingest_event


async def _read(conn: Any) -> int:
    """The ledger rows this backend read, by sequential scan and by index, and has not
    reported yet (counts of earlier transactions may be among them: read before and after)."""
    row = await conn.fetchrow(
        "SELECT seq_tup_read + idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'ledger'")
    return int(row[0])


async def _event(conn: Any, n: int, kind: str, vm: str, source: str | None = None) -> int:
    """One revert (or clone of ``source`` into ``vm``) at TS + 1000 s to the state of TS + 5 µs;
    the ledger rows it read."""
    event: dict[str, Any] = {"event_id": f"evt-{n}", "type": kind, "vm_id": vm, "occurred_us": TS + 10**9}
    if source is not None:
        event["source_vm_id"] = source
    window = [{"vm_id": source or vm, "start_us": TS + 5, "end_us": TS + 10**9, "cause": kind}]
    async with conn.transaction():
        before = await _read(conn)
        await conn.fetch("SELECT * FROM rg_ingest_event($1, $2::jsonb, '\\x00', $3::jsonb, $4::jsonb, true)",
                         TS + 10**9, event, window, {"split_us": TS + 5})
        return await _read(conn) - before


async def test_an_event_reads_the_vms_newest_entries_not_the_ledger(fresh_database_on_both: Callable[[], Any]) -> None:
    """Reverts and clones planned while the ledger holds 300 entries of 30 VMs (ten each),
    then 25,000 entries of one busy VM: a revert of a VM of ten entries, a clone of one,
    and a revert of the busy VM each read a bounded number of ledger rows (the busy VM's
    newest 10,000 and a few more), not the 25,000."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, true)",
                         [nonce(TS + n, f"vm-{n % 30}", f"{n:064x}") for n in range(300)])
        await conn.execute("ANALYZE ledger")
        for n in range(8):  # enough calls for PL/pgSQL to settle on cached plans
            await _event(conn, n, "snapshot.reverted", f"vm-{n}")
            await _event(conn, 100 + n, "vm.cloned", f"clone-{n}", f"vm-{n}")
        for first in range(0, 25_000, 5_000):
            busy = [nonce(TS + 1000 + n, "vm-busy", f"{n + 10**6:064x}") for n in range(first, first + 5_000)]
            await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, true)", busy)
        assert await _event(conn, 50, "snapshot.reverted", "vm-20") <= 200
        assert await _event(conn, 150, "vm.cloned", "clone-50", "vm-21") <= 200
        assert await _event(conn, 51, "snapshot.reverted", "vm-busy") <= SCAN + 200
    finally:
        await conn.close()
