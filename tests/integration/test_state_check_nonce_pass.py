"""The state check's nonce pass (``rg_unspent_nonce``) answers as a key lookup for every entry does.

The state check reads the pages of ``spent_nonces`` that hold a range's rows in one pass,
matches them with the accepted nonces' entries by entry and digest, and looks up by key
only an entry the pass left unmatched. These tests hold it to the same query with a key
lookup for every entry (``PROBED``) on the same tampered tables: rows in the order their
entries were accepted, rows behind rows that name no entry (kept from before
``spent_nonces`` named entries), and a range far from the table's end; and they show by
PostgreSQL's block counters that it is the pass, not a lookup a row, that vouches for
untouched entries.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest

from replayguard.services.state_check import _CHECK, CLOCK_SLACK_US, Disagreement, check_state

NOW_US = 1_800_000_000_000_000
SCOPE = "scope"
PASS = ("(SELECT f.r_seq AS seq, 'spent_nonces' AS tbl, f.r_key AS key"
        " FROM rg_unspent_nonce($1::bigint, $2::bigint) f)")
PROBED = _CHECK.replace(PASS, """(SELECT e.seq, 'spent_nonces' AS tbl, e.cred_digest AS key FROM e
     WHERE e.decision = 'accept' AND e.kind = 'nonce' AND e.cred_digest IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM spent_nonces s WHERE s.digest = e.cred_digest AND s.first_seq = e.seq)
     ORDER BY e.seq LIMIT 1)""").replace(
    "kind = 'otp' AND (decision = 'accept' OR payload ? 'locked_until_us')",
    "((decision = 'accept' AND kind IN ('otp', 'nonce')) OR (kind = 'otp' AND payload ? 'locked_until_us'))")


def test_the_reference_query_is_the_check_with_a_lookup_for_every_nonce() -> None:
    """``PROBED`` differs from the state check's query in its nonce branch and in nothing else
    that decides."""
    assert PASS in _CHECK and PASS not in PROBED
    assert "kind IN ('otp', 'nonce')" in PROBED


async def decide_nonces(conn: asyncpg.Connection, count: int) -> list[tuple[int, bytes]]:
    """``count`` fresh nonces accepted through ``rg_decide``: each entry's seq and digest."""
    items: list[dict[str, Any]] = [
        {"kind": "nonce", "ts_us": NOW_US + i, "vm_id": "vm-pass", "subject": "s", "digest": secrets.token_hex(32),
         "receipt": "absent", "expires_us": NOW_US + 3_600_000_000} for i in range(count)]
    rows = await conn.fetch("SELECT * FROM rg_decide($1::jsonb, 5, 60000000, false)", orjson.dumps(items).decode())
    assert {r["r_verdict"] for r in rows} == {"accept"}
    return [(r["r_seq"], bytes.fromhex(item["digest"])) for r, item in zip(rows, items, strict=True)]


async def unnamed_rows(conn: asyncpg.Connection, count: int) -> None:
    """``count`` spent nonces that name no entry, after the rows already there."""
    await conn.execute("INSERT INTO spent_nonces (digest) SELECT sha256(int8send(-g) || $1::bytea)"
                       " FROM generate_series(1, $2::int) g", secrets.token_bytes(8), count)


async def behind_unnamed(conn: asyncpg.Connection, before: int, unnamed: int, after: int) -> list[tuple[int, bytes]]:
    """``before`` accepted nonces, ``unnamed`` rows naming no entry, then ``after`` more
    nonces: each accepted entry's seq and digest."""
    entries = await decide_nonces(conn, before)
    await unnamed_rows(conn, unnamed)
    return entries + await decide_nonces(conn, after)


async def spent_pages(conn: asyncpg.Connection) -> int:
    """The pages of spent_nonces, counted as rg_unspent_nonce counts them."""
    pages: int = await conn.fetchval(
        "SELECT pg_relation_size('spent_nonces') / current_setting('block_size')::bigint")
    return pages


async def both(conn: asyncpg.Connection, after: int, upto: int) -> Disagreement | None:
    """The state check's answer for ``after < seq <= upto``, once it is shown to be ``PROBED``'s."""
    passed = await check_state(conn, after, upto, NOW_US, SCOPE)
    row = await conn.fetchrow(PROBED, after, upto, NOW_US, SCOPE, CLOCK_SLACK_US)
    probed = None if row is None else (row["seq"], row["tbl"], bytes(row["key"]))
    assert (None if passed is None else (passed.seq, passed.table, bytes.fromhex(passed.key_digest))) == probed, \
        (after, upto)
    return passed


