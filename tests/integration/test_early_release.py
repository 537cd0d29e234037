"""Early lock release: a decision batch commits before its WAL flush, and is answered only after a barrier.

``pg/appender.py`` sends a batch of more than one decision with its transaction's
``synchronous_commit`` off, so the ledger head's lock is free during the flush, and answers
it after a WAL barrier (``connections.WAL_BARRIER``) on a connection of its own. Reads
that answer outside (authenticated GETs, the alert feed's log lines and sinks) and the
continuity guard's floor wait for a barrier too. These tests hold the barrier on a real
lock (its statement made to wait on an advisory lock the test holds) or kill its backend,
and check nothing leaves early; the last two check that the barrier statement flushes an
earlier asynchronous commit and that the early statement leaves the session synchronous.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from replayguard.http import app as http_app
from replayguard.pg import appender, connections
from replayguard.services import alertfeed, continuity
from replayguard.settings import Secret
from tests.api.test_analysts import reuse_alert
from tests.conftest import Api, uid
from tests.waiting import blocked_by, until

HELD = 0x7267_6261  # the advisory lock a held barrier waits on
HELD_BARRIER = f"{connections.WAL_BARRIER}, pg_advisory_xact_lock_shared({HELD})"


async def _ledger_count_is(conn: asyncpg.Connection, vm_id: str, n: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) = $2 FROM ledger WHERE vm_id = $1", vm_id, n))


async def _one_batch(api: Api, monitor: asyncpg.Connection, vm_id: str,
                     nonces: list[str]) -> list[asyncio.Task[tuple[int, Any]]]:
    """Sends the consumes so that the first goes alone and the others as one batch: the ledger
    head is held while the first waits for it and the others queue behind, then let go."""
    def consume(nonce: str) -> asyncio.Task[tuple[int, Any]]:
        return asyncio.create_task(api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "early", "nonce": nonce}))

    head = await asyncpg.connect(api.runtime.dsn)
    try:
        async with head.transaction():
            await head.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
            tasks = [consume(nonces[0])]
            await blocked_by(monitor, await head.fetchval("SELECT pg_backend_pid()"))
            await until(lambda: not api.runtime.appender._queue, "the first decision in flight")
            tasks += [consume(nonce) for nonce in nonces[1:]]
            await until(lambda: len(api.runtime.appender._queue) == len(nonces) - 1, "the rest queued")
    finally:
        await head.close()
    return tasks


async def _hold(dsn: str) -> asyncpg.Connection:
    holder = await asyncpg.connect(dsn)
    await holder.execute("SELECT pg_advisory_lock($1)", HELD)
    return holder


async def test_an_early_released_batch_is_answered_only_after_its_barrier(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the barrier held, every decision of a batch is committed and visible in the ledger while
    its callers still wait; once the barrier completes, each is answered accept."""
    monkeypatch.setattr(appender, "WAL_BARRIER", HELD_BARRIER)
    holder, monitor = await _hold(api.runtime.dsn), await asyncpg.connect(api.runtime.dsn)
    vm_id, nonces = uid("vm"), [uid("n") for _ in range(8)]
    try:
        tasks = await _one_batch(api, monitor, vm_id, nonces)
        await blocked_by(monitor, await holder.fetchval("SELECT pg_backend_pid()"))  # the barrier waits
        await until(lambda: _ledger_count_is(monitor, vm_id, len(nonces)), "every entry committed")
        await until(tasks[0].done, "the lone first decision answered (its commit was synchronous)")
        assert not any(t.done() for t in tasks[1:]), "the batch waits for its barrier"
        await holder.execute("SELECT pg_advisory_unlock($1)", HELD)
        answers = await asyncio.gather(*tasks)
    finally:
        await holder.close()
        await monitor.close()
    assert [(status, body["decision"]) for status, body in answers] == [(200, "accept")] * len(nonces), answers


