"""Fixtures the integration tests share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.integration.owned_servers import OwnedPostgres, OwnedRedis, scratch_dir


@pytest_asyncio.fixture
async def owned_redis(tmp_path: Path) -> AsyncIterator[OwnedRedis]:
    """A Redis this test alone uses, and may stop, restart and flush."""
    server = OwnedRedis(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


@pytest_asyncio.fixture
async def owned_pg() -> AsyncIterator[OwnedPostgres]:
    """A PostgreSQL this test alone uses, and may stop hard and start again."""
    with scratch_dir("rg-owned-pg-") as directory:
        server = await asyncio.to_thread(OwnedPostgres, directory / "data")
        try:
            yield server
        finally:
            await asyncio.to_thread(server.close)