async def blocks(conn: asyncpg.Connection) -> tuple[int, int]:
    """Blocks this transaction has read of spent_nonces' heap and of its primary key."""
    row = await conn.fetchrow("SELECT pg_stat_get_xact_blocks_fetched('spent_nonces'::regclass) AS heap,"
                              " pg_stat_get_xact_blocks_fetched('spent_nonces_pkey'::regclass) AS pkey")
    return row["heap"], row["pkey"]


async def layout(conn: asyncpg.Connection, kind: str) -> list[tuple[int, bytes]]:
    """Two thousand accepted nonces, then two thousand more: right after them (``in order``),
    behind 3,000 or 20,000 rows naming no entry (``unnamed between``, ``many unnamed between``),
    or followed by 40,000 more entries (``far from the end``)."""
    entries = await decide_nonces(conn, 2_000)
    if kind == "unnamed between":
        await unnamed_rows(conn, 3_000)
    if kind == "many unnamed between":
        await unnamed_rows(conn, 20_000)
    entries += await decide_nonces(conn, 2_000)
    if kind == "far from the end":
        await decide_nonces(conn, 40_000)
    return entries


TAMPERS = {
    "deleted": "DELETE FROM spent_nonces WHERE first_seq = $1",
    "other digest": "UPDATE spent_nonces SET digest = sha256(digest) WHERE first_seq = $1",
    "other entry": "UPDATE spent_nonces SET first_seq = first_seq + 1 WHERE first_seq = $1",
    "no entry": "UPDATE spent_nonces SET first_seq = NULL WHERE first_seq = $1",
}


@pytest.mark.parametrize("kind", ["in order", "unnamed between", "many unnamed between", "far from the end"])
async def test_the_pass_and_the_lookups_name_the_same_entry_whatever_was_tampered(
        fresh_database: Callable[[], Any], kind: str) -> None:
    """For each edit of one entry's spent_nonces row (deleted, its digest or its entry
    changed, its entry cleared), in each half of the ledger and in each layout, both
    queries name that entry over every range that holds it and nothing over the others;
    with no edit, or with the row deleted and written back (at the table's end), nothing."""
    conn = await asyncpg.connect(await fresh_database())
    try:
        entries = await layout(conn, kind)
        base, last = entries[0][0] - 1, entries[-1][0]
        spans = [(base, base + 1_000), (base, last), (base + 1_500, base + 2_500), (base + 3_000, last)]
        for after, upto in spans:
            assert await both(conn, after, upto) is None
        for victim in (entries[700][0], entries[3_200][0]):
            for name, statement in TAMPERS.items():
                tx = conn.transaction()
                await tx.start()
                try:
                    await conn.execute(statement, victim)
                    for after, upto in spans:
                        found = await both(conn, after, upto)
                        expected = victim if after < victim <= upto else None
                        assert (found and found.seq) == expected, (name, victim, after, upto)
                        assert found is None or found.table == "spent_nonces"
                finally:
                    await tx.rollback()
            async with conn.transaction():
                digest = await conn.fetchval("DELETE FROM spent_nonces WHERE first_seq = $1 RETURNING digest", victim)
                await conn.execute("INSERT INTO spent_nonces (digest, first_seq) VALUES ($1, $2)", digest, victim)
            for after, upto in spans:
                assert await both(conn, after, upto) is None
    finally:
        await conn.close()


async def test_untouched_entries_are_vouched_for_by_one_pass_over_their_pages(
        fresh_database: Callable[[], Any]) -> None:
    """12,000 accepted nonces, 3,000 rows naming no entry, then 2,000 more nonces: a check
    of 1,000 entries reads no block of spent_nonces' primary key, call after call (PL/pgSQL
    plans again and then keeps a generic plan), and few of its heap: in the middle, the
    range's ten pages, four on either side and a page a bisection step; at the end, also
    64 pages for each step that lands among the unnamed rows (two). The lookup for every
    entry reads the key for each of them."""
    conn = await asyncpg.connect(await fresh_database())
    try:
        entries = await behind_unnamed(conn, 12_000, 3_000, 2_000)
        pages = await spent_pages(conn)
        assert pages > 150
        for after, most in ((entries[5_000][0], 60), (entries[-1_001][0], 60 + 2 * 64)):
            async with conn.transaction():
                for _ in range(8):
                    heap, pkey = await blocks(conn)
                    assert await check_state(conn, after, after + 1_000, NOW_US, SCOPE) is None
                    heap_after, pkey_after = await blocks(conn)
                    assert pkey_after == pkey
                    assert 0 < heap_after - heap <= most
                await conn.fetch(PROBED, after, after + 1_000, NOW_US, SCOPE, CLOCK_SLACK_US)
                assert (await blocks(conn))[1] - pkey_after >= 1_000  # a lookup per entry: a block each at least
    finally:
        await conn.close()


