"""A lost ledger answer after a recorded recovery: the appender looks its batch up above the
recovery's entry, not only above the newest entry it saw committed on the chain the
recovery gave up."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from replayguard.core.credentials import nonce_digest
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock
from tests.integration.db_restore import restore, scratch_dbs, snapshot
from tests.integration.tcp_proxy import proxied
from tests.integration.test_ledger_continuity import _held_at_least
from tests.integration.test_ledger_continuity_guard import _accept_rollback
from tests.integration.test_restore_in_place import ready
from tests.waiting import until

__all__ = ["scratch_dbs"]


async def _decisions(dsn: str, api: Api, nonce: str) -> list[str]:
    digest = nonce_digest(api.runtime.keys.pepper, "s", nonce.encode())
    conn = await asyncpg.connect(dsn)
    try:
        return [r["decision"] for r in await conn.fetch(
            "SELECT decision FROM ledger WHERE cred_digest = $1 ORDER BY seq", digest)]
    finally:
        await conn.close()


async def test_a_lost_answer_after_a_recovery_is_not_called_nothing_accepted(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """After the database was restored under the running process (found through the
    witness) and ``ledger accept-rollback`` was recorded, new entries are numbered below the
    newest entry the appender saw committed: a decision PostgreSQL committed as ``accept``
    whose answer was lost is still found and answered ``accept`` (not 503 "nothing was
    accepted" with the nonce spent)."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    dsn = await fresh_database()
    clock = FakeClock(time.time())
    async with proxied(dsn) as (proxy, via_proxy):
        api: Api = await api_factory(clock=clock, database_url=Secret(via_proxy), statement_timeout_ms=300,
                                     **settings)
        await until(lambda: ready(api), "the service ready", timeout=30)
        assert (await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": "n0"}))[0] == 200
        scratch_dbs.append(copy := await snapshot(dsn))
        await until(lambda: ready(api), "the service ready again", timeout=30)
        for i in range(12):
            status, body = await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": f"n{i + 1}"})
            assert (status, body.get("decision")) == (200, "accept"), body
        conn = await asyncpg.connect(copy)
        try:
            copy_head = int(await conn.fetchval("SELECT seq FROM ledger_head"))
        finally:
            await conn.close()
        await until(lambda: _held_at_least(witness, copy_head + 5), "the witness past the copy", timeout=90)

        await restore(dsn, copy, scratch_dbs)
        guard = api.runtime.continuity

        async def found() -> bool:
            return guard.rollback is not None

        await until(found, "the guard to find the restore through the witness", timeout=30)
        _accept_rollback(dsn, tmp_path / "data", "restored a copy", witness)
        await until(lambda: ready(api), "decisions served after the recovery", timeout=30)
        clock.advance(120)  # nonces issued after the recovery pass

        # The answer to the next batch sent is lost (the network fails after rg_decide's call
        # went out, whichever connection carries it): every 503 must still be true.
        proxy.reply_trap = b'"batch"'  # the connection that carries the next group commit
        for _ in range(20):
            value = secrets.token_hex(8)
            body_in = {"vm_id": "vm-1", "scope": "s", "nonce": value, "issued_at": clock.now, "ttl_s": 600}
            status, body = await api.post("/v1/nonces/consume", body_in)
            if status == 200 and proxy.reply_trap is None:
                break
            assert status == 503, body
            held = await _decisions(dsn, api, value)
            if "nothing was accepted" in body["error"]["message"]:
                assert held == [], (body, held)
        else:
            raise AssertionError("no decision was answered after the lost one")
