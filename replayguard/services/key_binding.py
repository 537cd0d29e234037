"""The keys a database was set up with, held to at every start (migrations 032 and 034).

The first process that opens a database with keys records a keyed check of the pepper, of
the secret key and of the receipt key (an HMAC of a fixed label: it says nothing of the
key) and the checkpoint signing key's public key; every later process must give the same.
Another pepper would mean a ledger whose digests no longer match anything presented (every
code and nonce already used accepted again) and another secret key token secrets that no
longer decrypt; another signing key cannot check the checkpoints the witnesses hold (a
database restored behind them would serve what it forgot), and another receipt key takes
every guest's receipt for a forgery. Such a start is refused with one line that names
where the keys came from, and, when a rotation explains the difference (``keys rotate``,
``services/key_rotation.py``, migration 041), what to do: start again when the key files
already hold the rotated keys (a process that read them while a rotation on the same host
committed), copy the rotated keys when they do not (another host), or move a backup from
before the rotation to them (``--restored``). ``BindingGuard`` holds each new
connection of a running service to the binding it started with, so a process that ran
through a rotation unseen fails closed.

A database bound before migration 034 has no receipt check or public key yet: the next
process with its pepper and secret key records its own, the signing key only if it signed
the database's newest checkpoint (a rebuilt data dir's new key never did).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

import asyncpg
import structlog

from ..core import checkpoints as cps
from ..core import timefmt
from ..core.handover import public_raw
from ..errors import ConfigError, Unavailable
from ..keys import Keys
from ..pg.connections import acquire

log = structlog.get_logger(__name__)

_LABEL = b"replayguard key binding v1"
_SET_UP_WITH = "start with the data dir (or key files) it was set up with"
# Each column of ``key_binding``, the key it binds as a message names it, and what another
# key would do.
_BOUND = (
    ("pepper_check", "pepper", "every code and nonce already used would be accepted again"),
    ("secret_check", "secret key", "every code and nonce already used would be accepted again"),
    ("receipt_check", "receipt key", "every guest's receipt would be taken for a forgery"),
    ("signing_public", "checkpoint signing key",
     "no checkpoint a witness holds could be checked, so a restored database would go unnoticed"),
)
_KEY_OF = {"pepper_check": "pepper", "secret_check": "secret", "receipt_check": "receipt", "signing_public": "signing"}
# The keys of one name the data dir's files hold as read now (``keys.keys_on_disk``).
OnDisk = Callable[[str], list[bytes]]


def check_of(key: bytes) -> bytes:
    """The keyed check the database records of a symmetric key (it says nothing of the key)."""
    return hmac.new(key, _LABEL, hashlib.sha256).digest()


def checks(keys: Keys) -> dict[str, bytes]:
    """What the database records of each key, by column of ``key_binding``."""
    check = check_of
    public = public_raw(keys.signing)
    return {"pepper_check": check(keys.pepper), "secret_check": check(keys.secret),
            "receipt_check": check(keys.receipt), "signing_public": public}


async def hold_to_binding(pool: asyncpg.Pool, keys: Keys, now_us: int, where: str,
                          retired: dict[Path, bytes] | None = None, on_disk: OnDisk | None = None) -> None:
    """Records these keys' checks on a database that has none (or those a database bound
    before migration 034 lacks); raises ``ConfigError``, having recorded nothing, when the
    database was set up with other keys. ``where`` names the keys for the message;
    ``retired``, the retired key files of the data dir, lets it name a rotation, and
    ``on_disk``, the key files read again, tell a process that read its keys just before a
    rotation on this host committed (start again) from one given old keys (copy them)."""
    mine = checks(keys)
    async with acquire(pool) as conn, conn.transaction():
        await conn.execute("INSERT INTO key_binding (pepper_check, secret_check, bound_us) VALUES ($1, $2, $3)"
                           " ON CONFLICT (id) DO NOTHING", mine["pepper_check"], mine["secret_check"], now_us)
        row = await conn.fetchrow("SELECT pepper_check, secret_check, receipt_check, signing_public"
                                  " FROM key_binding FOR UPDATE")
        assert row is not None  # noqa: S101 - the row was just inserted, or was there
        bound = {column: None if row[column] is None else bytes(row[column]) for column, _, _ in _BOUND}
        if None in bound.values():
            bound = await _fill(conn, bound, mine, keys)
        differ = [(name, harm) for column, name, harm in _BOUND if not _same(bound[column], mine[column])]
        if differ:  # raised inside the transaction: a refused start records nothing
            names = " and the ".join(name for name, _ in differ)
            harms = "; ".join(dict.fromkeys(harm for _, harm in differ))
            columns = [column for column, _, _ in _BOUND if not _same(bound[column], mine[column])]
            hint = await _rotation_hint(conn, bound, mine, retired or {}, _rotated_here(bound, columns, on_disk))
            hint = hint or _SET_UP_WITH
            raise ConfigError(
                f"the keys in {where} are not the ones this database was set up with (the {names}"
                f" differ{'s' if len(differ) == 1 else ''}): {hint}; with other keys {harms}")


def _rotated_here(bound: dict[str, bytes | None], columns: list[str], on_disk: OnDisk | None) -> bool:
    """Whether the key files, read again, hold every key the database is bound to where
    this process's keys differ (a rotation on this host committed after it read them)."""
    if on_disk is None:
        return False
    for column in columns:
        found = on_disk(_KEY_OF[column])
        if not any(_same(bound[column], public_raw(key) if column == "signing_public" else check_of(key))
                   for key in found):
            return False
    return True


