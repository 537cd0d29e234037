"""Durability settings: the ledger's commits are synchronous, asserted from inside its own sessions.

An acknowledged accept survives a crash only if its commit waited for the WAL flush.
``synchronous_commit`` can be turned off per session, per function, per role or per
database; each of these tests looks at one of those places from where the ledger writes.
"""

from __future__ import annotations

import asyncio

from tests.conftest import Api, uid


async def test_appender_connection_commits_synchronously(api: Api) -> None:
    """The group-commit appender's own kept connection reports synchronous_commit on after a decision."""
    status, answer = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "dur", "nonce": uid()})
    assert (status, answer["decision"]) == (200, "accept")
    conn = await api.runtime.appender._conn.get()  # the very session that wrote the decision
    assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_every_pool_connection_commits_synchronously(api: Api) -> None:
    """Every connection of the service's pool, held at once, reports synchronous_commit on."""
    pool = api.runtime.pool
    size = pool.get_max_size() - (1 if api.runtime.appender._conn._conn is not None else 0)
    held = [await pool.acquire() for _ in range(size)]
    try:
        values = await asyncio.gather(*(conn.fetchval("SHOW synchronous_commit") for conn in held))
    finally:
        for conn in held:
            await pool.release(conn)
    assert set(values) == {"on"}, values


async def test_no_function_database_or_role_overrides_synchronous_commit(api: Api) -> None:
    """No stored function (e.g. rg_decide) and no per-database or per-role setting carries its own
    synchronous_commit: a function-level SET would apply inside the decision's transaction only."""
    async with api.runtime.pool.acquire() as conn:
        functions = await conn.fetch(
            "SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = current_schema() AND array_to_string(p.proconfig, ',') ILIKE '%synchronous_commit%'")
        overrides = await conn.fetch(
            "SELECT setdatabase, setrole, setconfig FROM pg_db_role_setting"
            " WHERE setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))"
            " AND array_to_string(setconfig, ',') ILIKE '%synchronous_commit%'")
        source = await conn.fetch(
            "SELECT prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = current_schema() AND prosrc ILIKE '%synchronous_commit%'")
    assert [dict(r) for r in functions] == [] and [dict(r) for r in overrides] == [] and source == []


async def test_every_pool_connection_has_the_server_give_up_on_a_vanished_client(api: Api) -> None:
    """Over TCP the server probes an idle client after 30 s and gives up after three missed
    probes 10 s apart: a half-open session cannot keep a lock for the system's two hours."""
    async with api.runtime.pool.acquire() as conn:
        values = [await conn.fetchval(f"SHOW {name}")
                  for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")]
    assert values == ["30", "10", "3"], values
