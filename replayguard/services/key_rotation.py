"""Rotating the secret key and the receipt key (``replayguard keys rotate``, migration 041).

A rotation is one PostgreSQL transaction between two file steps, all under the rotation
lock of the keys' directories (``keys.rotation_lock``):

1. each key's file is checked to be its own (``keys.check_own_file``) and ``retired/`` to
   take the old keys (``keys.check_retired_place``): step 3 must not fail, nor lose a key,
   after step 2 committed; then the new keys are written as ``.next`` files beside
   the current ones (``keys.write_pending``);
2. one transaction locks the key binding and the ledger's head, refuses while any other
   replayguard process has a session on the database, re-encrypts every token secret
   under the new secret key, moves ``key_binding`` to the new keys and records the
   rotation in ``key_rotations`` (with the ledger's head: the last seq the retired
   receipt key issued at) and as a ``key_rotation`` ledger entry (who, which keys, their
   ids: never a key);
3. the old keys become retired files and the ``.next`` files take their place
   (``keys.promote_pending``).

Killed before 2 commits, the database and the current key files are untouched and the
``.next`` files are removed by the next process that opens the database; killed after, that
process finishes step 3 (``settle``). Either way the database opens with exactly one key set.

Running instances read their keys at start, so a rotation refuses while any other process
is connected (``pg_stat_activity``, whose ``application_name`` every role can read: every
session replayguard opens is named ``replayguard-<pid>``, and the CLI's rotation names its
own ``replayguard-<pid>-keys-<random>``, so a serve on another host with the rotation's
process id is another process); an instance started afterwards
with the old keys is refused by the key binding, with a message that names the rotation,
and one that had no session open at that moment fails closed on its next connection
(``key_binding.BindingGuard``).
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.receipts import ReceiptClaims, ReceiptKeys, RetiredKey, key_id
from ..errors import ConfigError
from ..keys import (
    ROTATABLE,
    Keys,
    check_own_file,
    check_retired_place,
    key_file_id,
    key_paths,
    pending_path,
    promote_pending,
    release,
    retired_keys,
    rotation_lock,
    settle_files,
    write_pending,
)
from ..pg.connections import acquire
from ..settings import Settings
from .key_binding import check_of, checks
from .recovery import operator

_BATCH = 1000
_COLUMN = {"secret": "secret_check", "receipt": "receipt_check"}
Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Rotation:
    """What a rotation did, as the CLI prints it: never a key, only ids. ``new_key_ids``:
    each new key's file id (``keys.key_file_id``, as the ledger entry and the retired
    files name keys); ``receipt_key_id``: the new receipt key's id as receipts carry it."""

    rotated: tuple[str, ...]
    tokens_reencrypted: int
    ledger_seq: int
    retired_files: dict[str, str]
    new_key_ids: dict[str, str]
    receipt_key_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {"event": "keys_rotated", "rotated": list(self.rotated), "tokens_reencrypted": self.tokens_reencrypted,
                "ledger_seq": self.ledger_seq, "retired_files": self.retired_files, "new_key_ids": self.new_key_ids,
                "receipt_key_id": self.receipt_key_id}


async def rotate(pool: asyncpg.Pool, settings: Settings, keys: Keys, names: Iterable[str], now_us: int,
                 progress: Progress | None = None) -> Rotation:
    """Rotates the named keys (``secret``, ``receipt``); raises ``ConfigError``, having
    changed nothing, when another replayguard process is connected or a token secret does
    not decrypt. ``progress(step, facts)`` hears each step (facts hold no secret)."""
    chosen = tuple(name for name in ROTATABLE if name in set(names))
    if not chosen:
        raise ConfigError("name a key to rotate: --secret, --receipt or both")
    report = progress or (lambda step, facts: None)
    lock = rotation_lock(settings)
    try:
        await settle_locked(pool, settings)
        old = {"secret": keys.secret, "receipt": keys.receipt}
        for name in chosen:  # step 3 must not fail, nor lose a key, after step 2 committed
            check_own_file(settings, name)
            check_retired_place(settings, name, old[name])
        new = {name: write_pending(settings, name) for name in chosen}
        report("new_keys_written", {"keys": list(chosen)})
        try:
            count, head = await _move_database(pool, keys, new, now_us, report)
        except BaseException:
            await _after_failure(pool, settings)
            raise
        retired = {name: str(promote_pending(settings, name, old[name])) for name in chosen}
        report("key_files_replaced", {"retired_files": retired})
    finally:
        release(lock)
    ids = {name: key_file_id(key) for name, key in new.items()}
    return Rotation(chosen, count, head, retired, ids, key_id(new["receipt"]) if "receipt" in new else None)


