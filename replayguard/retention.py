"""Retention: forget credential uses that can no longer be accepted anyway.

A row of ``uses`` is what refuses a second presentation; it carries ``expires_us``, the
moment after which the credential is refused on other grounds (a nonce past its
``issued_at`` + ttl, a TOTP step far below its token's high-water mark). Purging rows past
it keeps the data a decision consults bounded by the validity windows, not by history.
The ledger itself is never purged: it is the evidence.
"""

from __future__ import annotations

import asyncpg

from .db import acquire

PURGE_BATCH = 5000
_PURGE = (
    "DELETE FROM uses WHERE digest IN ("
    " SELECT digest FROM uses WHERE expires_us < $1 ORDER BY expires_us LIMIT $2)"
)


async def purge_expired(pool: asyncpg.Pool, now_us: int, limit: int = PURGE_BATCH) -> int:
    """Deletes up to ``limit`` expired uses (oldest first); returns how many went."""
    async with acquire(pool) as conn:
        status: str = await conn.execute(_PURGE, now_us, limit)
    return int(status.rsplit(" ", 1)[-1])
