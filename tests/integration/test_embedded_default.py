"""The embedded default, and start-up that fails on bad configuration with one clear line.

``replayguard serve`` with no database URL runs its own PostgreSQL under the data dir and
keeps everything across restarts; ``token create`` prints the token alone. A bad URL, an
unreachable database, a port in use or a bad key file stops start-up with exit status 2
and a single line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from replayguard.pg.embedded import WORKLOAD_SETTINGS, EmbeddedServer, claim_data_dir, memory_bytes, shared_buffers_mb
from tests.conftest import cli_env, dead_url, run_cli, scrape, uid
from tests.integration.owned_servers import OwnedPostgres, scratch_dir, stop_embedded
from tests.waiting import until

TOKEN_LINE = re.compile(r"^rgt_[A-Za-z0-9_\-]{20,}\n$")


def _embedded_uri(data_dir: Path) -> str:
    server = EmbeddedServer(data_dir, claim_data_dir(data_dir, embedded=True))
    sockets = server.running_socket_dir()
    assert sockets is not None
    return server.dsn(sockets)


async def _shared_buffers_mb(conn: asyncpg.Connection) -> int:
    """The server's shared buffers in MB (``pg_settings`` counts 8 kB pages)."""
    return int(await conn.fetchval("SELECT setting::bigint * 8 / 1024 FROM pg_settings WHERE name = 'shared_buffers'"))


async def _writeback_files(url: str) -> float:
    return (await scrape(url, "replayguard_embedded_writeback_files_total")).get(
        "replayguard_embedded_writeback_files_total", 0.0)


async def _post(session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


@pytest.mark.slow
async def test_embedded_default_serves_and_survives_restart(service_factory: Callable[..., Any]) -> None:
    """With no URL the service runs on its own PostgreSQL, starts the write-back of its data
    files as they grow, and keeps tokens and ledger on restart, where the server starts
    again with the shared buffers the restarted service was given."""
    with scratch_dir() as scratch:
        await _serve_restart(scratch / "data", service_factory)


async def _serve_restart(data_dir: Path, service_factory: Callable[..., Any]) -> None:
    try:
        done = await asyncio.to_thread(run_cli, "token", "create", "--role", "callout", "--name", "pam",
                                       "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        assert TOKEN_LINE.match(done.stdout), done.stdout  # the token alone, on one line
        token = done.stdout.strip()
        assert token not in done.stderr
        assert (data_dir / "pg" / "PG_VERSION").exists()
        for key in ("pepper", "secret", "receipt", "signing"):
            assert (data_dir / "keys" / f"{key}.key").stat().st_mode & 0o777 == 0o600

        service = await service_factory(data_dir=data_dir, database_url=None)
        scope, nonce = uid("scope"), uid("nonce")
        async with aiohttp.ClientSession() as session:
            async with session.get(service.url + "/readyz") as resp:
                assert resp.status == 200 and (await resp.json())["checks"]["ledger"] == "ok"
            status, first = await _post(session, service.url + "/v1/nonces/consume", token,
                                        {"vm_id": "vm-1", "scope": scope, "nonce": nonce})
            assert (status, first["decision"]) == (200, "accept")
        # the embedded server's data files, the ledger's among them, had their write-back started
        await until(lambda: _writeback_files(service.url), "a write-back pass over the written data files")
        service.kill(signal.SIGTERM)  # a clean stop this time (test_crash covers kill -9)
        assert service.proc.returncode == 0, service.log()

        restarted = await service_factory(data_dir=data_dir, database_url=None,
                                          extra_args=("--embedded-shared-buffers-mb", "160"))
        async with aiohttp.ClientSession() as session:
            status, again = await _post(session, restarted.url + "/v1/nonces/consume", token,
                                        {"vm_id": "vm-1", "scope": scope, "nonce": nonce})
        assert (status, again["decision"], again["reason"]) == (200, "reject", "reused")

        conn = await asyncpg.connect(_embedded_uri(data_dir))
        try:
            rows = await conn.fetch("SELECT seq, decision FROM ledger WHERE subject = $1 ORDER BY seq", scope)
            migrations = await conn.fetchval("SELECT count(*) FROM schema_migrations")
            buffers_mb = await _shared_buffers_mb(conn)
        finally:
            await conn.close()
        assert [(r["seq"], r["decision"]) for r in rows] == [(first["seq"], "accept"), (again["seq"], "reject")]
        assert migrations == len(list((Path(__file__).parents[2] / "migrations").glob("*.sql")))
        assert buffers_mb == 160  # the restart started the server, with the buffers it was given
        restarted.kill(signal.SIGTERM)
    finally:
        await asyncio.to_thread(stop_embedded, data_dir)


@pytest.mark.slow
async def test_embedded_server_runs_with_the_workload_settings() -> None:
    """The embedded PostgreSQL runs with the checkpoint, writeback and logging settings for
    replayguard's workload, shared buffers sized from the memory and its pages checksummed,
    and the insert-heavy tables carry their bounded-pass autovacuum settings."""
    with scratch_dir() as scratch:
        data_dir = scratch / "data"
        try:
            done = await asyncio.to_thread(run_cli, "migrate", "--data-dir", str(data_dir))
            assert done.returncode == 0, done.stderr
            server = await asyncio.to_thread(OwnedPostgres, data_dir)
            conn = await asyncpg.connect(server.url)
            try:
                shown = {name: await conn.fetchval("SELECT current_setting($1)", name) for name in WORKLOAD_SETTINGS}
                buffers_mb = await _shared_buffers_mb(conn)
                checksums = await conn.fetchval("SHOW data_checksums")
                options = {r["relname"]: set(r["reloptions"]) for r in await conn.fetch(
                    "SELECT relname, reloptions FROM pg_class WHERE relname IN ('ledger', 'uses', 'spent_nonces')")}
            finally:
                await conn.close()
        finally:
            await asyncio.to_thread(stop_embedded, data_dir)
    assert shown == {"max_wal_size": "4GB", "min_wal_size": "512MB", "checkpoint_timeout": "15min",
                     "checkpoint_completion_target": "0.9", "backend_flush_after": "256kB",
                     "log_checkpoints": "on", "log_autovacuum_min_duration": "1s", "log_lock_waits": "on"}
    assert buffers_mb == shared_buffers_mb(memory_bytes())  # sized from this machine's memory
    assert checksums == "on"  # PostgreSQL 18's initdb default: a page changed on disk fails its read
    for table in ("ledger", "uses", "spent_nonces"):
        assert {"autovacuum_vacuum_insert_threshold=200000",
                "autovacuum_vacuum_insert_scale_factor=0"} <= options[table]


# --- bad configuration ------------------------------------------------------------------

def _assert_one_line_exit_2(done: Any, expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("replayguard: error: "), done.stderr
    assert expected in done.stderr, done.stderr
    assert done.stdout == ""


def _key_file(path: Path, mode: int, content: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(content if content is not None else os.urandom(32).hex() + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://postgres@127.0.0.1:notaport/x", "database_url is not a valid URL"),
    ("mysql://root@127.0.0.1/x", "database_url must start with one of"),
    ("just some words", "database_url must start with one of"),
], ids=["bad port", "wrong scheme", "not a url"])
def test_unparseable_database_url(tmp_path: Path, url: str, expected: str) -> None:
    """An unparseable database URL stops serve, migrate and token create with one line."""
    for command in (["serve", "--port", "0"], ["migrate"],
                    ["token", "create", "--role", "admin", "--name", "n"]):
        done = run_cli(*command, "--database-url", url, "--data-dir", str(tmp_path / "data"))
        _assert_one_line_exit_2(done, expected)


def test_unreachable_database(tmp_path: Path) -> None:
    """A database URL pointing at a closed port stops start-up with one line."""
    with dead_url() as dead:
        url = dead.replace("http://", "postgresql://postgres@") + "/postgres"
        done = run_cli("serve", "--port", "0", "--database-url", url, "--data-dir", str(tmp_path / "d"))
    _assert_one_line_exit_2(done, "cannot reach the database")


def test_missing_database(tmp_path: Path, database_url: str) -> None:
    """A reachable server without the named database stops start-up with one line."""
    url = database_url.rpartition("/")[0] + "/" + "rg_does_not_exist_" + uid("db").replace("-", "_")
    done = run_cli("serve", "--port", "0", "--database-url", url, "--data-dir", str(tmp_path / "d"))
    _assert_one_line_exit_2(done, "does not exist")


def test_port_in_use(tmp_path: Path, database_url: str) -> None:
    """A port another process listens on stops start-up with one line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli("serve", "--port", str(port), "--database-url", database_url,
                       "--data-dir", str(tmp_path / "d"))
    _assert_one_line_exit_2(done, f"cannot listen on 127.0.0.1:{port}")


def test_invalid_port_value(tmp_path: Path, database_url: str) -> None:
    """An out-of-range port, by flag or environment, is one line, not a traceback."""
    done = run_cli("serve", "--port", "70000", "--database-url", database_url, "--data-dir", str(tmp_path / "d"))
    _assert_one_line_exit_2(done, "port must be between 0 and 65535")
    done = run_cli("serve", "--database-url", database_url, "--data-dir", str(tmp_path / "d"),
                   env=cli_env(REPLAYGUARD_PORT="eighty"))
    _assert_one_line_exit_2(done, "port has an invalid value")


def test_key_file_readable_by_others(tmp_path: Path, database_url: str) -> None:
    """A key under the data dir with mode 0644 stops start-up and says how to fix it."""
    data_dir = tmp_path / "data"
    key = _key_file(data_dir / "keys" / "pepper.key", 0o644)
    done = run_cli("serve", "--port", "0", "--database-url", database_url, "--data-dir", str(data_dir))
    _assert_one_line_exit_2(done, f"chmod 600 {key}")


@pytest.mark.parametrize("problem", ["missing", "directory", "not hex", "too short", "mode 0640"])
def test_named_key_file_problems(tmp_path: Path, database_url: str, problem: str) -> None:
    """An operator-named key file that is missing, unreadable or malformed is one clear line."""
    path = tmp_path / "named" / "pepper.key"
    expected = {"missing": "cannot read key file", "directory": "is not a regular file",
                "not hex": "does not hold a hex key", "too short": "must hold 32 bytes",
                "mode 0640": "accessible by group or others"}[problem]
    if problem == "directory":
        path.mkdir(parents=True, mode=0o700)
        path.chmod(0o700)
    elif problem == "not hex":
        _key_file(path, 0o600, "this is not a key\n")
    elif problem == "too short":
        _key_file(path, 0o600, "00ff\n")
    elif problem == "mode 0640":
        _key_file(path, 0o640)
    done = run_cli("serve", "--port", "0", "--database-url", database_url,
                   "--data-dir", str(tmp_path / "data"), env=cli_env(REPLAYGUARD_PEPPER_FILE=str(path)))
    _assert_one_line_exit_2(done, expected)
    assert str(path) in done.stderr
