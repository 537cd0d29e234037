"""Migrations: an empty database migrates from zero, and again is a no-op."""

from __future__ import annotations

import asyncpg

from replayguard import db
from tests.conftest import PG_ADMIN, drop_database, dsn_for


async def test_migrate_from_zero_then_noop() -> None:
    """Every numbered file applies in order on an empty database; a second run applies none."""
    name = "rg_migrate_zero_" + __import__("secrets").token_hex(4)
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = dsn_for(name)
    try:
        conn = await db.connect(dsn)
        try:
            first = await db.migrate(conn)
            second = await db.migrate(conn)
            versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
        finally:
            await conn.close()
    finally:
        await drop_database(dsn)
    assert first == [m.name for m in db.load_migrations()]
    assert second == []
    assert versions == sorted(m.version for m in db.load_migrations())