async def test_a_failed_barrier_answers_its_batch_503_and_a_retry_is_refused(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The barrier's backend is killed while the batch waits on it: the batch, committed but not
    confirmed durable, is answered 503 (as a commit whose outcome is unknown is), nothing is told
    accept, a retry of the same nonce is refused as reused, and the next decision is accepted."""
    monkeypatch.setattr(appender, "WAL_BARRIER", HELD_BARRIER)
    holder, monitor = await _hold(api.runtime.dsn), await asyncpg.connect(api.runtime.dsn)
    vm_id, nonces = uid("vm"), [uid("n") for _ in range(8)]
    try:
        tasks = await _one_batch(api, monitor, vm_id, nonces)
        barrier_pids = await blocked_by(monitor, await holder.fetchval("SELECT pg_backend_pid()"))
        await until(lambda: _ledger_count_is(monitor, vm_id, len(nonces)), "every entry committed")
        await monitor.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", barrier_pids)
        answers = await asyncio.gather(*tasks)
    finally:
        await holder.close()
        await monitor.close()
    assert (answers[0][0], answers[0][1]["decision"]) == (200, "accept"), answers  # the lone one: synchronous
    assert [(status, body["error"]["code"]) for status, body in answers[1:]] == [(503, "unavailable")] * 7, answers
    refused = nonces[1:]
    status, again = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "early", "nonce": refused[0]})
    assert (status, again["decision"], again["reason"]) == (200, "reject", "reused"), again
    status, fresh = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "early", "nonce": uid("n")})
    assert (status, fresh["decision"]) == (200, "accept"), fresh


async def test_an_analysts_read_is_answered_after_a_barrier(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """An authenticated GET waits for its barrier before its answer leaves: with the barrier held,
    /v1/status has its answer ready but does not send it until the barrier completes."""
    monkeypatch.setattr(http_app, "WAL_BARRIER", HELD_BARRIER)
    holder, monitor = await _hold(api.runtime.dsn), await asyncpg.connect(api.runtime.dsn)
    try:
        task = asyncio.create_task(api.get("/v1/status"))
        await blocked_by(monitor, await holder.fetchval("SELECT pg_backend_pid()"))
        assert not task.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", HELD)
        status, body = await task
    finally:
        await holder.close()
        await monitor.close()
    assert status == 200, body


async def test_the_continuity_guard_moves_its_floor_only_past_a_barrier(
    api: Api, api_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guard's check reads the head (moved by another instance's decision) and, before its floor
    moves to it, waits for a barrier: a head that a crash of the database server could still take
    back never becomes the floor."""
    monkeypatch.setattr(continuity, "WAL_BARRIER", HELD_BARRIER)
    guard, other = api.runtime.continuity, await api_factory()
    status, _ = await other.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "early", "nonce": uid("n")})
    assert status == 200
    holder, monitor = await _hold(api.runtime.dsn), await asyncpg.connect(api.runtime.dsn)
    try:
        floor = guard._floor
        check = asyncio.create_task(guard.check())
        await blocked_by(monitor, await holder.fetchval("SELECT pg_backend_pid()"))
        head = await monitor.fetchval("SELECT seq FROM ledger_head")
        assert not check.done() and guard._floor == floor < head
        await holder.execute("SELECT pg_advisory_unlock($1)", HELD)
        assert await check is None
    finally:
        await holder.close()
        await monitor.close()
    assert guard._floor >= head


async def test_an_alert_reaches_a_sink_only_past_a_barrier(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the feed's barrier held, an alert already committed is not written to the file sink (nor
    logged); once the barrier completes, it is."""
    monkeypatch.setattr(alertfeed, "WAL_BARRIER", HELD_BARRIER)
    out = tmp_path / "alerts.jsonl"
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), sinks=(f"file:{out}",))

    def alerts() -> list[dict[str, Any]]:
        lines = out.read_bytes().splitlines() if out.exists() else []
        return [record for record in map(orjson.loads, lines) if record["type"] == "alert"]

    holder, monitor = await _hold(dsn), await asyncpg.connect(dsn)
    try:
        alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
        await blocked_by(monitor, await holder.fetchval("SELECT pg_backend_pid()"))
        assert await monitor.fetchval("SELECT count(*) FROM alerts WHERE id = $1", int(alert_id)) == 1
        assert alerts() == []
        await holder.execute("SELECT pg_advisory_unlock($1)", HELD)
        await until(alerts, "the alert in the sink", 30)
    finally:
        await holder.close()
        await monitor.close()
    assert [record["alert_id"] for record in alerts()] == [alert_id]


async def test_the_barrier_flushes_an_earlier_asynchronous_commit(database_url: str) -> None:
    """A commit made with synchronous_commit off is past the WAL's flushed end; after the barrier runs on
    another connection it is not. ``pg_current_xact_id()`` alone, which writes no WAL, is not a barrier
    (shown on the same kind of commit, where the WAL writer did not happen to flush it first)."""
    table = uid("early_t")
    writer, other = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        await writer.execute(f'CREATE TABLE "{table}" (n int)')

        async def unflushed_commit() -> int:
            """The end of an asynchronous commit still past the flushed WAL (tries until the WAL
            writer, which flushes on its own every 200 ms, has not already done so)."""
            for _ in range(50):
                async with writer.transaction():
                    await writer.execute("SET LOCAL synchronous_commit = off")
                    await writer.execute(f'INSERT INTO "{table}" VALUES (1)')
                end = await writer.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
                if await other.fetchval("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn") < end:
                    return int(end)
            raise AssertionError("the WAL writer flushed every asynchronous commit first")

        async def flushed_past(end: int) -> bool:
            return bool(await other.fetchval("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn >= $1", end))

        end = await unflushed_commit()
        await other.execute(connections.WAL_BARRIER)
        assert await flushed_past(end)

        outcomes = []
        for _ in range(5):
            end = await unflushed_commit()
            await other.execute("SELECT pg_current_xact_id()")
            outcomes.append(await flushed_past(end))
        assert not all(outcomes), "a transaction id alone flushed every time"
    finally:
        await writer.execute(f'DROP TABLE IF EXISTS "{table}"')
        await writer.close()
        await other.close()


async def test_the_early_statement_turns_synchronous_commit_off_for_its_transaction_only(database_url: str) -> None:
    """Inside one transaction the early statement's setting is off; the session's stays on after it,
    so every other statement of the appender's connection commits synchronously."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET synchronous_commit = on")
        async with conn.transaction():
            await conn.fetch(appender._DECIDE_EARLY, "[]", 5, 1_000_000, True)
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        await conn.fetch(appender._DECIDE_EARLY, "[]", 5, 1_000_000, True)
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await conn.close()
