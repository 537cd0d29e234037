"""``replayguard keys rotate`` as an operator runs it: against running services, killed
mid-way, and what it prints (JSON lines; never a key)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from replayguard.keys import Keys, key_paths, load_keys, pending_path
from replayguard.services.key_binding import check_of
from replayguard.settings import Secret, Settings
from tests.conftest import REPO, cli_env, run_cli


def _settings(data_dir: Path, dsn: str) -> Settings:
    return Settings(database_url=Secret(dsn), data_dir=data_dir)


def _rotate_args(data_dir: Path, dsn: str, *keys: str) -> list[str]:
    return ["keys", "rotate", *keys, "--data-dir", str(data_dir), "--database-url", dsn]


async def test_rotate_refuses_while_two_instances_serve_and_an_old_key_set_is_refused_after(
        fresh_database: Callable[[], Any], service_factory: Callable[..., Any], tmp_path: Path) -> None:
    """With two ``serve`` processes on the database, ``keys rotate`` exits 2 saying other
    replayguard processes are connected, changing nothing; with both stopped it rotates
    (stdout: one JSON line, stderr: JSON progress lines, no key anywhere); then a serve
    with the data dir's keys as they were is refused in one line naming the rotation, and
    one with the rotated data dir serves."""
    dsn = await fresh_database()
    data_dir = tmp_path / "data"
    first = await service_factory(data_dir=data_dir, database_url=dsn)
    second = await service_factory(data_dir=data_dir, database_url=dsn)
    before = {name: path.read_text() for name, path in key_paths(_settings(data_dir, dsn)).items()}

    refused = await asyncio.to_thread(run_cli, *_rotate_args(data_dir, dsn, "--secret", "--receipt"))
    assert refused.returncode == 2 and refused.stdout == "", refused
    last = refused.stderr.splitlines()[-1]
    assert "other replayguard process(es) are connected to this database" in last and "nothing was rotated" in last
    assert f"replayguard-{first.proc.pid}" in last and f"replayguard-{second.proc.pid}" in last, last
    assert {name: path.read_text() for name, path in key_paths(_settings(data_dir, dsn)).items()} == before
    assert not any(pending_path(p).exists() for p in key_paths(_settings(data_dir, dsn)).values())

    stale = tmp_path / "stale"
    stale.mkdir(mode=0o700)
    (stale / "keys").mkdir(mode=0o700)
    for name, text in before.items():
        (stale / "keys" / f"{name}.key").write_text(text)
        (stale / "keys" / f"{name}.key").chmod(0o600)
    first.kill(signal.SIGTERM)
    second.kill(signal.SIGTERM)
    done = await asyncio.to_thread(run_cli, *_rotate_args(data_dir, dsn, "--secret", "--receipt"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["event"] == "keys_rotated" and summary["rotated"] == ["secret", "receipt"], summary
    steps = [json.loads(line)["event"] for line in done.stderr.splitlines()]
    assert steps[0] == "new_keys_written" and steps[-2:] == ["committing", "key_files_replaced"], steps
    after = {name: path.read_text() for name, path in key_paths(_settings(data_dir, dsn)).items()}
    for text in [*before.values(), *after.values()]:
        assert text.strip() not in done.stdout + done.stderr + refused.stderr

    old = await asyncio.to_thread(run_cli, "serve", "--port", "0", "--data-dir", str(stale), "--database-url", dsn)
    assert old.returncode == 2 and "Traceback" not in old.stderr, old.stderr
    assert "was retired by a key rotation at" in old.stderr.splitlines()[-1], old.stderr
    await service_factory(data_dir=data_dir, database_url=dsn)


async def _seed_tokens(settings: Settings, count: int) -> None:
    """``count`` TOTP tokens encrypted under the data dir's secret key, written straight
    into the database (enrolling them one by one would take minutes)."""
    keys = load_keys(settings)
    aead = AESGCM(keys.secret)
    rows = []
    for n in range(count):
        token_id, nonce = f"otp_seed{n:06d}", os.urandom(12)
        secret = secrets.token_bytes(20).hex().upper()
        rows.append((token_id, "seed", "totp", nonce + aead.encrypt(nonce, secret.encode(), token_id.encode()),
                     6, 30, "SHA1", secrets.token_bytes(32)))
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        await conn.copy_records_to_table("otp_tokens", records=rows, columns=[
            "id", "principal", "type", "secret_ct", "digits", "period", "algorithm", "fingerprint"])
    finally:
        await conn.close()


async def _consistent(settings: Settings) -> bytes:
    """Opens the database as a service would (settling what a killed rotation left) and
    checks it has one key set: the binding names the data dir's keys, every token secret
    decrypts under the secret key, no ``.next`` file is left. Returns the secret key."""
    done = await asyncio.to_thread(run_cli, "token", "list", "--data-dir", str(settings.data_dir),
                                   "--database-url", settings.database_url.reveal() if settings.database_url else "")
    assert done.returncode == 0, done.stderr
    keys = load_keys(settings)
    assert not any(pending_path(p).exists() for p in key_paths(settings).values())
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        bound = await conn.fetchrow("SELECT secret_check, receipt_check FROM key_binding")
        rows = await conn.fetch("SELECT id, secret_ct FROM otp_tokens")
    finally:
        await conn.close()
    assert (bytes(bound["secret_check"]), bytes(bound["receipt_check"])) == (check_of(keys.secret),
                                                                             check_of(keys.receipt))
    aead = AESGCM(keys.secret)
    for row in rows:
        blob = bytes(row["secret_ct"])
        aead.decrypt(blob[:12], blob[12:], row["id"].encode())  # raises if under another key
    return keys.secret


@pytest.mark.parametrize("kill_at", ["new_keys_written", "tokens_reencrypted", "committing"])
async def test_a_rotation_killed_at_any_step_leaves_one_consistent_key_set(
        fresh_database: Callable[[], Any], tmp_path: Path, kill_at: str) -> None:
    """``keys rotate`` killed with SIGKILL as it reports a step (its new keys written; a
    batch of 3,000 token secrets re-encrypted; about to commit) leaves a database that
    opens with exactly one key set (every token secret decrypts under the key the binding
    names), and a rotation run after it completes."""
    dsn = await fresh_database()
    settings = _settings(tmp_path / "data", dsn)
    made = await asyncio.to_thread(run_cli, "token", "create", "--role", "admin", "--name", "a",
                                   "--data-dir", str(settings.data_dir), "--database-url", dsn)
    assert made.returncode == 0, made.stderr
    await _seed_tokens(settings, 3000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard", *_rotate_args(settings.data_dir, dsn, "--secret", "--receipt"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(), cwd=REPO)
    assert proc.stderr is not None
    seen: list[str] = []
    while True:
        line = await proc.stderr.readline()
        assert line, (kill_at, seen)  # the rotation ended before the step
        seen.append(json.loads(line)["event"])
        if seen[-1] == kill_at:
            proc.kill()
            break
    await proc.wait()
    secret = await _consistent(settings)
    again = await asyncio.to_thread(run_cli, *_rotate_args(settings.data_dir, dsn, "--secret"))
    assert again.returncode == 0, again.stderr
    assert await _consistent(settings) != secret



async def test_rotate_without_a_key_or_with_nothing_to_adopt_exits_2_in_one_line(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """``keys rotate`` naming no key, or ``--restored`` together with a key, is a usage
    error; ``--restored`` on a database bound to the data dir's current keys has nothing
    to adopt; each exits 2 with one error line, printing nothing on stdout."""
    dsn = await fresh_database()
    data_dir = tmp_path / "data"
    made = await asyncio.to_thread(run_cli, "token", "create", "--role", "admin", "--name", "a",
                                   "--data-dir", str(data_dir), "--database-url", dsn)
    assert made.returncode == 0, made.stderr
    runs = {
        "no key": (_rotate_args(data_dir, dsn), "name a key to rotate"),
        "restored and a key": (_rotate_args(data_dir, dsn, "--restored", "--secret"), "--restored takes no"),
        "nothing to adopt": (_rotate_args(data_dir, dsn, "--restored"), "nothing to adopt"),
    }
    for what, (args, message) in runs.items():
        done = await asyncio.to_thread(run_cli, *args)
        assert (done.returncode, done.stdout) == (2, ""), (what, done)
        last = done.stderr.splitlines()[-1]
        assert last.startswith("replayguard: error: ") and message in last, (what, done.stderr)


async def test_rotate_sees_an_instance_whose_process_id_is_its_own(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """Process ids repeat across hosts: a serve instance on another host may have the
    rotation's own process id, and so the session name ``replayguard-<pid>``. The
    rotation still counts it as another process and refuses, and rotates once it is gone."""
    from replayguard.cli import keys as keys_cli
    from replayguard.errors import ConfigError

    dsn = await fresh_database()
    settings = _settings(tmp_path / "data", dsn)
    load_keys(settings)  # a deployment's keys, which the rotation replaces
    twin = await asyncpg.connect(dsn, server_settings={"application_name": f"replayguard-{os.getpid()}"})
    try:
        with pytest.raises(ConfigError, match=f"other replayguard process.*replayguard-{os.getpid()}[,;]"):
            await keys_cli._rotate(settings, ["receipt"], restored=False)
    finally:
        await twin.close()
    assert (await keys_cli._rotate(settings, ["receipt"], restored=False))["rotated"] == ["receipt"]


@pytest.mark.parametrize("restored", [False, True])
async def test_rotate_with_a_data_dir_holding_no_keys_creates_none_and_changes_nothing(
        fresh_database: Callable[[], Any], tmp_path: Path, restored: bool) -> None:
    """``keys rotate`` (or ``--restored``) with a ``--data-dir`` that holds no keys (a
    mistyped path: every other command would make a new deployment there) refuses, saying
    where it looked: it creates no key and binds no database, rather than rotating keys it
    just made and reporting success."""
    from replayguard.cli import keys as keys_cli
    from replayguard.errors import ConfigError

    dsn = await fresh_database()
    data_dir = tmp_path / "mistyped"
    settings = _settings(data_dir, dsn)
    with pytest.raises(ConfigError, match=f"no key.*{data_dir / 'keys'}.*nothing was rotated"):
        await keys_cli._rotate(settings, [] if restored else ["secret", "receipt"], restored=restored)
    assert not (data_dir / "keys").exists() or not any((data_dir / "keys").glob("*.key"))
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM key_binding") == 0  # the template is migrated
    finally:
        await conn.close()


async def test_a_refused_rotation_leaves_a_database_that_needs_migrating_unmigrated(tmp_path: Path) -> None:
    """On a database at an older migration with another replayguard session connected (a
    serve of the release that migrated it), ``keys rotate`` refuses before it applies any
    migration: the schema and its recorded version stay as they were."""
    from replayguard.cli import keys as keys_cli
    from replayguard.errors import ConfigError
    from replayguard.pg import connections, schema
    from tests.conftest import create_database, drop_database
    from tests.integration.test_migrations import schema_of

    dsn = await create_database("rg_rotate_old", migrate=False)
    try:
        conn = await connections.connect(dsn, statement_timeout_ms=0)
        try:
            await schema.migrate(conn, schema.load_migrations()[:-1])
        finally:
            await conn.close()
        before = await asyncio.to_thread(schema_of, dsn)
        settings = _settings(tmp_path / "data", dsn)
        load_keys(settings)
        serve = await asyncpg.connect(dsn, server_settings={"application_name": "replayguard-4242"})
        try:
            with pytest.raises(ConfigError, match=r"replayguard-4242.*nothing was rotated"):
                await keys_cli._rotate(settings, ["receipt"], restored=False)
        finally:
            await serve.close()
        assert await asyncio.to_thread(schema_of, dsn) == before
    finally:
        await drop_database(dsn)


async def test_the_rotation_itself_refuses_a_session_that_connected_after_the_cli_checked(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """The CLI's check before migrating is not the one that holds: a replayguard session
    that connects afterwards is refused by the rotation's own transaction, which changes
    nothing (no pending key files, the binding as it was)."""
    from replayguard.errors import ConfigError
    from replayguard.pg import connections
    from replayguard.services import key_rotation

    settings = _settings(tmp_path / "data", await fresh_database())
    async with connected_after_the_check(settings) as (pool, keys):
        with pytest.raises(ConfigError, match=r"replayguard-4343.*nothing was rotated"):
            await key_rotation.rotate(pool, settings, keys, ["secret", "receipt"], 2)
        assert not any(pending_path(p).exists() for p in key_paths(settings).values())
        async with connections.acquire(pool) as conn:
            assert await conn.fetchval("SELECT count(*) FROM key_rotations") == 0


@contextlib.asynccontextmanager
async def connected_after_the_check(settings: Settings) -> AsyncIterator[tuple[asyncpg.Pool, Keys]]:
    """A rotation's pool on ``settings``' database, held to its keys, and another replayguard
    session (``replayguard-4343``) that connected after the CLI looked for others."""
    from replayguard.keys import keys_location
    from replayguard.pg import connections
    from replayguard.services.key_binding import hold_to_binding

    assert settings.database_url is not None
    dsn, keys = settings.database_url.reveal(), load_keys(settings)
    pool = await connections.create_pool(dsn, size=2, statement_timeout_ms=30_000,
                                         application_name="replayguard-1-keys-test")
    late = await asyncpg.connect(dsn, server_settings={"application_name": "replayguard-4343"})
    try:
        await hold_to_binding(pool, keys, 1, keys_location(settings), {})
        yield pool, keys
    finally:
        await late.close()
        await pool.close()
