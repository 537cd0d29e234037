"""A database holds every process on it to the keys it was set up with (migrations 032, 034).

Every digest of a credential or nonce is keyed by the pepper: a service started on a used
database with other keys (a lost or mistyped data dir, a container without its keys
volume) would find no earlier use and accept every code and nonce again; with another
checkpoint signing key the checkpoints its witnesses hold prove nothing. Such a start is
refused with one line; the same keys, from the data dir or named files, start as before.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replayguard.errors import ConfigError
from replayguard.services import key_binding
from replayguard.settings import Secret
from tests.conftest import Api, cli_env, run_cli, uid
from tests.integration.test_ledger_continuity import _held_at_least, backups
from tests.waiting import until

__all__ = ["backups"]  # a fixture


async def test_a_used_nonce_is_not_accepted_by_a_service_with_other_keys(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A nonce consumed by a service with the keys of one data dir: a service on the same
    database with another data dir does not start (ConfigError naming its keys dir), so the
    nonce is never accepted again; one with a copy of the first keys answers reused."""
    dsn = Secret(await fresh_database())
    first = await api_factory(database_url=dsn, data_dir=tmp_path / "one")
    body = {"vm_id": uid("vm"), "scope": "s", "nonce": uid("n")}
    assert (await first.post("/v1/nonces/consume", body))[1]["decision"] == "accept"
    with pytest.raises(ConfigError, match=r"the keys in .*/two/keys are not the ones this database was set up with"):
        await api_factory(database_url=dsn, data_dir=tmp_path / "two")
    (tmp_path / "three").mkdir(mode=0o700)
    shutil.copytree(tmp_path / "one" / "keys", tmp_path / "three" / "keys")
    same = await api_factory(database_url=dsn, data_dir=tmp_path / "three")
    status, again = await same.post("/v1/nonces/consume", body)
    assert (status, again["decision"], again["reason"]) == (200, "reject", "reused"), again


