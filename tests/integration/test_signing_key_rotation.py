"""Rotating the checkpoint signing key (``replayguard keys rotate --signing``, migration 042),
against real PostgreSQL, file and HTTP witnesses.

The old key hands over to the new one in the ledger; witnesses move to the new key only
through that handover and keep the deployment's id; a database restored from before the
rotation is still caught by what they hold; verification takes each key for its own span
and flags a checkpoint of the retired key past its handover; a rotation SIGKILLed before
or after its commit leaves one signing key in force.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core.handover import Handover, handover_json, sign_handover
from replayguard.errors import ConfigError
from replayguard.keys import key_paths, load_keys, pending_path, retired_keys
from replayguard.pg import connections
from replayguard.services import signing_rotation
from replayguard.services.witness import Record
from replayguard.settings import Secret, Settings
from tests.conftest import REPO, Api, cli_env, run_cli
from tests.integration.test_key_rotation_cli import connected_after_the_check
from tests.integration.test_ledger_continuity import _held_at_least, alerts_of, backups, nonce
from tests.integration.test_witness_http import held, pair, put, url_of
from tests.waiting import until

__all__ = ["backups"]  # fixtures


async def _rotate(settings: Settings, *, restored: bool = False) -> Any:
    """The signing rotation as the CLI runs it, on a pool of its own."""
    assert settings.database_url is not None
    pool = await connections.create_pool(settings.database_url.reveal(), size=2, statement_timeout_ms=30_000)
    try:
        keys, now_us = load_keys(settings), int(time.time() * 1e6)
        if restored:
            return await signing_rotation.adopt_restored(pool, settings, keys, now_us)
        return await signing_rotation.rotate(pool, settings, keys, now_us)
    finally:
        await pool.close()


def _pem(settings: Settings) -> str:
    return cps.public_key_pem(load_keys(settings).signing_key().public_key())


async def _decide(api: Api, count: int) -> None:
    for _ in range(count):
        status, body = await nonce(api, secrets.token_hex(8))
        assert status == 200 and body["decision"] == "accept", body


async def test_after_a_rotation_decisions_go_on_and_a_backup_from_before_it_is_still_refused(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A file witness holds the old key's checkpoints; after the rotation the service decides,
    signs with the new key and the witness takes it under the same deployment id. The
    database restored from a backup taken before the rotation is refused at start (bound to
    the retired key); moved to the current key (``--restored``) it serves no decision
    (``ledger_rollback``: the witness holds a newer checkpoint under the new key), and
    ``accept-rollback`` (a statement signed by the new key) lets it serve again."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    dsn = await fresh_database()
    options: dict[str, Any] = {"database_url": Secret(dsn), "checkpoint_every": 2, "witnesses": (f"file:{witness}",)}
    first = await api_factory(**options)
    deployment = first.runtime.continuity.deployment_id
    await _decide(first, 4)
    await until(lambda: _held_at_least(witness, 3), "the witness to hold the old key's checkpoint", timeout=30)
    await first.client.close()
    backup = await backups(dsn)
    old_pem = _pem(make_settings())

    done = await _rotate(make_settings(database_url=Secret(dsn)))
    assert done.rotated == ("signing",) and _pem(make_settings()) != old_pem
    second = await api_factory(**options)
    assert second.runtime.continuity.deployment_id == deployment
    await _decide(second, 4)

    async def new_key_held() -> bool:
        record = orjson.loads(witness.read_bytes())
        return bool(record["public_key_pem"] != old_pem and record["checkpoint"]["seq"] > done.ledger_seq)

    await until(new_key_held, "the witness to hold a checkpoint of the new key", timeout=30)
    assert orjson.loads(witness.read_bytes())["deployment_id"] == deployment
    head = await second.runtime.pool.fetchval("SELECT seq FROM ledger_head")
    # With a checkpoint every 2 entries, one at the entry before the head leaves none due at
    # the head (the test clock stands still): the witness is caught up at either.
    await until(lambda: _held_at_least(witness, head - 1), "the witness to hold the head or the entry before it",
                timeout=30)
    await second.client.close()

    try:
        await api_factory(**{**options, "database_url": Secret(backup)})
        raise AssertionError("a database bound to the retired signing key started")
    except ConfigError as exc:
        assert "retired" in str(exc) and "--restored" in str(exc), exc
    adopted = await _rotate(make_settings(database_url=Secret(backup)), restored=True)
    assert adopted is not None and adopted.rotated == ("signing",)
    restored = await api_factory(**{**options, "database_url": Secret(backup)})
    status, body = await nonce(restored, secrets.token_hex(8))
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body

    env = cli_env(REPLAYGUARD_DATABASE_URL=backup, REPLAYGUARD_DATA_DIR=str(tmp_path / "data"),
                  REPLAYGUARD_WITNESSES=f"file:{witness}")
    recovered = run_cli("ledger", "accept-rollback", "--reason", "restored the backup from before the rotation",
                        env=env)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    answer = orjson.loads(recovered.stdout)
    assert answer["witnesses"][f"file:{witness}"] in ("recovery", "same"), answer
    statement = await restored.runtime.pool.fetchval(
        "SELECT payload->'statement'->>'key_id' FROM ledger WHERE kind = 'ledger_recovery'")
    assert statement == cps.key_id(load_keys(make_settings()).signing_key().public_key())

    async def serving() -> bool:
        return (await nonce(restored, secrets.token_hex(8)))[0] == 200

    await until(serving, "decisions to resume after the recovery", timeout=30)


async def test_an_http_witness_takes_the_new_key_only_through_the_old_keys_handover(
        api_factory: Callable[..., Any], fresh_database: Callable[[], Any], make_settings: Callable[..., Settings],
        tmp_path: Path) -> None:
    """Deployment ``a`` rotates its signing key; witness ``b`` moves to the new key under the
    same deployment id. A bare new key (400), a handover signed by another key and one by
    which the retired key forks to a key of its own (409, ``ledger_tamper`` on ``b``)
    change nothing it holds."""
    a, b = await pair(api_factory, fresh_database, tmp_path)
    a_id = a.runtime.continuity.deployment_id
    a_settings = a.runtime.settings
    await _decide(a, 4)

    async def held_at(seq: int) -> bool:
        record = await held(b, a_id)
        return bool(record and record["checkpoint"]["seq"] >= seq)

    await until(lambda: held_at(3), "b to hold a's checkpoint", timeout=30)
    old_key = a.runtime.keys.signing_key()
    await a.client.close()
    done = await _rotate(a_settings)
    a2 = await api_factory(database_url=a_settings.database_url, data_dir=a_settings.data_dir, checkpoint_every=2,
                           witnesses=(url_of(b),), witness_token=Secret(b.tokens["witness"]))
    await _decide(a2, 4)
    await until(lambda: held_at(done.ledger_seq + 2), "b to hold a checkpoint of the new key", timeout=30)
    record = await held(b, a_id)
    assert record is not None and record["public_key_pem"] == a2.runtime.continuity.public_key_pem
    before = record

    top = cps.from_json(record["checkpoint"])
    stranger = Ed25519PrivateKey.generate()  # a key no one handed over to
    bare = cps.sign(stranger, top.seq + 10, secrets.token_bytes(32), top.ts_us + 1)
    stranger_pem = cps.public_key_pem(stranger.public_key())
    assert (await put(b, a_id, Record(a_id, stranger_pem, bare).to_json()))[0] == 400
    chain = a2.runtime.continuity.signers.handovers
    forged = sign_handover(stranger, top.seq, top.hash, top.ts_us, stranger.public_key())
    forged = Handover(forged.base_seq, forged.base_hash, forged.ts_us, chain[-1].new_public, forged.new_public,
                      forged.signature)  # claims to be the current key's, signed by the stranger
    status, body = await put(b, a_id, Record(a_id, stranger_pem, bare, None, (*chain, forged)).to_json())
    assert status == 409 and body["error"]["code"] == "conflict", body
    fork = sign_handover(old_key, done.ledger_seq, top.hash, top.ts_us, stranger.public_key())
    other = cps.sign(stranger, top.seq + 11, secrets.token_bytes(32), top.ts_us + 1)
    assert (await put(b, a_id, Record(a_id, stranger_pem, other, None, (fork,)).to_json()))[0] == 409
    assert len(await alerts_of(b, "ledger_tamper")) == 2
    assert await held(b, a_id) == before
    assert [handover_json(h)["new_key_id"] for h in chain] == [a2.runtime.continuity.key_id]
    await a2.client.close()  # the pushing side first


async def test_a_checkpoint_of_the_retired_key_after_its_handover_fails_verification(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """Whoever holds the retired key (it may have leaked) signs the head after the rotation:
    ``ledger verify`` is ok:false at that entry (``forged_checkpoint``, naming the retired
    key), while the checkpoints the old key signed before its handover still pin the chain."""
    api = await api_factory(checkpoint_every=2)
    await _decide(api, 4)
    settings = api.runtime.settings
    old_key = api.runtime.keys.signing_key()
    await until(lambda: _checkpoint_of(api, cps.key_id(old_key.public_key())), "a checkpoint of the old key",
                timeout=30)
    await api.client.close()
    done = await _rotate(settings)
    again = await api_factory(checkpoint_every=1000)
    await _decide(again, 3)
    status, report = await again.get("/v1/ledger/verify")
    assert status == 200 and report["ok"] is True and report["checkpoints_checked"] >= 1, report
    await again.client.close()
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
        assert head["seq"] > done.ledger_seq
        await conn.execute("DELETE FROM checkpoints WHERE seq = $1", head["seq"])
        cp = cps.sign(old_key, head["seq"], bytes(head["hash"]), int(time.time() * 1e6))
        await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5)", cp.seq, cp.hash, cp.ts_us,
                           cp.key_id, cp.signature)
    finally:
        await conn.close()
    checked = await asyncio.to_thread(run_cli, "ledger", "verify", "--no-progress", "--database-url",
                                      settings.database_url.reveal(), "--data-dir", str(settings.data_dir))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    report = orjson.loads(checked.stdout)
    assert report["problem"] == "forged_checkpoint" and report["first_bad_seq"] == head["seq"], report
    assert cp.key_id in report["message"]


_KILLED = """
import asyncio, os, signal, sys, time
from pathlib import Path
from replayguard.keys import load_keys
from replayguard.pg import connections
from replayguard.services import signing_rotation
from replayguard.settings import Secret, Settings

