"""Token cache misses that arrive together share one query, over a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from replayguard.errors import Unavailable
from replayguard.pg import connections
from replayguard.services.tokens import TokenReader
from tests.waiting import blocked_by


async def _seed(dsn: str, principals: list[str]) -> None:
    conn = await connections.connect(dsn)
    try:
        tokens = [(f"otp_{p}_{k}", p) for p in principals for k in range(2)]
        await conn.executemany("INSERT INTO otp_credentials (fingerprint) VALUES ($1)",
                               [(token_id.encode(),) for token_id, _ in tokens])
        await conn.executemany(
            "INSERT INTO otp_tokens (id, principal, type, secret_ct, digits, period, algorithm, fingerprint)"
            " VALUES ($1, $2, 'totp', '\\x00', 6, 30, 'SHA1', $3)",
            [(token_id, p, token_id.encode()) for token_id, p in tokens],
        )
        await conn.execute("UPDATE otp_tokens SET deleted_at = now() WHERE id = $1", f"otp_{principals[0]}_1")
    finally:
        await conn.close()


class CountingReader(TokenReader):
    queries: list[int]

    async def _fetch(self, names: list[str]) -> list[Any]:
        self.queries.append(len(names))
        return await super()._fetch(names)


async def test_concurrent_misses_share_queries(fresh_database: Callable[[], Any]) -> None:
    """Concurrent cache misses for many principals are read in a few shared queries, and each gets its own tokens."""
    dsn = await fresh_database()
    principals = [f"p{i}" for i in range(64)]
    await _seed(dsn, principals)
    pool = await connections.create_pool(dsn, size=3, statement_timeout_ms=5000)
    reader = CountingReader(pool)
    reader.queries = []
    try:
        results = await asyncio.gather(*(reader.read(p) for p in [*principals, "nobody", "p1"]))
    finally:
        await reader.close()
        await pool.close()
    by_name = dict(zip([*principals, "nobody", "p1b"], results, strict=True))
    assert [r["id"] for r in by_name["p0"]] == ["otp_p0_0"]  # the deleted token is not read
    assert [r["id"] for r in by_name["p5"]] == ["otp_p5_0", "otp_p5_1"]
    assert by_name["nobody"] == []
    assert [r["id"] for r in by_name["p1b"]] == ["otp_p1_0", "otp_p1_1"]
    # 66 reads of 65 names, all waiting at once: one query (a second one if the drain
    # started before the last reads queued); the name asked twice is read once.
    assert sum(reader.queries) == 65 and len(reader.queries) <= 2


async def test_a_cancelled_waiter_does_not_cancel_the_read(fresh_database: Callable[[], Any]) -> None:
    """Cancelling one waiter of a shared token read leaves the read running for the other waiter."""
    dsn = await fresh_database()
    await _seed(dsn, ["alice", "bob"])
    pool = await connections.create_pool(dsn, size=3, statement_timeout_ms=5000)
    reader = TokenReader(pool)
    try:
        first = asyncio.create_task(reader.read("alice"))
        second = asyncio.create_task(reader.read("alice"))
        await asyncio.sleep(0)
        first.cancel()
        assert [r["id"] for r in await second] == ["otp_alice_0"]
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await reader.close()
        await pool.close()


async def test_a_connection_lost_during_a_read_fails_closed_then_recovers(fresh_database: Callable[[], Any]) -> None:
    """A read whose server session is terminated while the query runs raises Unavailable (the caller
    answers 503), never an empty or wrong answer; the next read reconnects and answers."""
    dsn = await fresh_database()
    await _seed(dsn, ["alice", "bob"])
    pool = await connections.create_pool(dsn, size=3, statement_timeout_ms=5000)
    reader = TokenReader(pool)
    admin, monitor = await connections.connect(dsn), await connections.connect(dsn)
    try:
        assert len(await reader.read("bob")) == 2
        locker = admin.transaction()
        await locker.start()
        await admin.execute("LOCK TABLE otp_tokens IN ACCESS EXCLUSIVE MODE")
        read = asyncio.create_task(reader.read("alice"))
        (waiting,) = await blocked_by(monitor, admin.get_server_pid())  # the read's query is now in flight
        await monitor.execute("SELECT pg_terminate_backend($1)", waiting)
        with pytest.raises(Unavailable):
            await read
        await locker.rollback()
        assert len(await reader.read("alice")) == 1 and len(await reader.read("bob")) == 2
    finally:
        await admin.close()
        await monitor.close()
        await reader.close()
        await pool.close()


async def test_a_connection_lost_while_idle_never_gives_a_wrong_answer(fresh_database: Callable[[], Any]) -> None:
    """A kept connection terminated while idle gives either the right answer (the loss was noticed and it
    reconnected) or Unavailable, never a wrong or empty one; the next read works again."""
    dsn = await fresh_database()
    await _seed(dsn, ["alice", "bob"])
    pool = await connections.create_pool(dsn, size=3, statement_timeout_ms=5000)
    reader = TokenReader(pool)
    admin = await connections.connect(dsn)
    try:
        assert len(await reader.read("bob")) == 2
        # Kill the reader's kept connection server-side, as a restart of PostgreSQL would.
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        # Either the loss is noticed before the read (it reconnects and answers) or during
        # it (Unavailable: the caller answers 503); never a wrong or empty answer.
        try:
            alice, bob = await asyncio.gather(reader.read("alice"), reader.read("bob"))
            assert (len(alice), len(bob)) == (1, 2)  # one of alice's two tokens is deleted
        except Unavailable:
            pass
        assert len(await reader.read("bob")) == 2  # and the next read works again
    finally:
        await admin.close()
        await reader.close()
        await pool.close()


async def test_every_write_to_otp_tokens_is_announced(fresh_database: Callable[[], Any]) -> None:
    """The rg_token_changed trigger names the principal of every inserted, updated or
    deleted token row, whoever wrote it, and '' (everyone) for a TRUNCATE or a name too
    long for a notification; nothing is announced for a rolled-back write."""
    dsn = await fresh_database()
    listener, writer = await connections.connect(dsn), await connections.connect(dsn)
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("replayguard_tokens", lambda _c, _p, _ch, payload: heard.put_nowait(payload))

        async def announced(n: int) -> list[str]:
            return [await asyncio.wait_for(heard.get(), 5) for _ in range(n)]

        await _seed(dsn, ["ann", "bob"])  # four inserts in one transaction, then an update of ann's
        assert await announced(3) == ["ann", "bob", "ann"]  # one per name and transaction
        await writer.execute("UPDATE otp_tokens SET principal = 'cat' WHERE id = 'otp_bob_0'")
        assert sorted(await announced(2)) == ["bob", "cat"]
        async with writer.transaction():
            await writer.execute("DELETE FROM otp_tokens WHERE principal = 'ann'")
        assert await announced(1) == ["ann"]
        with pytest.raises(RuntimeError):
            async with writer.transaction():
                await writer.execute("DELETE FROM otp_tokens WHERE principal = 'cat'")
                raise RuntimeError("rolled back")
        long_name = "é" * 2100  # 4,200 bytes
        await writer.execute("UPDATE otp_tokens SET principal = $1 WHERE principal = 'cat'", long_name)
        assert sorted(await announced(2)) == ["", "cat"]
        await writer.execute("TRUNCATE otp_tokens")
        assert await announced(1) == [""]
        assert heard.empty()
    finally:
        await listener.close()
        await writer.close()
