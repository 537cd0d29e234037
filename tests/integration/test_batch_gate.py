"""The batch gate of several appenders on one ledger (replayguard/pg/appender.py, GATE_LOCK).

With ``workers > 1`` each appender takes a session advisory lock before cutting a batch and
``rg_decide`` releases it before its commit. The gate only orders batches (the head lock
keeps them safe), so what must hold is: a credential raced across gated appenders is
accepted once; the gate is really taken (a gated appender waits while another session holds
it, an ungated one does not); and no way out of a batch (an answer, a failed call, a
cancelled wait) leaves the gate held, which would stall every other appender.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg

from replayguard.pg.appender import GATE_LOCK
from replayguard.settings import Secret
from tests.conftest import uid
from tests.integration.ledger_check import verify_chain
from tests.waiting import until

# pg_locks splits a bigint advisory key into classid (high 32 bits) and objid (low 32 bits).
_GATE_HOLDERS = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                 " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                 " AND (classid::bigint << 32 | objid::bigint) = $1")
_GATE_WAITERS = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                 " AND wait_event_type = 'Lock' AND wait_event = 'advisory'")


async def _gate_holders(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(_GATE_HOLDERS, GATE_LOCK))
    finally:
        await conn.close()


def _nonce(vm_id: str, scope: str, nonce: str) -> dict[str, Any]:
    return {"vm_id": vm_id, "scope": scope, "nonce": nonce}


async def test_gated_appenders_accept_a_raced_credential_once_and_leave_the_gate_free(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Two instances of ``workers = 2`` (so gated) on one ledger: 120 fresh nonces at once are
    all accepted, a nonce raced 16 times across both is accepted once, the chain verifies, and
    afterwards no session holds the gate."""
    dsn = await fresh_database()
    one = await api_factory(database_url=Secret(dsn), workers=2)
    other = await api_factory(database_url=Secret(dsn), workers=2)
    assert one.runtime.appender._gate and other.runtime.appender._gate
    scope = uid("scope")
    fresh = [(one if i % 2 else other).post("/v1/nonces/consume", _nonce(f"vm-{i % 8}", scope, f"n-{i}"))
             for i in range(120)]
    raced = [(one if i % 2 else other).post("/v1/nonces/consume", _nonce(f"vm-{i % 8}", scope, "shared"))
             for i in range(16)]
    answers = await asyncio.gather(*fresh, *raced)
    assert Counter(status for status, _ in answers) == {200: 136}
    assert all(body["decision"] == "accept" for _, body in answers[:120])
    assert Counter(body["reason"] for _, body in answers[120:]) == {"ok": 1, "reused": 15}
    await verify_chain(dsn)
    assert await _gate_holders(dsn) == 0


async def test_a_gated_appender_waits_for_the_gate_and_an_ungated_one_does_not(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Differential: while another session holds the gate, one worker's appender (no gate)
    answers and a gated one's decision waits on the advisory lock; released, it is accepted."""
    dsn = await fresh_database()
    gated = await api_factory(database_url=Secret(dsn), workers=2)
    plain = await api_factory(database_url=Secret(dsn))
    assert not plain.runtime.appender._gate
    scope = uid("scope")
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", GATE_LOCK)
        waiting = asyncio.ensure_future(gated.post("/v1/nonces/consume", _nonce("vm-g", scope, "gated")))
        await until(lambda: holder.fetchval(_GATE_WAITERS), "the gated appender waiting on the gate")
        status, body = await plain.post("/v1/nonces/consume", _nonce("vm-p", scope, "plain"))
        assert (status, body["decision"]) == (200, "accept")
        assert not waiting.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", GATE_LOCK)
        status, body = await waiting
        assert (status, body["decision"]) == (200, "accept")
    finally:
        await holder.close()
    assert await _gate_holders(dsn) == 0


async def test_a_gated_batch_that_fails_releases_the_gate(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """A gated batch whose ``rg_decide`` fails after taking the gate (a trigger refuses its
    ledger row) is answered 503 and its session ends, releasing the gate: the other gated
    instance's next decisions are accepted, not left waiting until their statements time out."""
    dsn = await fresh_database()
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("""
            CREATE FUNCTION test_refuse_vm() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.vm_id = 'vm-refused' THEN RAISE EXCEPTION 'refused by the test'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_refuse_vm BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION test_refuse_vm();
        """)
    finally:
        await admin.close()
    one = await api_factory(database_url=Secret(dsn), workers=2, statement_timeout_ms=3000)
    other = await api_factory(database_url=Secret(dsn), workers=2, statement_timeout_ms=3000)
    scope = uid("scope")
    status, _ = await one.post("/v1/nonces/consume", _nonce("vm-refused", scope, "refused"))
    assert status == 503
    assert await _gate_holders(dsn) == 0
    for api, nonce in ((other, "after-1"), (one, "after-2"), (other, "after-3")):
        status, body = await api.post("/v1/nonces/consume", _nonce("vm-ok", scope, nonce))
        assert (status, body["decision"]) == (200, "accept"), body


async def test_a_cancelled_wait_for_the_gate_leaves_it_free(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """An appender cancelled while it waits for the gate (as at shutdown) ends its session, so
    that it cannot hold the gate once granted: the gate is free after the holder lets go, and
    the queued decision and the next one are both accepted on a new session."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), workers=2)
    appender = api.runtime.appender
    scope = uid("scope")
    status, _ = await api.post("/v1/nonces/consume", _nonce("vm-c", scope, "before"))
    assert status == 200
    backend = (await appender._conn.get()).get_server_pid()
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", GATE_LOCK)
        queued = asyncio.ensure_future(api.post("/v1/nonces/consume", _nonce("vm-c", scope, "queued")))
        await until(lambda: holder.fetchval(_GATE_WAITERS), "the appender waiting on the gate")
        for task in list(appender._tasks):
            task.cancel()
        await until(lambda: not appender._tasks, "the cancelled drain to end")
        await until(lambda: holder.fetchval("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                                            backend), "the appender's session to end")
        await holder.execute("SELECT pg_advisory_unlock($1)", GATE_LOCK)
    finally:
        await holder.close()
    assert await _gate_holders(dsn) == 0
    status, body = await api.post("/v1/nonces/consume", _nonce("vm-c", scope, "after"))
    assert (status, body["decision"]) == (200, "accept")
    status, body = await queued
    assert (status, body["decision"]) == (200, "accept")
    await verify_chain(dsn)
