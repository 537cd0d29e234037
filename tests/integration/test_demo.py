"""`replayguard demo` plays the seed's attack on the embedded default and exits 0, and on a
given database leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from replayguard.cli import demo
from replayguard.cli.main import main
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
