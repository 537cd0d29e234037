"""Start-up warns about PostgreSQL settings that undo a promise: durability (fsync,
synchronous_commit) and the vacuum that keeps the per-decision tables small."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from structlog.testing import capture_logs

from replayguard.pg import connections
from tests.conftest import run_cli
from tests.integration.owned_servers import OwnedPostgres
from tests.waiting import until


async def _reload_with(url: str, **settings: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for name, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = {value}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _settings_are(url: str, **expected: str) -> bool:
    """Whether a new session of the server sees ``expected`` (name: value)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])", list(expected))
    finally:
        await conn.close()
    return {row["name"]: row["setting"] for row in rows} == expected


async def test_a_server_that_turns_off_fsync_and_autovacuum_is_named_at_start(owned_pg: OwnedPostgres) -> None:
    """The embedded server's settings draw no warning; the same server with fsync and
    autovacuum turned off draws one warning line each, naming the setting and its cost."""
    with capture_logs() as quiet:
        assert await connections.warn_about_settings(owned_pg.url) == []
    assert [e for e in quiet if e["event"] == "postgres_setting_risky"] == []

    await _reload_with(owned_pg.url, fsync="off", autovacuum="off")
    # The reload reaches new sessions once the postmaster has read the file.
    await until(lambda: _settings_are(owned_pg.url, fsync="off", autovacuum="off"), "the reloaded settings")
    with capture_logs() as logged:
        assert await connections.warn_about_settings(owned_pg.url) == ["fsync", "autovacuum"]
    warned = [e for e in logged if e["event"] == "postgres_setting_risky"]
    assert [(e["setting"], e["value"], e["log_level"]) for e in warned] == [
        ("fsync", "off", "warning"), ("autovacuum", "off", "warning")]
    assert "crash" in warned[0]["consequence"] and "VACUUM" in warned[1]["consequence"]


async def test_migrate_names_the_setting_and_token_commands_keep_one_line(
        owned_pg: OwnedPostgres, tmp_path: Path) -> None:
    """On a server with autovacuum off, `migrate` logs the warning; `token create` does not (its
    stderr stays one error line or nothing), and a failing one still prints one line."""
    await _reload_with(owned_pg.url, autovacuum="off")
    await until(lambda: _settings_are(owned_pg.url, autovacuum="off"), "the reloaded setting")
    common = ("--database-url", owned_pg.url, "--data-dir", str(tmp_path / "data"))
    migrated = await asyncio.to_thread(run_cli, "migrate", *common)
    assert migrated.returncode == 0, migrated.stderr
    assert '"setting":"autovacuum"' in migrated.stderr and "postgres_setting_risky" in migrated.stderr
    made = await asyncio.to_thread(run_cli, "token", "create", "--role", "analyst", "--name", "a1", *common)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    again = await asyncio.to_thread(run_cli, "token", "create", "--role", "analyst", "--name", "a1", *common)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr

