"""The hash chain written by SQL is exactly the one core/chain.py defines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.core.chain import GENESIS, Entry, entry_hash
from replayguard.pg import connections


async def test_sql_chain_matches_python(fresh_database: Callable[[], Any]) -> None:
    """Entries appended through rg_decide and rg_append recompute to the stored hashes."""
    conn = await connections.connect(await fresh_database())
    try:
        await conn.execute("SELECT rg_append(1, 'enroll', NULL, 'alice', NULL, NULL, NULL, $1::jsonb)",
                           {"token_id": "otp_x", "note": "é\u2028\"quoted\""})
        items = [{"kind": "nonce", "ts_us": ts, "vm_id": "web-01", "subject": "api", "digest": "ab" * 32,
                  "receipt": "absent"} for ts in (2, 3)]
        await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 1000, false)", items)
        rows = await conn.fetch("SELECT *, payload::text AS payload_text FROM ledger ORDER BY seq")
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
    finally:
        await conn.close()
    prev = GENESIS
    for row in rows:
        assert bytes(row["prev_hash"]) == prev
        entry = Entry(row["seq"], row["ts_us"], row["kind"], row["vm_id"], row["subject"],
                      None if row["cred_digest"] is None else bytes(row["cred_digest"]),
                      row["decision"], row["reason"], row["payload_text"])
        prev = entry_hash(prev, entry)
        assert bytes(row["hash"]) == prev
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert (head["seq"], bytes(head["hash"])) == (3, prev)


async def test_ledger_is_append_only(fresh_database: Callable[[], Any]) -> None:
    """An ordinary connection can neither update nor delete a ledger row."""
    import asyncpg
    import pytest

    conn = await connections.connect(await fresh_database())
    try:
        await conn.execute("SELECT rg_append(1, 'enroll', NULL, 'alice', NULL, NULL, NULL, '{}'::jsonb)")
        for statement in ("UPDATE ledger SET reason = 'x'", "DELETE FROM ledger"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