settings = Settings(database_url=Secret(sys.argv[1]), data_dir=Path(sys.argv[2]))
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
def progress(step, facts):
    if step == "committing" and sys.argv[3] == "before":
        die()
if sys.argv[3] == "after":
    signing_rotation.promote_pending = die

async def main():
    pool = await connections.create_pool(sys.argv[1], size=2, statement_timeout_ms=30_000)
    await signing_rotation.rotate(pool, settings, load_keys(settings), int(time.time() * 1e6), progress)

asyncio.run(main())
"""


def _killed_rotation(settings: Settings, when: str) -> None:
    assert settings.database_url is not None
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED), settings.database_url.reveal(),
                           str(settings.data_dir), when], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ})
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


async def test_a_rotation_killed_before_or_after_its_commit_leaves_one_signing_key(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """SIGKILL inside the transaction: the database keeps the old key and no handover, and
    the next start removes the ``.next`` file and signs with the old key. SIGKILL after the
    commit, before the renames: the next start promotes the new key (retiring the old one)
    and signs with it, and verification holds across the handover."""
    settings = make_settings(checkpoint_every=2)
    api = await api_factory(checkpoint_every=2)
    await _decide(api, 3)

    async def signed(by: Api) -> bool:
        status, page = await by.get("/v1/ledger/checkpoints")
        return status == 200 and bool(page["items"]) and page["items"][0]["key_id"] == by.runtime.continuity.key_id

    await until(lambda: signed(api), "a checkpoint of the old key", timeout=30)
    await api.client.close()
    old = load_keys(settings).signing
    pending = pending_path(key_paths(settings)["signing"])

    _killed_rotation(settings, "before")
    assert pending.exists() and load_keys(settings).signing == old
    again = await api_factory(checkpoint_every=2)
    assert not pending.exists() and again.runtime.keys.signing == old
    assert again.runtime.continuity.signers.handovers == ()
    await _decide(again, 2)
    await again.client.close()

    _killed_rotation(settings, "after")
    new = bytes.fromhex(pending.read_text())
    assert load_keys(settings).signing == old
    third = await api_factory(checkpoint_every=2)
    assert third.runtime.keys.signing == new and not pending.exists()
    assert list(retired_keys(settings, "signing").values()) == [old]
    assert len(third.runtime.continuity.signers.handovers) == 1
    await _decide(third, 4)

    await until(lambda: signed(third), "a checkpoint of the new key", timeout=30)
    status, report = await third.get("/v1/ledger/verify")
    assert status == 200 and report["ok"] is True and report["checkpoints_checked"] >= 2, report


async def test_the_cli_rotates_the_signing_key_on_its_own_and_never_under_a_running_service(
        fresh_database: Callable[[], Any], service_factory: Callable[..., Any], tmp_path: Path) -> None:
    """``keys rotate --signing`` exits 2 while a ``serve`` process is connected (nothing
    changed), refuses to be combined with ``--secret``, and with the service stopped rotates
    (one JSON summary, no key printed); ``ledger public-key`` then gives the new key and a
    service starts on it."""
    dsn = await fresh_database()
    data_dir = tmp_path / "data"
    service = await service_factory(data_dir=data_dir, database_url=dsn)
    args = ["keys", "rotate", "--signing", "--data-dir", str(data_dir), "--database-url", dsn]
    settings = Settings(database_url=Secret(dsn), data_dir=data_dir)
    before = key_paths(settings)["signing"].read_text()
    refused = await asyncio.to_thread(run_cli, *args)
    assert refused.returncode == 2 and "other replayguard process(es)" in refused.stderr.splitlines()[-1], refused
    assert key_paths(settings)["signing"].read_text() == before
    assert not pending_path(key_paths(settings)["signing"]).exists()
    mixed = await asyncio.to_thread(run_cli, *args, "--secret")
    assert mixed.returncode == 2 and "--signing is rotated on its own" in mixed.stderr, mixed
    service.kill(signal.SIGTERM)

    done = await asyncio.to_thread(run_cli, *args)
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["event"] == "keys_rotated" and summary["rotated"] == ["signing"], summary
    after = key_paths(settings)["signing"].read_text()
    assert after != before and before.strip() not in done.stdout + done.stderr
    assert after.strip() not in done.stdout + done.stderr
    public = await asyncio.to_thread(run_cli, "ledger", "public-key", "--data-dir", str(data_dir))
    assert public.stdout == cps.public_key_pem(load_keys(settings).signing_key().public_key()), public
    await service_factory(data_dir=data_dir, database_url=dsn)


async def test_a_service_with_the_signing_key_before_a_rotation_is_refused_and_told_why(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A copy of the keys taken before the signing key's rotation cannot start on the
    rotated database (it would sign checkpoints no witness takes): the binding names the
    rotation and what to copy."""
    settings = make_settings()
    api = await api_factory()
    await api.client.close()
    stale = tmp_path / "stale"
    (stale / "keys").mkdir(mode=0o700, parents=True)
    stale.chmod(0o700)
    for path in key_paths(settings).values():
        (stale / "keys" / path.name).write_text(path.read_text())
        (stale / "keys" / path.name).chmod(0o600)
    await _rotate(settings)
    try:
        await api_factory(data_dir=stale)
        raise AssertionError("a service with the retired signing key started")
    except ConfigError as exc:
        assert "checkpoint signing key differs" in str(exc) and "its signing key was retired by a key rotation" \
            in str(exc), exc


