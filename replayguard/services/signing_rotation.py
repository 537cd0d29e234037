"""Rotating the checkpoint signing key (``replayguard keys rotate --signing``, migration 042).

The steps and their crash safety are those of ``key_rotation.py``, under the rotation lock
of every key's directory: the new key is written as ``signing.key.next``; one transaction
locks the key binding and the ledger's head, refuses while another replayguard process is
connected, has the old key sign a handover (``core/handover.py``: the new public key and
the ledger's head), appends it as a ``key_rotation`` ledger entry, moves
``key_binding.signing_public`` to the new key and records the rotation in
``key_rotations``; then the old key becomes ``retired/signing-<id>.key`` and the new one
takes its place. Killed before the commit, the next process removes the ``.next`` file;
after it, that process finishes the renames (``settle``).

Every process reads the handovers from the ledger entries at start (``load_signers``):
they name the deployment (its first key's id) and which key signs which span of the
ledger, for the continuity guard, the witnesses and verification.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..core import checkpoints as cps
from ..core.handover import (
    Handover,
    Signers,
    chain_of,
    handover_from_json,
    handover_json,
    handover_valid,
    public_raw,
    raw_public,
    sign_handover,
)
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
from .key_binding import check_of
from .key_rotation import Rotation, refuse_while_others_connected
from .recovery import operator

NAMES = (*ROTATABLE, "signing")  # every key directory is locked: a signing rotation excludes the others
Progress = Callable[[str, dict[str, Any]], None]
# Migration 044's index of rare entries: no scan of the ledger.
_HANDOVERS = ("SELECT (payload->'handover')::text AS h FROM ledger WHERE kind = 'key_rotation'"
              " AND payload ? 'handover' ORDER BY seq")


async def read_handovers(conn: asyncpg.Connection) -> list[Handover]:
    """The handovers of the ``key_rotation`` entries whose signature holds, in ledger order
    (the entries, under the hash chain: ``key_rotations`` is a record, not a source)."""
    found = []
    for record in await conn.fetch(_HANDOVERS):
        try:
            handover = handover_from_json(orjson.loads(record["h"] or "null"))
        except (ValueError, orjson.JSONDecodeError):
            continue
        if handover_valid(handover):
            found.append(handover)
    return found


async def load_signers(pool: asyncpg.Pool, keys: Keys) -> Signers:
    """The chain of signing keys the ledger's handovers make, ending at this process's
    key; raises ``ConfigError`` when they do not end there."""
    async with acquire(pool) as conn:
        handovers = await read_handovers(conn)
    try:
        return chain_of(handovers, keys.signing_key().public_key())
    except ValueError as exc:
        raise ConfigError(f"the ledger's signing key handovers do not lead to this data dir's signing key ({exc}):"
                          " start with the signing key the last `keys rotate --signing` put in place") from None


async def rotate(pool: asyncpg.Pool, settings: Settings, keys: Keys, now_us: int,
                 progress: Progress | None = None) -> Rotation:
    """Rotates the signing key (see the module); raises ``ConfigError``, having changed
    nothing, when another replayguard process is connected or the ledger's handovers do
    not end at the current key."""
    report = progress or (lambda step, facts: None)
    lock = rotation_lock(settings, NAMES)
    try:
        await settle_locked(pool, settings)
        check_own_file(settings, "signing")  # the renames after the commit must neither fail nor lose a key
        check_retired_place(settings, "signing", keys.signing)
        new = write_pending(settings, "signing")
        report("new_keys_written", {"keys": ["signing"]})
        try:
            head = await _hand_over(pool, keys, keys.signing, new, now_us, report)
        except BaseException:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await settle_locked(pool, settings)
            raise
        retired = str(promote_pending(settings, "signing", keys.signing))
        report("key_files_replaced", {"retired_files": {"signing": retired}})
    finally:
        release(lock)
    return Rotation(("signing",), 0, head, {"signing": retired}, {"signing": key_file_id(new)}, None)


async def adopt_restored(pool: asyncpg.Pool, settings: Settings, keys: Keys, now_us: int,
                         progress: Progress | None = None) -> Rotation | None:
    """A database restored from before a signing key rotation is bound to a signing key
    this data dir retired: the retired key hands over to the current one at the restored
    ledger's head, as a rotation does (no key file changes). None when the database is
    bound to the current signing key."""
    async with acquire(pool) as conn:
        bound = await conn.fetchval("SELECT signing_public FROM key_binding")
    if bound is None or hmac.compare_digest(bytes(bound), public_raw(keys.signing)):
        return None
    found = [key for key in retired_keys(settings, "signing").values()
             if hmac.compare_digest(bytes(bound), public_raw(key))]
    if not found:
        raise ConfigError("the database is bound to a signing key that is neither this data dir's current one nor"
                          " one it retired (keys/retired/): nothing was changed")
    lock = rotation_lock(settings, NAMES)
    try:
        head = await _hand_over(pool, keys, found[0], keys.signing, now_us, progress or (lambda step, facts: None),
                                restored=True)
    finally:
        release(lock)
    return Rotation(("signing",), 0, head, {}, {"signing": key_file_id(keys.signing)}, None)


async def _hand_over(pool: asyncpg.Pool, keys: Keys, old: bytes, new: bytes, now_us: int, report: Progress,
                     *, restored: bool = False) -> int:
    """The transaction: from the signing key ``old`` to ``new``. Returns the ledger's head
    it handed over at."""
    old_key = Ed25519PrivateKey.from_private_bytes(old)
    new_public = Ed25519PrivateKey.from_private_bytes(new).public_key()
    async with acquire(pool) as conn, conn.transaction():
        bound = await conn.fetchrow("SELECT * FROM key_binding FOR UPDATE")
        if (bound is None or not _same(bound["pepper_check"], check_of(keys.pepper))
                or not _same(bound["signing_public"], raw_public(old_key.public_key()))):
            raise ConfigError("the database is not bound to this data dir's keys: nothing was rotated")
        await refuse_while_others_connected(conn)
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head FOR UPDATE")
        try:
            signers = chain_of(await read_handovers(conn), old_key.public_key())
        except ValueError as exc:
            raise ConfigError(f"the ledger's signing key handovers do not end at the key being retired ({exc}):"
                              " nothing was rotated") from None
        report("database_locked", {"ledger_seq": head["seq"]})
        handover = sign_handover(old_key, int(head["seq"]), bytes(head["hash"]), now_us, new_public)
        await conn.execute("UPDATE key_binding SET signing_public = $1", handover.new_public)
        await conn.execute("INSERT INTO key_rotations (key_name, retired_check, current_check, rotated_us,"
                           " ledger_seq) VALUES ('signing', $1, $2, $3, $4)",
                           handover.old_public, handover.new_public, now_us, head["seq"])
        entry = {"keys": ["signing"], "who": operator(), "restored": restored, "tokens_reencrypted": 0,
                 "deployment_id": signers.deployment_id,
                 "retired_ids": {"signing": key_file_id(old)}, "new_ids": {"signing": key_file_id(new)},
                 "handover": handover_json(handover)}
        await conn.fetchval("SELECT rg_append($1, 'key_rotation', NULL, NULL, NULL, NULL, NULL, $2::jsonb)",
                            now_us, entry)
        report("committing", {"ledger_seq": head["seq"], "new_key_id": cps.key_id(new_public)})
    return int(head["seq"])


def _same(bound: Any, mine: bytes) -> bool:
    return bound is not None and hmac.compare_digest(bytes(bound), mine)


async def settle_locked(pool: asyncpg.Pool, settings: Settings) -> list[str]:
    """``keys.settle_files`` for the signing key, against the binding as it is now (the
    caller holds the rotation lock)."""
    async with acquire(pool) as conn:
        bound = await conn.fetchval("SELECT signing_public FROM key_binding")
    return settle_files(settings, lambda name, key: _same(bound, public_raw(key)), ("signing",))


async def settle(pool: asyncpg.Pool, settings: Settings) -> list[str]:
    """What a process does before it reads the binding: finishes or undoes a signing key
    rotation killed mid-way (as ``key_rotation.settle`` does for the others)."""
    if not pending_path(key_paths(settings)["signing"]).exists():
        return []
    try:
        lock = rotation_lock(settings, NAMES)
    except ConfigError:
        return []  # a rotation is running: its own renames follow its commit
    try:
        return await settle_locked(pool, settings)
    finally:
        release(lock)
