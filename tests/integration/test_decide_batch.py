"""rg_decide over one batch: items see what the items before them did (migration 005).

The group-commit appender hands PostgreSQL many decisions in one call; these call
``rg_decide`` directly with batches built to make items of one batch depend on each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.pg import connections

PERIOD = 30
STEP = 59_666_666  # a TOTP step of about 2026-09-22
TS = STEP * PERIOD * 1_000_000


def nonce(ts: int, vm: str, digest: str) -> dict[str, Any]:
    return {"kind": "nonce", "ts_us": ts, "vm_id": vm, "subject": "api", "digest": digest, "receipt": "absent",
            "expires_us": ts + 10**9}


def code(ts: int, vm: str, sub: str, tok: str, steps: list[int]) -> dict[str, Any]:
    dg = {str(s): (f"{tok}{s}".encode().hex() + "00" * 32)[:64] for s in steps}
    return {"kind": "otp", "ts_us": ts, "vm_id": vm, "subject": sub, "token_id": tok, "credential": tok.encode().hex(),
            "steps": steps, "step_digests": dg, "receipt": "absent", "expires_us": ts + 10**9, "period_s": PERIOD,
            "drift_steps": 1, "clock_scope": "scope-a", "payload": {"context": {}}}


async def _decide(conn: Any, items: list[dict[str, Any]], threshold: int = 5) -> list[tuple[str, str]]:
    rows = await conn.fetch("SELECT * FROM rg_decide($1::jsonb, $2, 60000000, false)", items, threshold)
    return [(r["r_verdict"], r["r_reason"]) for r in rows]


async def _token(conn: Any, tok: str, principal: str) -> None:
    """A token whose credential's fingerprint is its id's bytes (``code`` sends the same)."""
    await conn.execute("INSERT INTO otp_credentials (fingerprint) VALUES ($1)", tok.encode())
    await conn.execute("INSERT INTO otp_tokens (id, principal, type, secret_ct, digits, period, algorithm, fingerprint)"
                       " VALUES ($1, $2, 'totp', '\\x00', 6, 30, 'SHA1', $3)", tok, principal, tok.encode())


async def test_one_batch_items_see_each_other(fresh_database: Callable[[], Any]) -> None:
    """Items of one rg_decide batch see each other's writes: a nonce or step used earlier in the batch is reused."""
    conn = await connections.connect(await fresh_database())
    try:
        await _token(conn, "tok-a", "alice")
        await _token(conn, "tok-b", "bob")
        items = [
            nonce(TS + 1, "vm-1", "aa" * 32),
            nonce(TS + 2, "vm-2", "aa" * 32),  # the same nonce again, in the same batch
            code(TS + 3, "vm-1", "alice", "tok-a", [STEP]),
            code(TS + 4, "vm-2", "alice", "tok-a", [STEP]),  # a step the item before consumed
            code(TS + 5, "vm-1", "alice", "tok-a", [STEP + 1]),  # a later step: still fresh
            code(TS + 6, "vm-2", "bob", "tok-b", []),  # a wrong code: one failure
            code(TS + 7, "vm-2", "bob", "tok-b", [STEP]),  # then a right one clears it
        ]
        assert await _decide(conn, items) == [
            ("accept", "ok"), ("reject", "reused"), ("accept", "ok"), ("reject", "reused"),
            ("accept", "ok"), ("reject", "invalid"), ("accept", "ok"),
        ]
        assert await conn.fetchval("SELECT fail_count FROM principals WHERE name = 'bob'") == 0
        # Last-seen times are kept to within a second: these items are microseconds apart.
        last_seen = dict(await conn.fetch("SELECT vm_id, last_seen_us FROM vms"))
        assert last_seen == {"vm-1": TS + 1, "vm-2": TS + 2}
        # The clock guard holds the time the host surely reached, written once for the batch:
        # STEP + 1 was accepted ahead of the host's clock, so its item's time, not its start.
        assert (STEP + 1) * PERIOD * 1_000_000 > TS + 5
        assert await conn.fetchval("SELECT high_us FROM clock_guard WHERE scope = 'scope-a'") == TS + 5
        head = await conn.fetchrow("SELECT seq FROM ledger_head")
        assert head["seq"] == 7 and await conn.fetchval("SELECT count(*) FROM ledger") == 7
    finally:
        await conn.close()


async def test_one_batch_items_see_each_others_receipt_positions(fresh_database: Callable[[], Any]) -> None:
    """A VM's row as the batch's earlier items left it: two items move the VM's receipt
    position, a third presents the receipt the first moved it to (older than the second's:
    a rollback, a new epoch), a fourth the receipt the third issued; a VM first seen in the
    batch is seen again by its next item, and the rows written are what the items imply."""
    conn = await connections.connect(await fresh_database())
    try:
        def receipt(ts: int, vm: str, seq: int) -> dict[str, Any]:
            return {**nonce(ts, vm, f"{ts:064x}"), "receipt": "valid", "receipt_vm_id": vm, "receipt_seq": seq}

        first = await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)",
                                 [receipt(TS + 1, "vm-1", 0)])
        s1 = first[0]["r_seq"]
        rows = await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)", [
            receipt(TS + 2, "vm-1", s1),          # the latest: the position moves to s1 + 1
            receipt(TS + 3, "vm-1", s1),          # older than s1 + 1: rolled back
            receipt(TS + 4, "vm-1", s1 + 2),      # the receipt the rollback's item issued: in step
            nonce(TS + 5, "vm-new", f"{TS + 5:064x}"),
            receipt(TS + 6, "vm-new", 0),         # a VM first seen one item before
        ])
    finally:
        await conn.close()
    assert [(r["r_verdict"], list(r["r_flags"]), r["r_epoch"], r["r_rseq"]) for r in rows] == [
        ("accept", [], 0, s1 + 1),
        ("accept", ["rollback_detected"], 1, s1 + 2),
        ("accept", [], 1, s1 + 3),
        ("accept", [], 0, 0),
        ("accept", [], 0, s1 + 5),
    ]


