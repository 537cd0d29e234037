"""Independent checks of a ledger over SQL: the hash chain recomputed, accepts by digest.

Used by the chaos and crash tests to compare what the service acknowledged with what is
durably in PostgreSQL, without trusting the service's own verification.
"""

from __future__ import annotations

import aiohttp
import asyncpg

from replayguard.core.chain import GENESIS, Entry, entry_hash

_ROWS = ("SELECT seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload::text AS payload_text,"
         " prev_hash, hash FROM ledger ORDER BY seq")


async def verify_chain(dsn: str) -> int:
    """Recomputes every entry's hash with ``core.chain``; returns the number of entries checked."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_ROWS)
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
    finally:
        await conn.close()
    prev, expected_seq = GENESIS, 1
    for row in rows:
        assert row["seq"] == expected_seq, f"ledger gap before seq {row['seq']}"
        assert bytes(row["prev_hash"]) == prev, f"broken link at seq {row['seq']}"
        entry = Entry(row["seq"], row["ts_us"], row["kind"], row["vm_id"], row["subject"],
                      None if row["cred_digest"] is None else bytes(row["cred_digest"]),
                      row["decision"], row["reason"], row["payload_text"])
        prev = entry_hash(prev, entry)
        assert bytes(row["hash"]) == prev, f"hash mismatch at seq {row['seq']}"
        expected_seq += 1
    assert head is not None and head["seq"] == len(rows) and bytes(head["hash"]) == prev, "head is not the tip"
    return len(rows)


async def accepts_by_seq(dsn: str) -> dict[int, bytes]:
    """Every ``accept`` row of the ledger: seq → credential digest."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT seq, cred_digest FROM ledger WHERE decision = 'accept'")
    finally:
        await conn.close()
    return {r["seq"]: bytes(r["cred_digest"]) for r in rows}


async def service_verifies(url: str, analyst_token: str) -> bool:
    """The ``ok`` of the service's ``GET /v1/ledger/verify`` (which must answer 200)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/ledger/verify",
                           headers={"Authorization": f"Bearer {analyst_token}"}) as resp:
        assert resp.status == 200, await resp.text()
        return bool((await resp.json())["ok"])
