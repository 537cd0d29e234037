"""A database restored in place while services use it: a copy taken now (the operator's
backup of the moment), later put under the original name (a restore from that backup, or
a lagging standby promoted behind the same URL)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest_asyncio

from tests.conftest import PG_ADMIN, drop_database, dsn_for


def _name(dsn: str) -> str:
    return dsn.rpartition("/")[2]


async def _closed_to_sessions(admin: asyncpg.Connection, name: str, statement: str) -> None:
    """Runs ``statement`` while ``name`` takes no new session, ending its sessions until it
    succeeds (the services reconnect afterwards)."""
    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        for _ in range(500):
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            try:
                await admin.execute(statement)
                return
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.005)
        raise AssertionError(f"could not run {statement!r}")
    finally:
        # Renamed away by ``statement`` (a restore): the copy now under the name takes sessions.
        with contextlib.suppress(asyncpg.InvalidCatalogNameError):
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@contextlib.asynccontextmanager
async def refusing_sessions(dsn: str) -> AsyncIterator[None]:
    """``dsn``'s database takes no session while the block runs (a restart, a restore under
    way): its sessions are ended and new ones refused, until the block ends."""
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'ALTER DATABASE "{_name(dsn)}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = $1 AND pid <> pg_backend_pid()", _name(dsn))
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{_name(dsn)}" ALLOW_CONNECTIONS true')
        await admin.close()


async def snapshot(dsn: str) -> str:
    """A copy of the database as it is now; returns the copy's DSN (for the test's scratch
    list: ``restore`` moves it under the original name)."""
    copy = f"rg_copy_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await _closed_to_sessions(admin, _name(dsn), f'CREATE DATABASE "{copy}" TEMPLATE "{_name(dsn)}"')
    finally:
        await admin.close()
    return dsn_for(copy)


async def restore(dsn: str, copy: str, scratch: list[str]) -> None:
    """Puts ``copy`` in place of ``dsn``'s database (same name, so the same URL). In
    ``scratch`` (the databases the test drops), the replaced database takes the copy's place."""
    gone = f"rg_gone_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await _closed_to_sessions(admin, _name(dsn), f'ALTER DATABASE "{_name(dsn)}" RENAME TO "{gone}"')
        scratch.append(dsn_for(gone))
        await admin.execute(f'ALTER DATABASE "{_name(copy)}" RENAME TO "{_name(dsn)}"')
        scratch.remove(copy)
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def scratch_dbs() -> AsyncIterator[list[str]]:
    """DSNs appended here are dropped after the test (list this fixture before
    ``api_factory``, so the services are closed first)."""
    made: list[str] = []
    yield made
    for dsn in made:
        await drop_database(dsn)


async def settled(call: Callable[[], Awaitable[tuple[int, Any]]], timeout: float = 15.0) -> tuple[int, Any]:
    """Repeats a decision while it is answered 503 ``unavailable`` (the pool reconnecting
    after the database was swapped), never once it was answered otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await call()
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        if not (status == 503 and code == "unavailable") or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(0.05)