async def _rotation_hint(conn: asyncpg.Connection, bound: dict[str, bytes | None], mine: dict[str, bytes],
                         retired: dict[Path, bytes], rotated_here: bool) -> str | None:
    """What to do when a rotation explains the difference: this process holds a key a
    rotation retired (started again when the key files already hold the rotated keys, as
    after a rotation on this host that committed while it started; else a host not given
    the rotated keys), or the database is bound to a key this data dir retired (a backup
    from before the rotation)."""
    for path, key in retired.items():
        if any(_same(bound[column], check_of(key)) for column in ("secret_check", "receipt_check")) or (
                path.name.startswith("signing-") and _same(bound["signing_public"], public_raw(key))):
            return (f"the database is bound to the retired key {path}, so it is a backup from before a key rotation:"
                    " run `replayguard keys rotate --restored` to move it to the current keys (docs/operations.md,"
                    " \"Rotating keys\")")
    if await conn.fetchval("SELECT to_regclass('key_rotations') IS NULL"):
        return None
    rows = await conn.fetch("SELECT key_name, retired_check, rotated_us FROM key_rotations ORDER BY id")
    for row in rows:
        column = "signing_public" if row["key_name"] == "signing" else f"{row['key_name']}_check"
        if _same(bytes(row["retired_check"]), mine[column]):
            when = timefmt.rfc3339_us(int(row["rotated_us"]))
            if rotated_here:
                return (f"its {row['key_name']} key was retired by a key rotation at {when} that committed after this"
                        " process read its keys, and the key files already hold the rotated keys: start it again")
            return (f"its {row['key_name']} key was retired by a key rotation at {when}: copy the rotated keys (with"
                    " retired/) from where `replayguard keys rotate` ran (every instance reads its keys at start)")
    return None


class BindingGuard:
    """Run on every new pool connection of a service (``connections.create_pool``): once
    the process has passed ``hold_to_binding`` (``hold``), a connection to a database
    whose secret, receipt or signing key was rotated since is refused (``Unavailable``:
    503), so a process that missed a rotation (``keys rotate`` refuses while it sees one
    connected) never decrypts with the old secret key, issues receipts under the old
    receipt key or signs checkpoints with the old signing key. A connection opened while a
    rotation's transaction is open waits for its outcome."""

    def __init__(self) -> None:
        self._expected: dict[str, bytes] | None = None

    def hold(self, keys: Keys) -> None:
        mine = checks(keys)
        self._expected = {column: mine[column] for column in ("secret_check", "receipt_check", "signing_public")}

    async def __call__(self, conn: asyncpg.Connection) -> None:
        if self._expected is None:
            return
        # FOR SHARE waits for a rotation's transaction (it holds the row FOR UPDATE from before
        # its check of other sessions to its commit) and then reads the binding it committed:
        # read without the lock, a connection opened in between would see the old binding,
        # pass, and outlive the commit with the old keys.
        row = await conn.fetchrow("SELECT secret_check, receipt_check, signing_public FROM key_binding FOR SHARE")
        if row is None or not all(_same(None if row[c] is None else bytes(row[c]), mine)
                                  for c, mine in self._expected.items()):
            log.error("keys_rotated_since_start")
            raise Unavailable("this database's keys were rotated after this process read its keys: restart it with"
                              " the rotated keys")


def _same(bound: bytes | None, mine: bytes) -> bool:
    return bound is not None and hmac.compare_digest(bound, mine)


async def _fill(conn: asyncpg.Connection, bound: dict[str, bytes | None], mine: dict[str, bytes],
                keys: Keys) -> dict[str, bytes | None]:
    """The binding with the receipt check and the public key a database bound before
    migration 034 lacks: this process's, written only if every key then agrees. The public
    key only if it signed the newest checkpoint of the chain (at or below the head; or
    there is none): a
    data dir rebuilt around the pepper and the secret key has a new signing key, which is
    refused, not bound."""
    # A row past the head is no checkpoint of this chain (planted, or of another database).
    signer = await conn.fetchval("SELECT key_id FROM checkpoints WHERE seq <= (SELECT seq FROM ledger_head)"
                                 " ORDER BY seq DESC LIMIT 1")
    signed = signer is None or signer == cps.key_id(keys.signing_key().public_key())
    filled = {**bound, "receipt_check": bound["receipt_check"] or mine["receipt_check"],
              "signing_public": bound["signing_public"] or (mine["signing_public"] if signed else None)}
    if all(_same(filled[column], mine[column]) for column in filled):
        await conn.execute("UPDATE key_binding SET receipt_check = $1, signing_public = $2",
                           filled["receipt_check"], filled["signing_public"])
    return filled