async def adopt_restored(pool: asyncpg.Pool, settings: Settings, keys: Keys, now_us: int,
                         progress: Progress | None = None) -> Rotation:
    """Moves a database restored from a backup taken before a rotation, bound to keys this
    data dir retired (``keys.retired_dir``), to its current keys: the same transaction
    as a rotation, from the retired keys to the current ones; no key file changes."""
    bound = await bound_checks(pool)
    current = {"secret": keys.secret, "receipt": keys.receipt}
    old: dict[str, bytes] = {}
    for name in ROTATABLE:
        if _is(bound.get(name), current[name]):
            continue
        found = [key for key in retired_keys(settings, name).values() if _is(bound.get(name), key)]
        if not found:
            raise ConfigError(f"the database is bound to a {name} key that is neither this data dir's current one"
                              " nor one it retired (keys/retired/): nothing was changed")
        old[name] = found[0]
    if not old:
        raise ConfigError("the database is bound to this data dir's current keys: nothing to adopt")
    report = progress or (lambda step, facts: None)
    lock = rotation_lock(settings)
    try:
        was = replace(keys, secret=old.get("secret", keys.secret), receipt=old.get("receipt", keys.receipt))
        count, head = await _move_database(pool, was, {n: current[n] for n in old}, now_us, report, restored=True)
    finally:
        release(lock)
    ids = {name: key_file_id(current[name]) for name in old}
    return Rotation(tuple(old), count, head, {}, ids, key_id(keys.receipt) if "receipt" in old else None)


async def _move_database(pool: asyncpg.Pool, keys: Keys, new: dict[str, bytes], now_us: int,
                         report: Progress, *, restored: bool = False) -> tuple[int, int]:
    """Step 2: one transaction, from ``keys`` to ``new``. Returns the tokens re-encrypted
    and the ledger's head."""
    old = {"secret": keys.secret, "receipt": keys.receipt}
    mine = checks(keys)
    async with acquire(pool) as conn, conn.transaction():
        bound = await conn.fetchrow("SELECT * FROM key_binding FOR UPDATE")
        if bound is None or any(not hmac.compare_digest(bytes(bound[column] or b""), mine[column])
                                for column in ("pepper_check", "secret_check", "receipt_check", "signing_public")):
            raise ConfigError("the database is not bound to this data dir's keys: nothing was rotated")
        await refuse_while_others_connected(conn)
        head = int(await conn.fetchval("SELECT seq FROM ledger_head FOR UPDATE"))
        report("database_locked", {"ledger_seq": head})
        count = 0
        if "secret" in new:
            count = await _reencrypt(conn, keys.secret, new["secret"], report)
        for name, key in new.items():
            await conn.execute(f"UPDATE key_binding SET {_COLUMN[name]} = $1", check_of(key))  # noqa: S608 - a fixed column
            await conn.execute("INSERT INTO key_rotations (key_name, retired_check, current_check, rotated_us,"
                               " ledger_seq) VALUES ($1, $2, $3, $4, $5)",
                               name, check_of(old[name]), check_of(key), now_us, head)
        entry = {"keys": list(new), "who": operator(), "restored": restored, "tokens_reencrypted": count,
                 "receipts_until_seq": head,
                 "retired_ids": {name: key_file_id(old[name]) for name in new},
                 "new_ids": {name: key_file_id(key) for name, key in new.items()}}
        await conn.fetchval("SELECT rg_append($1, 'key_rotation', NULL, NULL, NULL, NULL, NULL, $2::jsonb)",
                            now_us, entry)
        report("committing", {"tokens_reencrypted": count})
    return count, head


async def refuse_while_others_connected(conn: asyncpg.Connection) -> None:
    """Raises ``ConfigError`` when another replayguard process has a session on this
    database: it holds the keys it started with, and would go on using the old ones."""
    others = await conn.fetch(
        "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'replayguard-%' AND application_name <> current_setting('application_name')"
        " ORDER BY 1")
    if others:
        names = ", ".join(str(row[0]) for row in others[:5]) + (", ..." if len(others) > 5 else "")
        raise ConfigError(f"{len(others)} other replayguard process(es) are connected to this database ({names};"
                          " the number is the process id on its host): stop every instance (serve and its workers,"
                          " on every host) before rotating keys; nothing was rotated")


