"""Nothing acknowledged is lost by a crash: SIGKILL the service under load, restart, check.

Every nonce the service answered ``accept`` before it died is refused as ``reused`` after
the restart, and is in the ledger at the ``seq`` it was acknowledged with.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from replayguard.core.credentials import nonce_digest
from tests.conftest import ServiceProcess, cli_env, run_cli, uid
from tests.integration.owned_servers import scratch_dir, stop_embedded

WORKERS = 16
KILL_AFTER_ACKS = 200
MAX_PER_WORKER = 1000


def _token(data_dir: Path, database_url: str | None) -> str:
    args = ["token", "create", "--role", "callout", "--name", uid("crash"), "--data-dir", str(data_dir)]
    if database_url is not None:
        args += ["--database-url", database_url]
    done = run_cli(*args, env=cli_env())
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def _consume(session: aiohttp.ClientSession, url: str, token: str, vm: str, scope: str,
                   nonce: str) -> dict[str, Any]:
    async with session.post(f"{url}/v1/nonces/consume", json={"vm_id": vm, "scope": scope, "nonce": nonce},
                            headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def _load_then_kill(service: ServiceProcess, token: str, scope: str) -> tuple[dict[str, int], set[str]]:
    """Consumes distinct nonces from many workers; SIGKILLs the service mid-load.

    Returns the acknowledged accepts (nonce → seq) and the nonces whose answer was lost.
    """
    acked: dict[str, int] = {}
    in_doubt: set[str] = set()
    killed = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, w: int) -> None:
        for i in range(MAX_PER_WORKER):
            nonce = f"{scope}-{w}-{i}"
            try:
                answer = await _consume(session, service.url, token, f"vm-{w}", scope, nonce)
            except (TimeoutError, aiohttp.ClientError):
                in_doubt.add(nonce)
                return
            assert answer["decision"] == "accept", answer  # each nonce is new
            acked[nonce] = answer["seq"]
            if len(acked) >= KILL_AFTER_ACKS and not killed.is_set():
                killed.set()
                service.proc.send_signal(signal.SIGKILL)  # while the other workers are mid-request

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session, w) for w in range(WORKERS)))
    assert killed.is_set(), "the load ended before the kill"
    await asyncio.to_thread(service.proc.wait, 15)
    assert service.proc.returncode == -signal.SIGKILL
    return acked, in_doubt


async def _check_ledger(dsn: str, pepper: bytes, scope: str, acked: dict[str, int]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT seq, cred_digest, decision FROM ledger WHERE subject = $1", scope)
        chain_breaks = await conn.fetchval(
            "SELECT count(*) FROM (SELECT seq, prev_hash, lag(hash) OVER (ORDER BY seq) AS prev,"
            " lag(seq) OVER (ORDER BY seq) AS prev_seq FROM ledger) t"
            " WHERE prev_seq IS NOT NULL AND (prev IS DISTINCT FROM prev_hash OR seq <> prev_seq + 1)"
        )
    finally:
        await conn.close()
    by_seq = {r["seq"]: r for r in rows}
    for nonce, seq in acked.items():
        row = by_seq.get(seq)
        assert row is not None, f"acknowledged accept at seq {seq} is missing from the ledger"
        assert row["decision"] == "accept"
        assert bytes(row["cred_digest"]) == nonce_digest(pepper, scope, nonce.encode())
    assert chain_breaks == 0


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_accept(
    tmp_path: Path, fresh_database: Callable[[], Any], service_factory: Callable[..., Any],
) -> None:
    """Every nonce accepted before a SIGKILL under load is refused as reused after restart."""
    dsn = await fresh_database()
    data_dir = tmp_path / "data"
    token = _token(data_dir, dsn)
    service = await service_factory(data_dir=data_dir, database_url=dsn)
    scope = uid("crash")
    acked, in_doubt = await _load_then_kill(service, token, scope)
    assert len(acked) >= KILL_AFTER_ACKS

    restarted = await service_factory(data_dir=data_dir, database_url=dsn)
    async with aiohttp.ClientSession() as session:
        again = await asyncio.gather(*(
            _consume(session, restarted.url, token, uid("vm"), scope, nonce) for nonce in acked
        ))
        assert {(a["decision"], a["reason"]) for a in again} == {("reject", "reused")}
        # An answer lost in the crash may or may not have been committed; either way the
        # nonce is accepted at most once across the crash.
        doubtful = await asyncio.gather(*(
            _consume(session, restarted.url, token, uid("vm"), scope, nonce) for nonce in sorted(in_doubt)
        ))
        assert all((a["decision"], a["reason"]) in {("accept", "ok"), ("reject", "reused")} for a in doubtful)
    pepper = bytes.fromhex((data_dir / "keys" / "pepper.key").read_text().strip())
    await _check_ledger(dsn, pepper, scope, acked)


@pytest.mark.slow
async def test_embedded_default_remembers_accept_across_sigkill(service_factory: Callable[..., Any]) -> None:
    """On the embedded PostgreSQL, an accept made before kill -9 is refused after a restart."""
    with scratch_dir() as scratch:
        await _embedded_crash(scratch / "data", service_factory)


async def _embedded_crash(data_dir: Path, service_factory: Callable[..., Any]) -> None:
    try:
        token = await asyncio.to_thread(_token, data_dir, None)  # initialises the embedded server
        service = await service_factory(data_dir=data_dir, database_url=None)
        scope, nonce = uid("emb"), uid("nonce")
        async with aiohttp.ClientSession() as session:
            first = await _consume(session, service.url, token, "vm-1", scope, nonce)
            assert (first["decision"], first["reason"]) == ("accept", "ok")
        service.kill(signal.SIGKILL)
        assert service.proc.returncode == -signal.SIGKILL

        restarted = await service_factory(data_dir=data_dir, database_url=None)
        async with aiohttp.ClientSession() as session:
            again = await _consume(session, restarted.url, token, "vm-1", scope, nonce)
        assert (again["decision"], again["reason"]) == ("reject", "reused")
        assert again["seq"] > first["seq"]
        restarted.kill(signal.SIGTERM)
    finally:
        await asyncio.to_thread(stop_embedded, data_dir)
