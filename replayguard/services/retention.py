"""Retention: drop what is kept of OTP uses once nothing needs their details.

A row of ``uses`` holds an OTP code's first use (where, when, which ledger entry), so a
second presentation is classified (``reused`` or ``replay_after_rollback``); it carries
``expires_us``, after which the row is dropped: the credential's high-water mark
(``otp_credentials``, never purged) refuses the code from then on. A nonce has no such row:
the decision that accepts it writes its digest to ``spent_nonces`` (32 bytes of key and the
accepting entry's ``seq``, kept for good, since a later presentation may claim any
``ttl_s`` or ``issued_at``), and its first use is read from that entry. So ``uses`` stays
bounded by the OTP codes' validity windows; ``spent_nonces`` grows by one small row per
consumed nonce (README, "Nonces", has the measured size). The ledger itself is never
purged: it is the evidence. Each purge also raises ``retention_mark`` to the time it purged
up to, so ``ledger verify`` tells an expired use purged from one deleted.
"""

from __future__ import annotations

import asyncpg

from ..pg.connections import acquire

PURGE_BATCH = 5000
# The batch found by `uses_expiry` and deleted by primary-key probes, planned with sequential
# scans off (purge_on): as "digest IN (subquery)" every plan, generic or not, joined the
# batch to a sequential scan of all of `uses` (tests/integration/test_retention_bounds.py).
_PURGE = (
    "WITH gone AS (DELETE FROM uses WHERE digest = ANY (ARRAY("
    "  SELECT digest FROM uses WHERE expires_us < $1 ORDER BY expires_us LIMIT $2)) RETURNING digest),"
    # How far purges reached: the state check (state_check.py) needs no use row before it.
    " mark AS (INSERT INTO retention_mark VALUES (true, $1) ON CONFLICT (id) DO UPDATE"
    "  SET purged_before_us = excluded.purged_before_us"
    "  WHERE retention_mark.purged_before_us < excluded.purged_before_us)"
    " SELECT count(*) FROM gone"
)


async def purge_expired(pool: asyncpg.Pool, now_us: int, limit: int = PURGE_BATCH) -> int:
    """Drops up to ``limit`` expired OTP uses (oldest first); returns how many went."""
    async with acquire(pool) as conn:
        gone = await purge_on(conn, now_us, limit)
    return gone


async def purge_on(conn: asyncpg.Connection, now_us: int, limit: int) -> int:
    """``purge_expired`` on ``conn``. The statement is prepared once per connection and its
    plan kept, so every plan of it is made with sequential scans off, whatever the size of
    `uses` at the time: it reads the batch it drops, not the table."""
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        gone: int = await conn.fetchval(_PURGE, now_us, limit)
    return gone