async def test_rows_far_out_of_order_are_looked_up_rather_than_passed_over(
        fresh_database: Callable[[], Any]) -> None:
    """2,000 accepted nonces, then 20,000 rows that name the 1,501st entry: the last 1,000
    entries' rows end, by bisection, past those 20,000 rows, so a pass would read about 200
    pages, past the 104 of its limit for 1,000 entries (144 for all 2,000, from the first
    page). Every entry is looked up by key instead; the check still names an entry whose
    row is gone."""
    conn = await asyncpg.connect(await fresh_database())
    try:
        entries = await decide_nonces(conn, 2_000)
        await conn.execute("INSERT INTO spent_nonces (digest, first_seq) SELECT sha256(int8send(-g)), $1::bigint"
                           " FROM generate_series(1, 20000) g", entries[1_500][0])
        after, upto = entries[999][0], entries[-1][0]
        for first in (after, entries[0][0] - 1):  # the range's rows begin at the table's first page
            async with conn.transaction():
                _, pkey = await blocks(conn)
                assert await check_state(conn, first, upto, NOW_US, SCOPE) is None
                assert (await blocks(conn))[1] - pkey >= upto - first  # looked up: a block each at least
        assert await both(conn, after, upto) is None
        async with conn.transaction():
            await conn.execute("DELETE FROM spent_nonces WHERE first_seq = $1 AND digest = $2", *entries[1_200])
            found = await both(conn, after, upto)
            assert found is not None and found.seq == entries[1_200][0]
    finally:
        await conn.close()


async def spent_page(conn: asyncpg.Connection, seq: int, lo: int, hi: int) -> tuple[int, int]:
    """``rg_spent_page(seq, lo, hi)`` and the blocks of spent_nonces' heap it read."""
    async with conn.transaction():
        before, _ = await blocks(conn)
        page = await conn.fetchval("SELECT rg_spent_page($1, $2, $3)", seq, lo, hi)
        after, _ = await blocks(conn)
    return page, after - before


def steps(pages: int) -> int:
    """A bisection's steps over ``pages`` pages: ceil(log2(pages))."""
    return max(pages - 1, 0).bit_length()


async def test_a_search_from_a_lower_page_finds_what_the_whole_search_finds(
        fresh_database: Callable[[], Any]) -> None:
    """6,000 accepted nonces, 3,000 rows naming no entry, 4,000 more: for entries across
    the table, a search from a page whose rows end at or before an earlier entry finds the
    page the search over the whole table finds, reading a page a step (64 for a step among
    the unnamed rows); one whose upper end is at or below that page answers the page below
    that end."""
    conn = await asyncpg.connect(await fresh_database())
    try:
        entries = await behind_unnamed(conn, 6_000, 3_000, 4_000)
        pages = await spent_pages(conn)
        checked = 0
        for earlier, later in zip(entries[::400], entries[1_000::400], strict=False):
            lo, _ = await spent_page(conn, earlier[0], 0, pages)
            whole, _ = await spent_page(conn, later[0], 0, pages)
            assert lo <= whole
            page, read = await spent_page(conn, later[0], lo, pages)
            assert page == whole
            assert read <= 64 * steps(pages - lo)
            for hi in (whole + 1, whole + 2):
                assert (await spent_page(conn, later[0], lo, hi))[0] == whole
            if whole - lo > 1:
                assert (await spent_page(conn, later[0], lo, whole))[0] == whole - 1
                checked += 1
        assert checked > 10
    finally:
        await conn.close()


async def test_the_pass_searches_for_its_last_page_from_its_first_up_to_its_limit(
        fresh_database: Callable[[], Any]) -> None:
    """40,000 accepted nonces: a check of 100 entries in the middle of the table, or at its
    end, reads the pages of its pass, the steps of a search over the whole table for its
    first page, and those of a search from that page over at most the pass's limit (68
    pages for 100 entries) or to the table's end, whichever is nearer: not a second search
    over the whole table."""
    conn = await asyncpg.connect(await fresh_database())
    try:
        entries = await decide_nonces(conn, 40_000)
        pages = await spent_pages(conn)
        limit = 100 // 25 + 64
        for after in (entries[2_000][0], entries[-101][0]):
            first, _ = await spent_page(conn, after, 0, pages)
            last, _ = await spent_page(conn, after + 100, first, pages)
            assert last - first <= 2
            span = min(pages, first + limit + 2) - first
            assert steps(pages - first) > steps(span) or after == entries[-101][0]
            async with conn.transaction():
                heap, pkey = await blocks(conn)
                assert await check_state(conn, after, after + 100, NOW_US, SCOPE) is None
                heap_after, pkey_after = await blocks(conn)
            assert pkey_after == pkey
            passed = last + 5 - max(first - 4, 0)
            assert heap_after - heap <= passed + steps(pages) + steps(span), (after, first, last)
    finally:
        await conn.close()