async def _reencrypt(conn: asyncpg.Connection, old: bytes, new: bytes, report: Progress) -> int:
    """Every token secret (deleted tokens' too), decrypted under the old key and encrypted
    under the new one with a fresh nonce, in batches; the plaintext never leaves memory."""
    before, after = AESGCM(old), AESGCM(new)
    ids = [str(r[0]) for r in await conn.fetch("SELECT id FROM otp_tokens ORDER BY id")]
    done = 0
    for start in range(0, len(ids), _BATCH):
        rows = await conn.fetch("SELECT id, secret_ct FROM otp_tokens WHERE id = ANY($1::text[])",
                                ids[start:start + _BATCH])
        cts = []
        for row in rows:
            token_id, blob = str(row["id"]), bytes(row["secret_ct"])
            try:
                plain = before.decrypt(blob[:12], blob[12:], token_id.encode())
            except InvalidTag:
                raise ConfigError(f"token {token_id}'s secret does not decrypt under the current secret key:"
                                  " nothing was rotated") from None
            nonce = os.urandom(12)
            cts.append(nonce + after.encrypt(nonce, plain, token_id.encode()))
        await conn.execute("UPDATE otp_tokens t SET secret_ct = u.ct FROM unnest($1::text[], $2::bytea[]) AS u(id, ct)"
                           " WHERE t.id = u.id", [str(r["id"]) for r in rows], cts)
        done += len(rows)
        report("tokens_reencrypted", {"done": done, "total": len(ids)})
    return done


async def _after_failure(pool: asyncpg.Pool, settings: Settings) -> None:
    """After a failed step 2: the ``.next`` files go if the database did not move to them,
    are promoted if it did (a commit whose answer was lost), and stay for the next start
    to settle if the database cannot be asked."""
    with contextlib.suppress(OSError, asyncpg.PostgresError):
        await settle_locked(pool, settings)


async def bound_checks(pool: asyncpg.Pool) -> dict[str, bytes | None]:
    async with acquire(pool) as conn:
        row = await conn.fetchrow("SELECT secret_check, receipt_check FROM key_binding")
    if row is None:
        return {}
    return {name: None if row[column] is None else bytes(row[column]) for name, column in _COLUMN.items()}


async def settle_locked(pool: asyncpg.Pool, settings: Settings) -> list[str]:
    """``keys.settle_files`` against the binding as it is now, for a caller holding the
    rotation lock."""
    bound = await bound_checks(pool)
    return settle_files(settings, lambda name, key: _is(bound.get(name), key))


def _is(check: bytes | None, key: bytes) -> bool:
    return check is not None and hmac.compare_digest(check, check_of(key))


async def settle(pool: asyncpg.Pool, settings: Settings) -> list[str]:
    """What a process does before it reads the binding: finishes or undoes a rotation
    killed mid-way (``keys.settle_files``), under the rotation lock and with the binding
    read under it (read before, it could predate the commit of a rotation that then
    died). Does nothing while a rotation runs. Returns the keys it promoted."""
    paths = key_paths(settings)
    if not any(pending_path(paths[name]).exists() for name in ROTATABLE):
        return []
    try:
        lock = rotation_lock(settings)
    except ConfigError:
        return []  # a rotation is running: its own renames follow its commit
    try:
        return await settle_locked(pool, settings)
    finally:
        release(lock)


async def receipt_keys(pool: asyncpg.Pool, settings: Settings, keys: Keys) -> ReceiptKeys:
    """The receipt keys a process checks receipts under: its current key, and each retired
    key found in keys/retired/ with the ledger seq its rotation recorded, oldest first."""
    async with acquire(pool) as conn:
        rows = await conn.fetch("SELECT retired_check, ledger_seq FROM key_rotations WHERE key_name = 'receipt'"
                                " ORDER BY id")
    by_check = {check_of(key): key for key in retired_keys(settings, "receipt").values()}
    retired = tuple(RetiredKey(by_check[bytes(r["retired_check"])], int(r["ledger_seq"]))
                    for r in rows if bytes(r["retired_check"]) in by_check)
    return ReceiptKeys(keys.receipt, retired)


async def retired_receipt_issued(pool: asyncpg.Pool, claims: ReceiptClaims) -> bool:
    """Whether a receipt under a retired receipt key (already held to the key's retirement)
    may be one the ledger issued: every receipt names the decision entry of its VM it was
    issued with, so there must be one at exactly its seq, and that seq must be at or before
    the position of the VM it names (a stale one is then the ledger's to flag) unless the
    VM never presented a receipt. Anything else the retired key's holder made up
    (SECURITY.md, "Rotating a leaked key"): a seq before the position that was never this
    VM's would be a rollback, under ``receipt_reaction = refuse`` a VM locked out."""
    issued = False
    async with acquire(pool) as conn:
        row = await conn.fetchrow("SELECT last_receipt_seq, receipts_seen FROM vms WHERE vm_id = $1", claims.vm_id)
        if row is not None and not (row["receipts_seen"] and claims.seq > int(row["last_receipt_seq"])):
            issued = bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ledger WHERE seq = $1 AND vm_id = $2"
                                              " AND kind IN ('otp', 'nonce'))", claims.seq, claims.vm_id))
    return issued
