"""``replayguard keys show`` as an operator runs it: after signing, receipt and secret key
rotations it names the deployment, every signing key with its public key and span of the
ledger, and the receipt and secret keys current and retired; it prints no key, and a data
dir that is not the database's is refused in one line."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from replayguard.core import checkpoints as cps
from replayguard.core import receipts
from replayguard.keys import Keys, key_file_id, key_paths, load_keys, retired_path
from replayguard.pg import connections
from replayguard.services import key_rotation, signing_rotation
from replayguard.settings import Settings
from tests.conftest import Api, run_cli
from tests.integration.test_ledger_continuity import nonce


def _show(settings: Settings) -> subprocess.CompletedProcess[str]:
    assert settings.database_url is not None
    return run_cli("keys", "show", "--data-dir", str(settings.data_dir),
                   "--database-url", settings.database_url.reveal())


async def _shown(settings: Settings) -> dict[str, Any]:
    done = await asyncio.to_thread(_show, settings)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return dict(json.loads(lines[0]))


async def _decide(api: Api, count: int) -> None:
    for n in range(count):
        assert (await nonce(api, f"show-{time.time_ns()}-{n}"))[1]["decision"] == "accept"
    await api.client.close()


async def _rotate(settings: Settings, names: list[str]) -> int:
    """A rotation as the CLI runs it, on a pool of its own; the ledger's head it rotated at."""
    assert settings.database_url is not None
    pool = await connections.create_pool(settings.database_url.reveal(), size=2, statement_timeout_ms=30_000)
    try:
        keys, now_us = load_keys(settings), int(time.time() * 1e6)
        if names == ["signing"]:
            return (await signing_rotation.rotate(pool, settings, keys, now_us)).ledger_seq
        return (await key_rotation.rotate(pool, settings, keys, names, now_us)).ledger_seq
    finally:
        await pool.close()


def _spellings(key: bytes) -> list[str]:
    """The ways a key could show up in printed text."""
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode(),
            base64.b64encode(key).decode().rstrip("="), base64.b32encode(key).decode().rstrip("="),
            key.decode("latin-1")]


def _public_id(keys: Keys) -> str:
    return cps.key_id(keys.signing_key().public_key())


async def test_keys_show_names_every_key_two_signing_rotations_and_a_receipt_one_left(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """After a signing rotation, a secret and receipt rotation and another signing rotation,
    ``keys show`` prints one JSON line: the first key's id as the deployment id, the three
    signing keys with their public keys, file ids and spans (0 to the first handover's seq,
    the next to the second's, the last open), the receipt key's id with the retired one's
    and its last seq, the secret key's file id with the retired one's; no spelling of any
    key (current or retired) nor of the binding's keyed checks appears in its output. With
    the retired receipt key's file gone, that rotation is still listed, without its ids."""
    settings = make_settings()
    await _decide(await api_factory(), 3)
    first = load_keys(settings)
    shown = await _shown(settings)
    assert shown["deployment_id"] == _public_id(first), shown
    assert [(k["key_id"], k["first_seq"], k["last_seq"]) for k in shown["signing_keys"]] == [
        (_public_id(first), 0, None)], shown
    assert shown["receipt_key"]["retired"] == [] and shown["secret_key"]["retired"] == [], shown

    head1 = await _rotate(settings, ["signing"])
    second = load_keys(settings)
    await _decide(await api_factory(), 2)
    head2 = await _rotate(settings, ["secret", "receipt"])
    head3 = await _rotate(settings, ["signing"])
    last = load_keys(settings)
    assert head1 < head2 < head3
    done = await asyncio.to_thread(_show, settings)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)

    assert shown["deployment_id"] == _public_id(first), shown
    signing = shown["signing_keys"]
    assert [(k["key_id"], k["first_seq"], k["last_seq"]) for k in signing] == [
        (_public_id(first), 0, head1), (_public_id(second), head1 + 1, head3), (_public_id(last), head3 + 1, None)]
    for entry, keys in zip(signing, (first, second, last), strict=True):
        assert entry["public_key_pem"] == cps.public_key_pem(keys.signing_key().public_key()), entry
        assert entry["file_id"] == key_file_id(keys.signing), entry
    assert [k["handed_over_at"] is None for k in signing] == [False, False, True], signing
    assert shown["receipt_key"]["key_id"] == receipts.key_id(last.receipt)
    assert shown["receipt_key"]["file_id"] == key_file_id(last.receipt)
    (retired_receipt,) = shown["receipt_key"]["retired"]
    assert (retired_receipt["key_id"], retired_receipt["file_id"], retired_receipt["last_seq"]) == (
        receipts.key_id(first.receipt), key_file_id(first.receipt), head2), retired_receipt
    assert retired_receipt["retired_at"].endswith("Z"), retired_receipt
    assert shown["secret_key"]["file_id"] == key_file_id(last.secret)
    assert [(r["file_id"], r["last_seq"]) for r in shown["secret_key"]["retired"]] == [
        (key_file_id(first.secret), head2)], shown
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        binding = await conn.fetchrow("SELECT * FROM key_binding")
        named = await conn.fetch("SELECT payload->>'deployment_id' AS d FROM ledger WHERE kind = 'key_rotation'"
                                 " AND payload ? 'deployment_id'")
    finally:
        await conn.close()
    assert [row["d"] for row in named] == [shown["deployment_id"]] * 2, named

    printed = done.stdout + done.stderr
    every_key = [key for keys in (first, second, last) for key in (keys.pepper, keys.secret, keys.receipt,
                                                                    keys.signing)]
    for key in every_key:
        assert not any(spelling in printed for spelling in _spellings(key)), "a key was printed"
    for column in ("pepper_check", "secret_check", "receipt_check"):
        assert bytes(binding[column]).hex() not in printed, column

    retired_path(settings, "receipt", first.receipt).unlink()
    (retired_receipt,) = (await _shown(settings))["receipt_key"]["retired"]
    assert (retired_receipt["key_id"], retired_receipt["file_id"], retired_receipt["last_seq"]) == (
        None, None, head2), retired_receipt


async def test_keys_show_with_another_data_dirs_keys_is_refused_in_one_line(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """``keys show`` with a data dir whose keys are not the ones the database was set up
    with exits 2, prints nothing on stdout and one line naming the key binding on stderr
    (no traceback, no key)."""
    settings = make_settings()
    await _decide(await api_factory(), 1)
    other = make_settings(data_dir=settings.data_dir.parent / "other")
    load_keys(other)  # another deployment's data dir: a key set of its own
    done = await asyncio.to_thread(_show, other)
    assert done.returncode == 2 and done.stdout == "", done
    assert "Traceback" not in done.stderr, done.stderr
    assert "not the ones this database was set up with" in done.stderr.splitlines()[-1], done.stderr
    for path in key_paths(other).values():
        assert path.read_text().strip() not in done.stderr


async def test_keys_show_with_a_data_dir_holding_no_keys_is_refused_before_any_key_is_made(
        api_factory: Callable[..., Any], make_settings: Callable[..., Settings]) -> None:
    """A mistyped ``--data-dir`` (no keys there): ``keys show`` exits 2 with one line naming
    the missing key files, and makes no key there (every other command would make a fresh
    set, which serve's database then refuses)."""
    settings = make_settings()
    await _decide(await api_factory(), 1)
    other = make_settings(data_dir=settings.data_dir.parent / "mistyped")
    done = await asyncio.to_thread(_show, other)
    assert done.returncode == 2 and done.stdout == "", done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    assert "no key at" in last and "no key was made" in last, done.stderr
    assert not any(path.exists() for path in key_paths(other).values())
