"""What one retention purge reads of `uses`: the batch it drops, not the whole table.

``uses`` holds every credential use still inside its validity window, which can be many;
a purge drops at most ``PURGE_BATCH`` of the expired ones at a time, and runs again until
none is left. Counted with ``pg_stat_xact_user_tables``, with the purge's statement
prepared on one connection and planned while the table was small, then once it grew, then
once it was analysed; on the machine's PostgreSQL and on the embedded default's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.pg import connections
from replayguard.services.retention import purge_on
from tests.integration.test_decide_batch import TS

BATCH = 1000
# OTP uses (nonces have none), each expiring at TS + its number.
_FILL = ("INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)"
         " SELECT sha256(g::text::bytea), 'otp', 'vm-busy', 'api', g, $3::bigint + g, $3::bigint + g"
         " FROM generate_series($1::int, $2::int) g")


async def _purge(conn: Any, before_us: int) -> tuple[int, int]:
    """One purge of up to BATCH uses expired before ``before_us``: how many went, and the
    rows of `uses` it read, by sequential scan and by index."""
    read = "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables WHERE relname = 'uses'"
    async with conn.transaction():
        before = await conn.fetchval(read)
        gone = await purge_on(conn, before_us, BATCH)
        return int(gone), int(await conn.fetchval(read)) - before


async def test_a_purge_reads_the_uses_it_drops_not_every_use(fresh_database_on_both: Callable[[], Any]) -> None:
    """With 300 uses (analysed) and then 20,000 more, of which the oldest 5,000 expired, a
    purge of 1,000 reads about the 1,000 it drops (twice: found by expiry, then deleted),
    not the 20,300; so it does once the table is analysed too."""
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await conn.execute(_FILL, 1, 300, TS)
        await conn.execute("ANALYZE uses")
        for n in range(8):  # enough calls for the prepared statement to settle on a generic plan
            await _purge(conn, TS + n)
        await conn.execute(_FILL, 10**6, 10**6 + 19_999, TS)
        for analysed in (False, True):
            if analysed:
                await conn.execute("ANALYZE uses")
            gone, read = await _purge(conn, TS + 10**6 + 5_000)
            assert gone == BATCH
            assert read <= 2 * BATCH + 10, read
    finally:
        await conn.close()
