"""Ledger entries this process appends outside the group-commit appender: hypervisor
events, enrolments, token deletions, unlocks, alert acknowledgements, VM clears.

Each one's (seq, hash), read in the transaction that wrote it, goes to ``Recorded`` (the
continuity guard's ``recorded``) once the transaction committed: a database that goes
back to before it is then noticed by the process that wrote it, witnesses or not, as
one that loses a batch of decisions is (CONTRACT §10).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

Recorded = Callable[[int, bytes], None]


def unheard(seq: int, entry_hash: bytes) -> None:
    """No guard to tell: a command-line tool, or a store a test builds by itself."""


async def written(conn: asyncpg.Connection, seq: int) -> tuple[int, bytes]:
    """Entry ``seq`` as this transaction wrote it: (seq, hash)."""
    return seq, bytes(await conn.fetchval("SELECT hash FROM ledger WHERE seq = $1", seq))
