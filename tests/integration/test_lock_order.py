"""Writers outside rg_decide take the ledger head before the rows rg_decide also writes.

rg_decide holds the head lock for its whole batch and then writes token, VM, principal
and alert rows; a writer taking one of those rows first and the head second would
deadlock against it (PostgreSQL would then abort one of the two after deadlock_timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from replayguard.core.validation import enroll_request
from replayguard.keys import load_keys
from replayguard.pg import connections
from replayguard.services.tokens import TokenStore
from tests.waiting import blocked_by


async def test_deleting_a_token_during_a_login_batch_does_not_deadlock(
    fresh_database: Callable[[], Any], make_settings: Callable[..., Any],
) -> None:
    """A token delete that arrives while a decision batch holds the head waits for the head (observed in
    pg_stat_activity), and completes once the batch, which then writes the token row, commits."""
    dsn = await fresh_database()
    keys = load_keys(make_settings())
    pool = await connections.create_pool(dsn, size=4, statement_timeout_ms=10_000)
    store = TokenStore(pool, keys, drift_steps=1)
    batch = await connections.connect(dsn)
    monitor = await connections.connect(dsn)
    try:
        enrolled = await store.enroll("alice", enroll_request({}), 1)
        # A decision batch in flight: it holds the head and is about to consume a step.
        tx = batch.transaction()
        await tx.start()
        await batch.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
        delete = asyncio.create_task(store.delete("alice", enrolled.token_id, 2))
        await blocked_by(monitor, batch.get_server_pid())  # the delete now waits for the head
        await batch.execute("UPDATE otp_tokens SET last_counter = 5 WHERE id = $1", enrolled.token_id)
        await tx.commit()
        await asyncio.wait_for(delete, 10)
        assert await batch.fetchval("SELECT deleted_at IS NOT NULL FROM otp_tokens WHERE id = $1",
                                    enrolled.token_id)
    finally:
        await monitor.close()
        await batch.close()
        await store.close()
        await pool.close()