async def test_serve_and_token_create_with_other_keys_exit_2_in_one_line(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """`token create` sets the database up with the keys of its data dir; `token create` and
    `serve` with another data dir, or a pepper file of other bytes, exit 2 with one error
    line (serve may have logged its warnings about the server before) and print no token."""
    dsn = await fresh_database()
    made = run_cli("token", "create", "--role", "analyst", "--name", uid("a"), "--database-url", dsn,
                   "--data-dir", str(tmp_path / "one"))
    assert made.returncode == 0, made.stderr
    other_pepper = tmp_path / "pepper.key"
    other_pepper.write_text("11" * 32 + "\n")
    other_pepper.chmod(0o600)
    runs = {
        "token create": run_cli("token", "create", "--role", "analyst", "--name", uid("b"), "--database-url", dsn,
                                "--data-dir", str(tmp_path / "two")),
        "serve": run_cli("serve", "--port", "0", "--database-url", dsn, "--data-dir", str(tmp_path / "two")),
        "pepper file": run_cli("token", "create", "--role", "analyst", "--name", uid("c"), "--database-url", dsn,
                               "--data-dir", str(tmp_path / "one"),
                               env=cli_env(REPLAYGUARD_PEPPER_FILE=str(other_pepper))),
    }
    for what, done in runs.items():
        assert done.returncode == 2 and done.stdout == "", (what, done.returncode, done.stdout, done.stderr)
        last = done.stderr.splitlines()[-1]
        assert last.startswith("replayguard: error: the keys in ") and "Traceback" not in done.stderr, (what, last)
        assert "not the ones this database was set up with" in last, (what, last)
    assert "the pepper differs" in runs["pepper file"].stderr and str(other_pepper) in runs["pepper file"].stderr


async def _nonce(api: Api, value: str) -> tuple[int, Any]:
    return await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": value})


def _data_dir_with(source: Path, target: Path, *names: str) -> Path:
    """A new data dir holding copies of ``names`` from ``source``'s keys (0700 dirs, 0600 files)."""
    target.mkdir(mode=0o700)
    (target / "keys").mkdir(mode=0o700)
    for name in names:
        (target / "keys" / name).write_bytes((source / "keys" / name).read_bytes())
        (target / "keys" / name).chmod(0o600)
    return target


async def _binding(dsn: str) -> dict[str, bytes | None]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT pepper_check, secret_check, receipt_check, signing_public FROM key_binding")
    finally:
        await conn.close()
    assert row is not None
    return {column: None if value is None else bytes(value) for column, value in row.items()}


async def _checkpoints(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM checkpoints"))
    finally:
        await conn.close()


async def test_a_restored_database_refuses_a_data_dir_rebuilt_with_a_new_checkpoint_key(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Disaster recovery restores the database from a backup and the pepper and the secret
    key from where the operator keeps them, onto a new data dir, where a new receipt key and
    a new checkpoint signing key would be made. The file witness holds a checkpoint past the
    backup's head, signed by the old key, which the new one could not check: the start is
    refused (one ConfigError naming the receipt key and the checkpoint signing key), and the
    old data dir's keys start and refuse the restored ledger (503 ledger_rollback), so no
    nonce the backup lost is accepted again."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    old_dir = tmp_path / "data"
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    dsn = await fresh_database()
    first = await api_factory(database_url=Secret(dsn), **settings)
    assert (await _nonce(first, secrets.token_hex(8)))[0] == 200
    await first.client.close()
    backup = await backups(dsn)
    second = await api_factory(database_url=Secret(dsn), **settings)
    lost = [secrets.token_hex(8) for _ in range(10)]
    for value in lost:
        assert (await _nonce(second, value))[1]["decision"] == "accept"
    conn = await asyncpg.connect(backup)
    try:
        head = int(await conn.fetchval("SELECT seq FROM ledger_head"))
    finally:
        await conn.close()
    await until(lambda: _held_at_least(witness, head + 1), "the witness to hold a checkpoint past the backup",
                timeout=60)
    await second.client.close()

    new_dir = _data_dir_with(old_dir, tmp_path / "rebuilt", "pepper.key", "secret.key")
    with pytest.raises(ConfigError, match=r"/rebuilt/keys are not the ones this database was set up with \(the"
                                          r" receipt key and the checkpoint signing key differ\)"):
        await api_factory(database_url=Secret(backup), data_dir=new_dir, **settings)
    restored = await api_factory(database_url=Secret(backup), data_dir=old_dir, **settings)
    status, body = await _nonce(restored, lost[0])
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body


async def test_a_restart_with_the_same_keys_starts_and_every_key_is_bound(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A service restarted on its database with its own data dir, after checkpoints that a
    file witness holds, starts and serves (a used nonce is reused, a new one accepted); the
    binding holds a keyed check of the pepper, the secret key and the receipt key and the
    checkpoint signing key's public key, never a key."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    # Every second too: a first checkpoint signed below entry 5 while the nonces go in is
    # followed by the next only after checkpoint_interval_s (every 5 entries: none follow).
    settings = {"checkpoint_every": 5, "checkpoint_interval_s": 1, "witnesses": (f"file:{witness}",)}
    dsn = await fresh_database()
    first = await api_factory(database_url=Secret(dsn), **settings)
    used = [secrets.token_hex(8) for _ in range(6)]
    for value in used:
        assert (await _nonce(first, value))[1]["decision"] == "accept"
    await until(lambda: _held_at_least(witness, 5), "the witness to hold a checkpoint", timeout=60)
    await first.client.close()

    again = await api_factory(database_url=Secret(dsn), **settings)
    status, body = await _nonce(again, used[0])
    assert (status, body["decision"], body["reason"]) == (200, "reject", "reused"), body
    assert (await _nonce(again, secrets.token_hex(8)))[1]["decision"] == "accept"
    bound = await _binding(dsn)
    assert bound == key_binding.checks(again.runtime.keys)
    keys = again.runtime.keys
    assert not {keys.pepper, keys.secret, keys.receipt, keys.signing} & set(bound.values())


async def test_a_database_bound_before_migration_034_binds_the_receipt_and_signing_keys_at_its_next_start(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A database bound when only the pepper and the secret key were, with checkpoints, is
    upgraded by the next start (migration 034 leaves the receipt check and the public key
    NULL): a data dir rebuilt around the pepper and the secret key is refused, its new
    signing key having signed none of the checkpoints, and binds nothing; the data dir that
    signed them starts and binds its receipt and signing keys; from then on another receipt
    key, or another signing key, is refused."""
    one = tmp_path / "one"
    dsn = await fresh_database()
    first = await api_factory(database_url=Secret(dsn), data_dir=one, checkpoint_every=5)
    for _ in range(6):
        assert (await _nonce(first, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: _checkpoints(dsn), "a checkpoint in the database", timeout=60)
    await first.client.close()
    conn = await asyncpg.connect(dsn)
    try:  # the database as it was before migration 034, which the next start applies
        await conn.execute("ALTER TABLE key_binding DROP COLUMN receipt_check, DROP COLUMN signing_public")
        await conn.execute("DELETE FROM schema_migrations WHERE name = '034_key_binding_signing.sql'")
    finally:
        await conn.close()

    rebuilt = _data_dir_with(one, tmp_path / "rebuilt", "pepper.key", "secret.key")
    with pytest.raises(ConfigError, match=r"\(the checkpoint signing key differs\)"):
        await api_factory(database_url=Secret(dsn), data_dir=rebuilt)
    assert (await _binding(dsn))["signing_public"] is None and (await _binding(dsn))["receipt_check"] is None

    same = await api_factory(database_url=Secret(dsn), data_dir=one)
    assert await _binding(dsn) == key_binding.checks(same.runtime.keys)
    await same.client.close()
    other_receipt = _data_dir_with(one, tmp_path / "receipt", "pepper.key", "secret.key", "signing.key")
    with pytest.raises(ConfigError, match=r"\(the receipt key differs\): .* every guest's receipt"):
        await api_factory(database_url=Secret(dsn), data_dir=other_receipt)
    other_signing = _data_dir_with(one, tmp_path / "signing", "pepper.key", "secret.key", "receipt.key")
    with pytest.raises(ConfigError, match=r"\(the checkpoint signing key differs\)"):
        await api_factory(database_url=Secret(dsn), data_dir=other_signing)
