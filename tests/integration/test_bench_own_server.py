"""bench/own_server.py: the benchmark's own PostgreSQL server runs with the settings
docs/operations.md tells an operator to use, and leaves nothing behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.bench_scripts import load
from tests.integration import pg_cluster

pytestmark = pytest.mark.skipif(not pg_cluster.available(), reason="needs root and Debian's PostgreSQL 15")


async def _settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                                ["autovacuum", "fsync", "synchronous_commit", "max_wal_size", "checkpoint_timeout",
                                 "max_connections", "server_version_num"])
    finally:
        await conn.close()
    return {row["name"]: row["setting"] + (row["unit"] or "") for row in rows}


def test_the_own_server_runs_as_an_operator_would_set_it_up_and_is_removed() -> None:
    """Version 15 on 127.0.0.1, autovacuum, fsync and synchronous commits on, the embedded
    server's WAL and checkpoint settings; after the block its directory is gone."""
    own = load("own_server")
    with own.own_server() as url:
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        settings = asyncio.run(_settings(url))
        root = next(Path("/var/tmp").glob("rg-bench-pg-*"))
    assert settings["server_version_num"].startswith("15")
    assert (settings["autovacuum"], settings["fsync"], settings["synchronous_commit"]) == ("on", "on", "on")
    assert settings["max_wal_size"] == "4096MB" and settings["checkpoint_timeout"] == "900s"
    assert settings["max_connections"] == "100"
    assert not root.exists()