async def test_checkpoints_of_the_retired_key_still_reach_the_sinks(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Checkpoints the old key signed that the sink feed had not handed on at the rotation
    (its position set back here) reach the sinks after it, beside the new key's."""
    sink = tmp_path / "sink.jsonl"
    api = await api_factory(checkpoint_every=2)
    await _decide(api, 4)
    old_id = api.runtime.continuity.key_id
    await until(lambda: _checkpoint_of(api, old_id), "a checkpoint of the old key", timeout=30)
    await api.client.close()
    settings = make_settings()
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        await conn.execute("INSERT INTO sink_feed VALUES (true, 0, 0)"
                           " ON CONFLICT (id) DO UPDATE SET checkpoint_seq = 0")
    finally:
        await conn.close()
    await _rotate(settings)
    again = await api_factory(checkpoint_every=2, sinks=(f"file:{sink}",))
    await _decide(again, 3)

    async def both_in_sink() -> bool:
        text = sink.read_text() if sink.exists() else ""
        return old_id in text and again.runtime.continuity.key_id in text

    await until(both_in_sink, "the checkpoints of both keys in the sink", timeout=30)


async def _checkpoint_of(api: Api, key_id: str) -> bool:
    status, page = await api.get("/v1/ledger/checkpoints")
    return status == 200 and any(item["key_id"] == key_id for item in page["items"])


async def test_a_host_restored_with_its_keys_from_before_the_rotation_is_still_refused(
        backups: Callable[[str], Awaitable[str]], api_factory: Callable[..., Any],
        fresh_database: Callable[[], Any], make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """The database and the keys both restored from before the rotation: the restored
    service knows only the old key, but its file and HTTP witnesses hold checkpoints of
    the new key with the handovers from the old one, so it takes them for its own
    deployment's and serves no decision (``ledger_rollback``)."""
    witness_file = tmp_path / "w" / "witness.json"
    witness_file.parent.mkdir()
    peer = await api_factory(database_url=Secret(await fresh_database()), data_dir=tmp_path / "peer")
    dsn = await fresh_database()
    options: dict[str, Any] = {"database_url": Secret(dsn), "checkpoint_every": 2,
                               "witnesses": (f"file:{witness_file}", url_of(peer)),
                               "witness_token": Secret(peer.tokens["witness"])}
    first = await api_factory(**options)
    deployment = first.runtime.continuity.deployment_id
    await _decide(first, 4)
    await until(lambda: _held_at_least(witness_file, 3), "the file witness to hold a checkpoint", timeout=30)
    await first.client.close()
    backup = await backups(dsn)
    settings = make_settings()
    old_keys = tmp_path / "old"
    (old_keys / "keys").mkdir(mode=0o700, parents=True)
    old_keys.chmod(0o700)
    for path in key_paths(settings).values():
        (old_keys / "keys" / path.name).write_text(path.read_text())
        (old_keys / "keys" / path.name).chmod(0o600)

    done = await _rotate(make_settings(database_url=Secret(dsn)))
    second = await api_factory(**options)
    await _decide(second, 4)
    new_pem = second.runtime.continuity.public_key_pem

    async def both_moved() -> bool:
        record = await held(peer, deployment)
        on_file = orjson.loads(witness_file.read_bytes())
        return bool(record and record["public_key_pem"] == new_pem and record["checkpoint"]["seq"] > done.ledger_seq
                    and on_file["public_key_pem"] == new_pem and on_file["checkpoint"]["seq"] > done.ledger_seq)

    await until(both_moved, "both witnesses to hold a checkpoint of the new key", timeout=30)
    assert (await held(peer, deployment) or {}).get("handovers"), "the peer gives back the handovers"
    await second.client.close()

    restored = await api_factory(**{**options, "database_url": Secret(backup), "data_dir": old_keys})
    assert restored.runtime.continuity.deployment_id == deployment
    status, body = await nonce(restored, secrets.token_hex(8))
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    verdicts = {name: state.verdict for name, state in restored.runtime.continuity.states.items()}
    assert all(v is not None and v.rollback for v in verdicts.values()), verdicts
    await restored.client.close()  # the pushing side first


async def test_the_signing_rotation_itself_refuses_a_session_that_connected_after_the_cli_checked(
        fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """``keys rotate --signing`` checks for other replayguard sessions before migrating, but
    the check that holds is the rotation's own: a session that connects after the CLI
    looked is refused there, and the signing key file and the ledger stay as they were."""
    settings = Settings(database_url=Secret(await fresh_database()), data_dir=tmp_path / "data")
    load_keys(settings)
    before = key_paths(settings)["signing"].read_text()
    async with connected_after_the_check(settings) as (pool, keys):
        with pytest.raises(ConfigError, match=r"replayguard-4343.*nothing was rotated"):
            await signing_rotation.rotate(pool, settings, keys, int(time.time() * 1e6))
        assert key_paths(settings)["signing"].read_text() == before
        assert not pending_path(key_paths(settings)["signing"]).exists()
        async with connections.acquire(pool) as conn:
            assert await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'key_rotation'") == 0
