"""Fixtures the integration tests share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.integration.owned_servers import OwnedRedis


@pytest_asyncio.fixture
async def owned_redis(tmp_path: Path) -> AsyncIterator[OwnedRedis]:
    """A Redis this test alone uses, and may stop, restart and flush."""
    server = OwnedRedis(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)
