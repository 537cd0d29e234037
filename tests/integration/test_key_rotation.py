"""Rotating the secret key and the receipt key (``replayguard keys rotate``, migration 041).

A rotation re-encrypts every token secret and moves the key binding in one transaction;
a failure at any step leaves the database and the key files with exactly one key set, the
old or the new. After a receipt-key rotation, an honest guest's last receipt (under the
retired key) still counts, while one made with the leaked retired key cannot pass: a
position after the rotation, or one the ledger never issued, is ``receipt_invalid``; a
stale one is still a rollback, another VM's still a clone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pyotp
import pytest

from replayguard.core import receipts
from replayguard.core.receipts import ReceiptClaims
from replayguard.errors import ConfigError
from replayguard.keys import (
    key_file_id,
    key_paths,
    load_keys,
    pending_path,
    release,
    rotation_lock,
    write_pending,
)
from replayguard.pg import connections
from replayguard.services import key_rotation
from replayguard.services.key_binding import check_of
from replayguard.settings import Settings
from tests.conftest import Api, uid
from tests.waiting import until


async def _rotate(settings: Settings, names: list[str], **kwargs: Any) -> key_rotation.Rotation:
    """The rotation as the CLI runs it, on a pool of its own (this test's process is its only client)."""
    assert settings.database_url is not None
    pool = await connections.create_pool(settings.database_url.reveal(), size=2, statement_timeout_ms=30_000)
    try:
        return await key_rotation.rotate(pool, settings, load_keys(settings), names, int(time.time() * 1e6), **kwargs)
    finally:
        await pool.close()


async def _hotp_principal(api: Api, tokens: int = 1) -> tuple[str, list[str]]:
    principal = uid("p")
    secrets = [(await api.enroll(principal, type="hotp"))["secret"] for _ in range(tokens)]
    return principal, secrets


async def _stored_secrets(api: Api) -> dict[str, bytes]:
    rows = await api.runtime.pool.fetch("SELECT id, secret_ct FROM otp_tokens")
    return {r["id"]: bytes(r["secret_ct"]) for r in rows}


def _key_files(settings: Settings) -> dict[str, str]:
    return {name: path.read_text() for name, path in key_paths(settings).items()}


async def test_a_secret_key_rotation_re_encrypts_every_token_and_the_codes_still_verify(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """After rotating the secret key, every token secret in the database is another
    ciphertext, the old key is a retired file, the binding names the new key, and a
    service on the rotated data dir verifies the same HOTP secrets' next codes."""
    settings = make_settings()
    api = await api_factory()
    principal, secrets = await _hotp_principal(api, tokens=3)
    before, old_keys = await _stored_secrets(api), load_keys(settings)
    await api.client.close()

    done = await _rotate(settings, ["secret"])

    new_keys = load_keys(settings)
    assert done.rotated == ("secret",) and done.tokens_reencrypted == len(before)
    assert new_keys.secret != old_keys.secret and new_keys.receipt == old_keys.receipt
    retired = Path(done.retired_files["secret"])
    assert retired.parent == settings.data_dir / "keys" / "retired"
    assert bytes.fromhex(retired.read_text()) == old_keys.secret
    assert not pending_path(key_paths(settings)["secret"]).exists()
    again = await api_factory()
    after = await _stored_secrets(again)
    assert after.keys() == before.keys() and all(after[i] != before[i] for i in before)
    bound = await again.runtime.pool.fetchval("SELECT secret_check FROM key_binding")
    assert bytes(bound) == check_of(new_keys.secret)
    entry = await again.runtime.pool.fetchrow("SELECT seq, payload FROM ledger WHERE kind = 'key_rotation'")
    assert entry["seq"] == done.ledger_seq + 1 and entry["payload"]["keys"] == ["secret"], entry
    assert entry["payload"]["tokens_reencrypted"] == len(before)
    text = json.dumps(entry["payload"])
    assert old_keys.secret.hex() not in text and new_keys.secret.hex() not in text
    status, verified = await again.get("/v1/ledger/verify")
    assert status == 200 and verified["ok"], verified
    for secret in secrets:
        body = {"vm_id": uid("vm"), "principal": principal, "otp": pyotp.HOTP(secret).at(0)}
        status, answer = await again.post("/v1/otp/verify", body)
        assert (status, answer["decision"]) == (200, "accept"), answer


class _Injected(Exception):
    """The failure a test injects into a rotation."""


async def test_a_rotation_failing_mid_way_leaves_the_old_keys_and_ciphertexts(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation that fails after re-encrypting its first batch of token secrets (of
    three) changes nothing: the database holds the old ciphertexts and binding, the key
    files are the old ones, no ``.next`` file is left, and a service starts and verifies."""
    settings = make_settings()
    api = await api_factory()
    principal, secrets = await _hotp_principal(api, tokens=5)
    before, files = await _stored_secrets(api), _key_files(settings)
    await api.client.close()
    monkeypatch.setattr(key_rotation, "_BATCH", 2)

    def fail_after_one_batch(step: str, facts: dict[str, Any]) -> None:
        if step == "tokens_reencrypted" and facts["done"] >= 2:
            raise _Injected(step)

    with pytest.raises(_Injected):
        await _rotate(settings, ["secret", "receipt"], progress=fail_after_one_batch)

    assert _key_files(settings) == files
    assert not any(pending_path(path).exists() for path in key_paths(settings).values())
    assert not (settings.data_dir / "keys" / "retired").exists()
    again = await api_factory()
    assert await _stored_secrets(again) == before
    assert await again.runtime.pool.fetchval("SELECT count(*) FROM key_rotations") == 0
    body = {"vm_id": uid("vm"), "principal": principal, "otp": pyotp.HOTP(secrets[4]).at(0)}
    assert (await again.post("/v1/otp/verify", body))[1]["decision"] == "accept"


async def test_a_rotation_killed_after_its_commit_is_finished_by_the_next_start(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation that dies between its commit and renaming the new keys into place
    leaves ``.next`` files the database is bound to: the next service to start promotes
    them (retiring the old keys) and verifies with the new ones."""
    settings = make_settings()
    api = await api_factory()
    principal, secrets = await _hotp_principal(api)
    old = load_keys(settings)
    await api.client.close()

    def die(*args: Any) -> Path:
        raise _Injected("killed before the renames")

    with monkeypatch.context() as patch:
        patch.setattr(key_rotation, "promote_pending", die)
        with pytest.raises(_Injected):
            await _rotate(settings, ["secret", "receipt"])
    pending = {name: bytes.fromhex(pending_path(key_paths(settings)[name]).read_text())
               for name in ("secret", "receipt")}
    assert load_keys(settings).secret == old.secret  # the key files are still the old ones

    again = await api_factory()
    now = load_keys(settings)
    assert (now.secret, now.receipt) == (pending["secret"], pending["receipt"])
    assert not any(pending_path(path).exists() for path in key_paths(settings).values())
    assert sorted(p.name.split("-")[0] for p in (settings.data_dir / "keys" / "retired").iterdir()) == \
        ["receipt", "secret"]
    body = {"vm_id": uid("vm"), "principal": principal, "otp": pyotp.HOTP(secrets[0]).at(0)}
    status, answer = await again.post("/v1/otp/verify", body)
    assert (status, answer["decision"]) == (200, "accept"), answer
    assert answer["receipt"].split(".")[1] == receipts.key_id(now.receipt)


async def _nonce(api: Api, vm: str, receipt: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_id": vm, "scope": "s", "nonce": uid("n"), "receipt_kept": True}
    if receipt is not None:
        body["receipt"] = receipt
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, answer
    return dict(answer)


async def test_after_a_receipt_key_rotation_honest_receipts_pass_and_the_leaked_key_forges_nothing(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """Receipts issued before a receipt-key rotation, presented after it: a guest's last
    receipt passes with no flag (and gets one under the new key); a stale one is still
    ``rollback_detected``; another VM's still ``clone_detected``; and receipts made with
    the leaked retired key are ``receipt_invalid``: one naming a position after the
    rotation, one naming a position the ledger never issued to the VM, one for a VM
    that never had a receipt."""
    settings = make_settings()
    api = await api_factory()
    honest, stale, forger, clone, source = (uid(name) for name in ("honest", "stale", "forger", "clone", "source"))
    last: dict[str, str] = {}
    for vm in (honest, stale, forger, clone, source):
        first = await _nonce(api, vm)
        last[vm] = (await _nonce(api, vm, first["receipt"]))["receipt"]
        if vm == stale:
            last["stale-old"] = first["receipt"]
    leaked = load_keys(settings).receipt
    forger_seq = int(await api.runtime.pool.fetchval("SELECT last_receipt_seq FROM vms WHERE vm_id = $1", forger))
    await api.client.close()

    done = await _rotate(settings, ["receipt"])
    after = await api_factory()

    answer = await _nonce(after, honest, last[honest])
    assert (answer["decision"], answer["flags"]) == ("accept", []), answer
    assert answer["receipt"].split(".")[1] == done.receipt_key_id != receipts.key_id(leaked)
    assert (await _nonce(after, stale, last["stale-old"]))["flags"] == ["rollback_detected"]
    assert "clone_detected" in (await _nonce(after, clone, last[source]))["flags"]
    forgeries = {
        "after the rotation": ReceiptClaims(forger, done.ledger_seq + 1, 0),
        "never issued": ReceiptClaims(forger, forger_seq + 1, 0),
        "unknown VM": ReceiptClaims(uid("nobody"), 1, 0),
    }
    for what, claims in forgeries.items():
        flags = (await _nonce(after, claims.vm_id, receipts.issue(leaked, claims)))["flags"]
        assert flags == ["receipt_invalid"], (what, flags)
    answer = await _nonce(after, forger, last[forger])  # the forger VM's own honest receipt still counts
    assert answer["flags"] == [], answer


async def test_after_the_first_new_receipt_the_retired_ones_of_that_vm_are_stale(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """Once a VM presented its receipt after the rotation, the receipt it held before
    (under the retired key, even the newest then) is stale: a guest rolled back across the
    rotation is caught, and so is a replay of that receipt made with the leaked key."""
    settings = make_settings()
    api = await api_factory()
    vm = uid("vm")
    before = (await _nonce(api, vm, (await _nonce(api, vm))["receipt"]))["receipt"]
    await api.client.close()
    await _rotate(settings, ["receipt"])
    after = await api_factory()
    moved = await _nonce(after, vm, before)
    assert moved["flags"] == [], moved
    assert (await _nonce(after, vm, before))["flags"] == ["rollback_detected"]


async def test_a_service_with_the_keys_before_a_rotation_is_refused_and_told_why(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A copy of the data dir's keys taken before a rotation (another host not given the
    new keys) cannot start on the rotated database: the key binding refuses it, saying
    the key was retired by a rotation and what to copy."""
    settings = make_settings()
    api = await api_factory()
    await api.client.close()
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir(mode=0o700)
    (stale_dir / "keys").mkdir(mode=0o700)
    for path in key_paths(settings).values():
        (stale_dir / "keys" / path.name).write_text(path.read_text())
        (stale_dir / "keys" / path.name).chmod(0o600)
    await _rotate(settings, ["receipt"])
    with pytest.raises(ConfigError, match=r"receipt key differs\): its receipt key was retired by a key rotation"
                                          r" at .*: copy the rotated keys \(with retired/\) from where"
                                          r" `replayguard keys rotate` ran"):
        await api_factory(data_dir=stale_dir)


async def test_a_service_that_read_its_keys_as_a_rotation_on_its_host_committed_is_told_to_start_again(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A serve that read the data dir's keys just before a rotation on the same host
    committed (its key binding waited for the rotation's transaction) is refused, told to
    start again, not to copy keys it already has; started again, it runs."""
    from replayguard import runtime

    settings = make_settings()
    api = await api_factory()
    await api.client.close()
    read_before = load_keys(settings)
    await _rotate(settings, ["secret", "receipt"])
    monkeypatch.setattr(runtime, "load_keys", lambda _settings: read_before)
    with pytest.raises(ConfigError, match=r"secret key and the receipt key differ\): its secret key was retired by"
                                          r" a key rotation at .* that committed after this process read its keys,"
                                          r" and the key files already hold the rotated keys: start it again;") as e:
        await api_factory()
    assert "copy" not in e.value.message, e.value.message
    monkeypatch.undo()
    again = await api_factory()
    assert (await _nonce(again, uid("vm")))["decision"] == "accept"


async def test_keys_a_rotation_left_to_rename_into_place_are_the_rotated_ones_too(
        fresh_database: Callable[[], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a rotation's commit and its renames the data dir holds the rotated key as its
    ``.next`` file: a process holding the keys read before is told to start again; one whose
    data dir has neither the rotated key nor its ``.next`` file is told to copy them."""
    from replayguard.keys import keys_location, keys_on_disk
    from replayguard.services.key_binding import hold_to_binding

    dsn = await fresh_database()
    settings = Settings(database_url=_secret(dsn), data_dir=tmp_path / "data")
    keys = load_keys(settings)
    pool = await connections.create_pool(dsn, size=2, statement_timeout_ms=30_000,
                                         application_name="replayguard-1-keys-test")
    try:
        await hold_to_binding(pool, keys, 1, keys_location(settings), {})
        monkeypatch.setattr(key_rotation, "promote_pending", lambda _s, _name, _old: Path("not-renamed"))
        await key_rotation.rotate(pool, settings, keys, ["receipt"], 2)
        assert pending_path(key_paths(settings)["receipt"]).exists()
        with pytest.raises(ConfigError, match=r"the key files already hold the rotated keys: start it again"):
            await hold_to_binding(pool, keys, 3, keys_location(settings), {}, partial(keys_on_disk, settings))
        pending_path(key_paths(settings)["receipt"]).unlink()
        with pytest.raises(ConfigError, match=r"copy the rotated keys \(with retired/\) from where"):
            await hold_to_binding(pool, keys, 3, keys_location(settings), {}, partial(keys_on_disk, settings))
    finally:
        await pool.close()


async def test_a_backup_from_before_a_rotation_is_moved_to_the_current_keys(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], fresh_database: Callable[[], Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database bound to keys the data dir retired (a backup restored from before a
    rotation) is refused at start with a message naming the retired file and
    ``--restored``; ``adopt_restored`` re-encrypts it under the current keys, after which
    it starts and its tokens verify."""
    settings = make_settings()
    api = await api_factory()
    principal, secrets = await _hotp_principal(api)
    await api.client.close()
    backup = await fresh_database()
    await _copy_database(settings, backup)
    await _rotate(settings, ["secret", "receipt"])
    restored = make_settings(database_url=_secret(backup))
    with pytest.raises(ConfigError, match=r"bound to the retired key .*/keys/retired/.* --restored"):
        await api_factory(database_url=_secret(backup))
    pool = await connections.create_pool(backup, size=2, statement_timeout_ms=30_000)
    try:
        done = await key_rotation.adopt_restored(pool, restored, load_keys(restored), int(time.time() * 1e6))
    finally:
        await pool.close()
    assert set(done.rotated) == {"secret", "receipt"} and done.tokens_reencrypted == 1
    again = await api_factory(database_url=_secret(backup))
    body = {"vm_id": uid("vm"), "principal": principal, "otp": pyotp.HOTP(secrets[0]).at(0)}
    assert (await again.post("/v1/otp/verify", body))[1]["decision"] == "accept"


def _secret(dsn: str) -> Any:
    from replayguard.settings import Secret

    return Secret(dsn)


async def _copy_database(settings: Settings, target: str) -> None:
    """The rows a restore would bring back: every table of the service's schema, copied
    from the settings' database into ``target`` (a fresh, migrated database)."""
    import asyncpg

    assert settings.database_url is not None
    source, dest = await asyncpg.connect(settings.database_url.reveal()), await asyncpg.connect(target)
    try:
        await dest.execute("SET session_replication_role = replica")  # no triggers: rows as they were
        for table in ("key_binding", "otp_credentials", "otp_tokens", "principals"):
            if not await source.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                continue
            await dest.execute(f"TRUNCATE {table} CASCADE")
            rows = await source.fetch(f"SELECT * FROM {table}")
            if rows:
                await dest.copy_records_to_table(table, records=[tuple(r.values()) for r in rows],
                                                 columns=list(rows[0].keys()))
    finally:
        await source.close()
        await dest.close()



async def test_a_runtime_that_missed_a_rotation_answers_503_and_never_an_old_key_receipt(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """Two service runtimes on one database: one started before a rotation that did not
    see it (the rotation here runs in the same process, so its check of other sessions
    passes it by), one started after. Once the first has to open a connection again, it
    answers 503 ``unavailable`` to every decision, never a receipt under the retired key,
    while the second decides and issues receipts under the new one."""
    settings = make_settings()
    before = await api_factory()
    vm = uid("vm")
    await _nonce(before, vm)
    done = await _rotate(settings, ["receipt"])
    after = await api_factory()
    await after.runtime.pool.execute(  # every session of this process: both runtimes reconnect
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = current_setting('application_name') AND pid <> pg_backend_pid()")
    await before.runtime.pool.expire_connections()
    await after.runtime.pool.expire_connections()

    async def decided() -> dict[str, Any] | None:
        body = {"vm_id": vm, "scope": "s", "nonce": uid("n")}
        status, answer = await after.post("/v1/nonces/consume", body)
        return dict(answer) if status == 200 else None

    assert (await until(decided, "the new runtime decides"))["receipt"].split(".")[1] == done.receipt_key_id
    for _ in range(3):
        status, answer = await before.post("/v1/nonces/consume", {"vm_id": vm, "scope": "s", "nonce": uid("n")})
        assert (status, answer["error"]["code"]) == (503, "unavailable"), answer


async def test_a_start_during_a_rotation_leaves_its_new_keys_alone(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """While a rotation holds the keys dir's lock, its ``.next`` keys are not yet what the
    database is bound to: a process opening the database then leaves them in place (were
    it to remove them, the rotation would commit to keys no longer on disk), and starts
    on the current keys."""
    settings = make_settings()
    api = await api_factory()
    await api.client.close()
    lock = rotation_lock(settings)
    try:
        write_pending(settings, "secret")
        again = await api_factory()
        assert pending_path(key_paths(settings)["secret"]).exists()
        assert (await _nonce(again, uid("vm")))["decision"] == "accept"
    finally:
        release(lock)


async def test_keys_read_from_named_files_are_rotated_beside_them(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """With ``secret_key_file`` and ``receipt_key_file`` naming files outside the data dir
    (a keys volume shared by instances with data dirs of their own), the rotation replaces
    those files and retires the old keys to ``retired/`` beside them, where a service with
    another data dir and the same named files finds the retired receipt key: a guest's
    receipt from before the rotation passes there."""
    shared = tmp_path / "shared-keys"
    shared.mkdir(mode=0o700)
    for name in ("secret", "receipt"):
        (shared / f"{name}.key").write_text(os.urandom(32).hex() + "\n")
        (shared / f"{name}.key").chmod(0o600)
    named = {"secret_key_file": shared / "secret.key", "receipt_key_file": shared / "receipt.key"}
    first = make_settings(**named)
    api = await api_factory(**named)
    vm = uid("vm")
    kept = (await _nonce(api, vm, (await _nonce(api, vm))["receipt"]))["receipt"]
    await api.client.close()
    old_receipt = bytes.fromhex((shared / "receipt.key").read_text())

    done = await _rotate(first, ["secret", "receipt"])

    assert {Path(path).parent for path in done.retired_files.values()} == {shared / "retired"}
    assert bytes.fromhex((shared / "retired" / f"receipt-{key_file_id(old_receipt)}.key").read_text()) == old_receipt
    assert not (first.data_dir / "keys" / "retired").exists()
    other_dir = tmp_path / "data-2"
    other_dir.mkdir(mode=0o700)
    (other_dir / "keys").mkdir(mode=0o700)
    for name in ("pepper", "signing"):
        (other_dir / "keys" / f"{name}.key").write_text((first.data_dir / "keys" / f"{name}.key").read_text())
        (other_dir / "keys" / f"{name}.key").chmod(0o600)
    second = await api_factory(data_dir=other_dir, **named)
    answer = await _nonce(second, vm, kept)
    assert answer["flags"] == [] and answer["receipt"].split(".")[1] == done.receipt_key_id, answer


async def test_a_leaked_retired_receipt_key_cannot_make_the_service_fail(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """Receipts MACed by the leaked retired key whose payload no ledger holds (nested too
    deep to parse, a seq far below zero that PostgreSQL cannot take as a bigint) are
    answered 200 ``receipt_invalid``, never 500."""
    settings = make_settings()
    api = await api_factory()
    vm = uid("vm")
    await _nonce(api, vm, (await _nonce(api, vm))["receipt"])
    leaked = load_keys(settings).receipt
    await api.client.close()
    await _rotate(settings, ["receipt"])
    after = await api_factory()
    kid = receipts.key_id(leaked)
    for payload in (b"[" * 1400, json.dumps([vm, -2**70, 0]).encode(), json.dumps([vm, -1, 0]).encode()):
        forged = f"rg2.{kid}.{receipts._b64(payload)}.{receipts._b64(receipts._mac_v2(leaked, kid, payload))}"
        assert (await _nonce(after, vm, forged))["flags"] == ["receipt_invalid"], payload[:40]


async def test_a_connection_opened_while_a_rotation_commits_is_refused_after_it(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """A running instance with no session open when a rotation checked for one (its
    connections dropped) reconnects while the rotation's transaction is still open (it is
    re-encrypting tokens, the binding locked and moved but not committed). The new
    connection's binding check must wait for that transaction and see where it left the
    binding: the instance's next decision is 503, never a receipt under the key the
    rotation just retired."""
    settings = make_settings()
    api = await api_factory()
    vm = uid("vm")
    await _nonce(api, vm)
    assert settings.database_url is not None
    dsn, mine = settings.database_url.reveal(), f"replayguard-{os.getpid()}"
    rotation = await asyncpg.connect(dsn, server_settings={"application_name": "a-rotation-in-flight"})
    observer = await asyncpg.connect(dsn, server_settings={"application_name": "an-observer"})
    try:
        await rotation.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND application_name = $1", mine)
        await api.runtime.pool.expire_connections()
        tx = rotation.transaction()
        await tx.start()  # what key_rotation._move_database does before it commits
        await rotation.execute("SELECT * FROM key_binding FOR UPDATE")
        await rotation.execute("SELECT seq FROM ledger_head FOR UPDATE")
        await rotation.execute("UPDATE key_binding SET receipt_check = $1", check_of(os.urandom(32)))
        decision = asyncio.ensure_future(
            api.post("/v1/nonces/consume", {"vm_id": vm, "scope": "s", "nonce": uid("n")}))

        async def waiting() -> bool:  # pg_stat_activity read outside the transaction: a fresh view each time
            return bool(await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                mine))

        await until(waiting, "the instance's new connection waits on the rotation's locks")
        await tx.commit()
        status, answer = await decision
    finally:
        await rotation.close()
        await observer.close()
    old_kid = receipts.key_id(api.runtime.keys.receipt)
    assert status == 503 and answer["error"]["code"] == "unavailable", (status, answer)
    assert old_kid not in json.dumps(answer)


@pytest.mark.parametrize("spoil", ["others can write retired/", "retired/ holds another key under the name"])
async def test_a_retired_place_that_cannot_take_the_old_key_stops_the_rotation_before_it_commits(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], spoil: str) -> None:
    """The old key goes to ``retired/`` only after the database moved to the new one. A
    ``retired/`` that cannot take it (others can write it; a file there already holds
    another key under the old key's name, which would be kept in its place) is found
    before anything changes: the rotation refuses, the binding, the key files and the
    retired files stay as they were, and no ``.next`` file is left."""
    settings = make_settings()
    api = await api_factory()
    await api.client.close()
    keys = load_keys(settings)
    retired = key_paths(settings)["receipt"].parent / "retired"
    retired.mkdir(mode=0o700)
    if spoil.startswith("others"):
        retired.chmod(0o777)
    else:
        squatter = retired / f"receipt-{key_file_id(keys.receipt)}.key"
        squatter.write_text(os.urandom(32).hex() + "\n")
        squatter.chmod(0o600)
    before = (_key_files(settings), sorted(p.read_text() for p in retired.iterdir()))
    with pytest.raises(ConfigError, match="nothing was rotated"):
        await _rotate(settings, ["receipt"])
    assert (_key_files(settings), sorted(p.read_text() for p in retired.iterdir())) == before
    assert not pending_path(key_paths(settings)["receipt"]).exists()
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        assert bytes(await conn.fetchval("SELECT receipt_check FROM key_binding")) == check_of(keys.receipt)
    finally:
        await conn.close()


async def test_the_leaked_key_cannot_name_a_position_that_was_never_the_vms_to_lock_it_out(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """Under ``receipt_reaction = refuse``, a receipt made with the leaked retired key,
    naming an honest VM at a ledger position before its own but that was never one of its
    decisions (another VM's entry: no receipt of this VM ever named it), is
    ``receipt_invalid``, not a rollback: the VM is not locked out, and its guest's newest
    receipt still passes. So does the only receipt of a VM that never presented one."""
    settings = make_settings(receipt_reaction="refuse")
    api = await api_factory(receipt_reaction="refuse")
    vm, other, fresh = uid("vm"), uid("other"), uid("fresh")
    elsewhere = (await _nonce(api, other))["seq"]
    newest = (await _nonce(api, vm, (await _nonce(api, vm))["receipt"]))["receipt"]
    first_of_fresh = (await _nonce(api, fresh))["receipt"]
    leaked = load_keys(settings).receipt
    await api.client.close()
    await _rotate(settings, ["receipt"])
    after = await api_factory(receipt_reaction="refuse")
    forged = receipts.issue(leaked, ReceiptClaims(vm, int(elsewhere), 0))
    assert (await _nonce(after, vm, forged))["flags"] == ["receipt_invalid"]
    answer = await _nonce(after, vm, newest)
    assert (answer["decision"], answer["flags"]) == ("accept", []), answer
    answer = await _nonce(after, fresh, first_of_fresh)
    assert (answer["decision"], answer["flags"]) == ("accept", []), answer


@pytest.mark.parametrize("rotated", [["secret", "receipt"], ["secret"]])
async def test_a_key_file_shared_by_two_keys_is_refused_before_anything_changes(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path,
        rotated: list[str]) -> None:
    """One file named as both the secret key's and the receipt key's (the same path, or a
    link to it) holds one key for both. Rotating either would put a new key in that file
    for both (rotating both, the new secret key, under which every token secret was just
    re-encrypted, would be overwritten by the new receipt key and lost): the rotation
    refuses, nothing changed, and the service still starts and decides."""
    shared = tmp_path / "shared-keys"
    shared.mkdir(mode=0o700)
    (shared / "one.key").write_text(os.urandom(32).hex() + "\n")
    (shared / "one.key").chmod(0o600)
    (shared / "link.key").symlink_to(shared / "one.key")
    named = {"secret_key_file": shared / "one.key", "receipt_key_file": shared / "link.key"}
    settings = make_settings(**named)
    api = await api_factory(**named)
    principal, secrets = await _hotp_principal(api)
    await api.client.close()
    before = (shared / "one.key").read_text()
    with pytest.raises(ConfigError, match="nothing was rotated"):
        await _rotate(settings, rotated)
    assert (shared / "one.key").read_text() == before
    assert sorted(p.name for p in shared.iterdir()) == [".rotation.lock", "link.key", "one.key"]
    again = await api_factory(**named)
    status, answer = await again.post("/v1/otp/verify", {"principal": principal, "otp": pyotp.HOTP(secrets[0]).at(0),
                                                         "vm_id": uid("vm")})
    assert (status, answer["decision"]) == (200, "accept"), answer
