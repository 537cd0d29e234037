"""`replayguard demo` plays the seed's attack on the embedded default and exits 0, and on a
given database leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from replayguard.cli import demo
from replayguard.cli.main import main
from replayguard.http.common import MAX_HEADERS
from replayguard.settings import Secret, Settings
from tests.conftest import PG_ADMIN, run_cli


@pytest.mark.slow
def test_demo_refuses_the_replay_and_verifies_the_ledger() -> None:
    """The narrated demo refuses the replay as replay_after_rollback with a verified ledger, then
    refuses a replay against a restored database (ledger_rollback) and records the recovery."""
    result = run_cli("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reject as replay_after_rollback" in out
    assert "critical replay_after_rollback" in out
    assert "The ledger verifies: ok=True" in out
    assert "against the restored ledger: HTTP 503 ledger_rollback" in out
    assert "replays the nonce again: reject as reused" in out
    assert "Refused, reported and recovered." in out
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_demo_on_a_given_database_drops_the_backup_it_made(
        fresh_database: Callable[[], Any], monkeypatch: pytest.MonkeyPatch, structlog_restored: None) -> None:
    """`replayguard demo --database-url URL` stages its restore in a copy of the database
    (replayguard_backup_<hex> on the same server) and drops that copy before it exits: every
    run leaves the operator's PostgreSQL as it found it."""
    dsn = await fresh_database()
    made: list[str] = []
    copy = demo._copy_database

    async def recording(source: str) -> str:
        made.append(await copy(source))
        return made[-1]

    monkeypatch.setattr(demo, "_copy_database", recording)
    status = await asyncio.to_thread(main, ["demo", "--database-url", dsn])
    names = [urlsplit(url).path.lstrip("/") for url in made]
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        left = [name for name in names
                if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)]
        for name in left:  # this test's own leftovers go either way
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    assert status == 0 and names
    assert not left, left


async def test_the_demo_serves_the_app_as_serve_does(
        fresh_database: Callable[[], Any], tmp_path: Path, structlog_restored: None) -> None:
    """The demo's service answers its decisions through the fast front (its counter moves)
    and holds a request to ``serve``'s header limits: one with more headers than
    ``MAX_HEADERS`` is refused with a 400, where aiohttp's defaults would take it."""
    dsn = await fresh_database()
    settings = Settings(database_url=Secret(dsn), data_dir=tmp_path / "data")
    async with demo._serving(settings) as (client, runtime):
        answered = runtime.metrics.front.answered
        status, body = await client.call("POST", "/v1/nonces/consume", "callout",
                                         {"vm_id": "vm-1", "scope": "s", "nonce": "n" * 32})
        assert (status, body["decision"]) == (200, "accept"), body
        assert runtime.metrics.front.answered == answered + 1
        flood = {f"X-Extra-{n}": "1" for n in range(MAX_HEADERS + 1)}
        async with client._session.get(client._base + "/healthz", headers=flood) as resp:
            assert resp.status == 400
