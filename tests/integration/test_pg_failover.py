"""PostgreSQL failover for real (Debian's PostgreSQL 15, a primary and a streaming standby
owned by the test): with synchronous replication a primary killed under load loses no
acknowledged accept; an asynchronous standby that had not caught up is refused
(ledger_rollback) until the recovery is recorded, and after it none of the uses it lost
is accepted again."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio

from replayguard.pg import schema
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, cli_env, run_cli
from tests.integration import pg_cluster
from tests.integration.owned_servers import scratch_dir
from tests.integration.test_ledger_continuity import nonce, readyz
from tests.integration.test_ledger_verify import verify
from tests.waiting import until

pytestmark = pytest.mark.skipif(not pg_cluster.available(), reason="needs root and Debian's PostgreSQL 15")


@pytest_asyncio.fixture
async def cluster_root() -> AsyncIterator[tuple[Path, list[pg_cluster.Server]]]:
    """A directory for a primary and a standby; every server started in it is stopped after."""
    servers: list[pg_cluster.Server] = []
    with scratch_dir("rg-ha-") as root:
        try:
            yield root, servers
        finally:
            for server in servers:
                await asyncio.to_thread(server.discard)


async def cluster(root: Path, servers: list[pg_cluster.Server], *, synchronous: bool
                  ) -> tuple[pg_cluster.Server, pg_cluster.Server]:
    primary = await asyncio.to_thread(pg_cluster.make_primary, root / "pg")
    servers.append(primary)
    admin = await asyncpg.connect(primary.url())
    try:
        await admin.execute("CREATE DATABASE rg")
    finally:
        await admin.close()
    await schema.migrate_dsn(primary.url("rg"))
    standby = await asyncio.to_thread(pg_cluster.make_standby, root / "pg", primary)
    servers.append(standby)
    if synchronous:
        for statement in pg_cluster.SYNCHRONOUS:
            await fetchval(primary.url(), statement)
    return primary, standby


async def fetchval(url: str, query: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def load(api: Api, stop: asyncio.Event, accepted: list[str], clients: int = 16) -> None:
    """Nonces from ``clients`` concurrent callers until ``stop``; each acknowledged accept is kept."""
    async def caller() -> None:
        while not stop.is_set():
            value = secrets.token_hex(8)
            try:
                status, body = await nonce(api, value)
            except Exception:  # noqa: BLE001, S112 - a connection cut by the crash is an unacknowledged answer
                continue
            if status == 200 and body["decision"] == "accept":
                accepted.append(value)
            elif status != 200:
                await asyncio.sleep(0.01)

    await asyncio.gather(*(caller() for _ in range(clients)))


async def test_sync_failover_loses_no_acknowledged_accept(
        cluster_root: tuple[Path, list[pg_cluster.Server]], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """kill -9 of a primary with a synchronous standby under load, then promotion: every
    accept the service acknowledged is on the standby, and nothing is refused."""
    root, servers = cluster_root
    primary, standby = await cluster(root, servers, synchronous=True)
    witness = tmp_path / "witness.json"
    settings = {"checkpoint_every": 20, "witnesses": (f"file:{witness}",)}
    api = await api_factory(database_url=Secret(primary.url("rg")), **settings)

    async def reported_sync() -> bool:
        ready = await readyz(api)
        return bool(ready[1]["checks"]["sync_standby"] == "yes")

    await until(reported_sync, "readyz to report the synchronous standby", timeout=30)
    metrics = await (await api.client.get("/metrics")).text()
    assert "replayguard_postgres_sync_standbys 1.0" in metrics
    stop = asyncio.Event()
    accepted: list[str] = []
    running = asyncio.create_task(load(api, stop, accepted))
    await until(lambda: _at_least(accepted, 200), "200 acknowledged accepts", timeout=120)
    await asyncio.to_thread(primary.crash)
    stop.set()
    await running
    await asyncio.to_thread(standby.promote)
    await api.client.close()

    after = await api_factory(database_url=Secret(standby.url("rg")), **settings)
    assert (await readyz(after))[0] == 200
    for value in accepted:
        status, body = await nonce(after, value)
        assert status == 200 and body["reason"] == "reused", (value, body)
    assert (await verify(after))["ok"] is True
    print(f"acknowledged accepts before the crash: {len(accepted)}, all on the promoted standby")


async def _at_least(items: list[str], count: int) -> bool:
    return len(items) >= count


async def test_async_failover_is_refused_until_recovered_and_loses_nothing(
        cluster_root: tuple[Path, list[pg_cluster.Server]], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A standby whose stream was cut and replay paused before 10 accepts is promoted: decisions are refused
    (ledger_rollback); after accept-rollback, none of the 10 nonces is accepted again."""
    root, servers = cluster_root
    primary, standby = await cluster(root, servers, synchronous=False)
    witness = tmp_path / "witness.json"
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    clock = FakeClock(time.time())
    api = await api_factory(clock=clock, database_url=Secret(primary.url("rg")), **settings)
    assert (await readyz(api))[1]["checks"]["sync_standby"] == "no"
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    target = await fetchval(primary.url("rg"), "SELECT pg_current_wal_lsn()::text")

    async def caught_up() -> bool:
        return bool(await fetchval(standby.url("rg"), f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"))

    await until(caught_up, "the standby to catch up", timeout=30)
    # A lagging asynchronous standby: what it has not received it cannot replay at promotion
    # (PostgreSQL replays every received record when promoted, paused or not), so its
    # stream is cut as well as its replay paused.
    await asyncio.to_thread(standby.detach)

    async def detached() -> bool:
        return await fetchval(standby.url("rg"), "SELECT count(*) FROM pg_stat_wal_receiver") == 0

    await until(detached, "the standby to be detached", timeout=30)
    await fetchval(standby.url("rg"), "SELECT pg_wal_replay_pause()")
    standby_head = await fetchval(standby.url("rg"), "SELECT seq FROM ledger_head")
    lost = [secrets.token_hex(8) for _ in range(10)]
    for value in lost:
        assert (await nonce(api, value))[1]["decision"] == "accept"
    await until(lambda: _witnessed_past(witness, standby_head + 5), "the witness past the standby's head",
                timeout=30)
    await asyncio.to_thread(primary.crash)
    await asyncio.to_thread(standby.promote)
    await api.client.close()
    promoted_head = await fetchval(standby.url("rg"), "SELECT seq FROM ledger_head")
    assert promoted_head < standby_head + 5, "the promoted standby replayed what it had not applied"

    after = await api_factory(clock=clock, database_url=Secret(standby.url("rg")), **settings)
    status, body = await nonce(after, lost[0])
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    assert (await readyz(after))[0] == 503
    env = cli_env(REPLAYGUARD_DATABASE_URL=standby.url("rg"), REPLAYGUARD_DATA_DIR=str(tmp_path / "data"),
                  REPLAYGUARD_WITNESSES=f"file:{witness}")
    done = run_cli("ledger", "accept-rollback", "--reason", "failover to an asynchronous standby", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert orjson.loads(done.stdout)["abandoned"]["seq"] >= standby_head + 5

    async def serving() -> bool:
        return (await readyz(after))[0] == 200

    await until(serving, "decisions to be served again", timeout=30)
    for value in lost:
        status, body = await nonce(after, value)
        assert status == 200 and body["decision"] == "reject" and body["reason"] == "reused", body


async def _witnessed_past(path: Path, seq: int) -> bool:
    try:
        return int(orjson.loads(path.read_bytes())["checkpoint"]["seq"]) >= seq
    except (OSError, ValueError, KeyError):
        return False