async def test_a_vms_last_seen_time_moves_once_it_is_a_second_behind(fresh_database: Callable[[], Any]) -> None:
    """vms.last_seen_us moves only for a decision more than a second after it, to the batch's latest time."""
    conn = await connections.connect(await fresh_database())
    try:
        async def last_seen() -> int:
            return int(await conn.fetchval("SELECT last_seen_us FROM vms WHERE vm_id = 'vm-1'"))

        await _decide(conn, [nonce(TS, "vm-1", "01" * 32)])
        await _decide(conn, [nonce(TS + 1_000_000, "vm-1", "02" * 32)])  # exactly a second: kept
        assert await last_seen() == TS
        await _decide(conn, [nonce(TS + 1_000_001, "vm-1", "03" * 32), nonce(TS + 1_500_000, "vm-1", "04" * 32)])
        assert await last_seen() == TS + 1_500_000
    finally:
        await conn.close()


async def test_the_clock_guard_raised_earlier_in_a_batch_applies_to_later_items(
    fresh_database: Callable[[], Any],
) -> None:
    """A clock guard an earlier item raises refuses a later item from behind it, and last-seen times never go back."""
    conn = await connections.connect(await fresh_database())
    try:
        await _token(conn, "tok-a", "alice")
        await _token(conn, "tok-b", "bob")
        behind = TS - 10 * PERIOD * 1_000_000  # the host clock jumped ten steps back
        items = [
            code(TS, "vm-1", "alice", "tok-a", [STEP]),
            code(behind, "vm-1", "bob", "tok-b", [STEP - 10]),
        ]
        assert await _decide(conn, items) == [("accept", "ok"), ("reject", "invalid")]
        kinds = [r["kind"] for r in await conn.fetch("SELECT kind FROM alerts")]
        assert kinds == ["clock_regression"]
        # Last-seen times never go back, even when a batch carries an older time.
        await _decide(conn, [nonce(TS - 1, "vm-1", "bb" * 32)])
        assert await conn.fetchval("SELECT last_seen_us FROM vms WHERE vm_id = 'vm-1'") == TS
    finally:
        await conn.close()


async def test_a_replayed_code_finds_its_first_use_by_index_not_by_scanning_uses(
    fresh_database_on_both: Callable[[], Any],
) -> None:
    """Refusing a replayed OTP reads its earlier use by key, however many uses are live.

    PL/pgSQL caches each statement's plan per connection. Through migration 005, a plan
    made while ``uses`` was small scanned the whole table for every replayed code ever
    after, so a replay's cost grew with the live uses (migration 006). The lookup is
    planned here while ``uses`` holds 300 rows, analysed (a code behind the token's
    high-water with no use recorded), and again with one row more; then ``uses`` grows
    to 5,300 rows and ``pg_stat_xact_user_tables`` counts the rows a transaction read
    from it, by sequential scan and by index.
    """
    conn = await connections.connect(await fresh_database_on_both())
    try:
        await _fill_uses(conn, 1, 300)
        await conn.execute("ANALYZE uses")
        await _token(conn, "tok-a", "alice")
        await conn.execute("UPDATE otp_credentials SET last_counter = $1 WHERE fingerprint = 'tok-a'::bytea", STEP + 5)
        for n in range(8):  # enough calls for PL/pgSQL to settle on a cached plan
            assert await _decide(conn, [code(TS + n, "vm-1", "alice", "tok-a", [STEP])]) == [("reject", "reused")]
        await conn.execute("UPDATE otp_credentials SET last_counter = -1 WHERE fingerprint = 'tok-a'::bytea")
        assert await _decide(conn, [code(TS + 9, "vm-1", "alice", "tok-a", [STEP])]) == [("accept", "ok")]
        for n in range(10, 18):
            assert await _decide(conn, [code(TS + n, "vm-1", "alice", "tok-a", [STEP])]) == [("reject", "reused")]
        await _fill_uses(conn, 301, 5300)
        async with conn.transaction():
            assert await _decide(conn, [code(TS + 20, "vm-1", "alice", "tok-a", [STEP])]) == [("reject", "reused")]
            assert await _decide(conn, [nonce(TS + 21, "vm-2", "bb" * 32)]) == [("accept", "ok")]
            assert await _decide(conn, [nonce(TS + 22, "vm-2", "bb" * 32)]) == [("reject", "reused")]
            scanned, fetched = await conn.fetchrow(
                "SELECT seq_tup_read, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'uses'")
        assert scanned == 0
        assert fetched <= 100  # a handful of rows by key, not the 5,300 of a whole index
    finally:
        await conn.close()


async def _fill_uses(conn: Any, first: int, last: int) -> None:
    await conn.execute(
        "INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)"
        " SELECT sha256(g::text::bytea), 'otp', 'vm-x', 'api', g, $3::bigint, $3::bigint + 1000000000"
        " FROM generate_series($1::int, $2::int) g", first, last, TS)
