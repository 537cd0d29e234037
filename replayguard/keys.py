"""Key material: generated once under the data dir (mode 0600) or read from named files.

Four independent keys, so that leaking one does not weaken the others:
``pepper`` keys the credential digests, ``secret`` encrypts token secrets (AES-256-GCM),
``receipt`` MACs the receipts given to guests, ``signing`` (Ed25519) signs checkpoints.
A key file that breaks the key-file rule (``replayguard.private_files``: others can read
it, someone else owns it or can swap it) stops start-up: a pepper anyone on the host can
read turns every ledger digest back into a guessable OTP.

The secret key and the receipt key can be rotated (``replayguard keys rotate``,
``services/key_rotation.py``), and so can the signing key (``services/signing_rotation.py``:
a handover signed by the old key, then the same files' steps). A rotation writes the new key beside the current one
(``secret.key.next``), moves the database to it in one transaction, then retires the old
key to ``retired/<name>-<id>.key`` beside it (``keys/retired/`` in the data dir, or the
named key file's directory) and renames the new one into place, all under the rotation
lock of the keys' directories. A rotation killed between its commit and the renames
leaves a ``.next`` file the database is bound to: the next process to open the database
finishes the renames (``settle_files``); one killed before its commit leaves a ``.next``
file no database is bound to, which that process removes. Retired receipt keys are read
at start (``retired_keys``, ``services/key_rotation.receipt_keys``) to check receipts
issued before the rotation (``core/receipts.py``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .durable import adopt, atomic_write, fsync_dir, inherited_owner, lock_file
from .errors import ConfigError
from .pg.embedded import claim_data_dir
from .private_files import check_private_dir, check_private_file
from .settings import Settings

KEY_BYTES = 32
ROTATABLE = ("secret", "receipt")


@functools.lru_cache(maxsize=4)
def _aead(secret: bytes) -> AESGCM:
    """One AES-GCM context per key (building one per token read showed in profiles)."""
    return AESGCM(secret)


@dataclass(frozen=True, repr=False)
class Keys:
    pepper: bytes
    secret: bytes
    receipt: bytes
    signing: bytes

    def __repr__(self) -> str:
        return "Keys(<redacted>)"

    def aead(self) -> AESGCM:
        return _aead(self.secret)

    def signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.signing)


def _read_key(path: Path, data_dir: Path) -> bytes:
    check_private_file(path, "key file", data_dir=data_dir)
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"key file {path} does not hold a hex key") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"key file {path} must hold {KEY_BYTES} bytes, found {len(raw)}")
    return raw


def _make_keys_dir(keys_dir: Path, data_dir: Path) -> None:
    """Creates the keys dir (0700, for the data dir's owner) unless it exists (a process
    that loses the race to create it uses the winner's); then holds it, made or found, to
    the directory part of the key-file rule, so no key is written where reading it would
    be refused (a keys dir someone else owns, a data dir others can write)."""
    check_private_dir(keys_dir.parent, "data dir", data_dir=data_dir)
    try:
        keys_dir.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        adopt(keys_dir, data_dir)
    check_private_dir(keys_dir, "keys dir", data_dir=data_dir)


def _create_key(path: Path, data_dir: Path) -> bytes:
    """Creates a key file atomically: a reader never sees it half written, and of two
    processes creating it at once, one wins and the other reads the winner's key."""
    raw = secrets.token_bytes(KEY_BYTES)
    try:
        _make_keys_dir(path.parent, data_dir)
        atomic_write(path, (raw.hex() + "\n").encode(), owner=inherited_owner(data_dir), exclusive=True)
    except FileExistsError:
        return _read_key(path, data_dir)
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    return raw


def keys_location(settings: Settings) -> str:
    """Where the keys come from, for a message: the key files named, and the keys dir if
    any key is read from it."""
    files = (settings.pepper_file, settings.secret_key_file, settings.receipt_key_file, settings.signing_key_file)
    named = [str(path) for path in files if path is not None]
    return " and ".join(named + ([str(settings.data_dir / "keys")] if None in files else []))


def key_paths(settings: Settings) -> dict[str, Path]:
    """Where each key is read from: its named file, or the keys dir."""
    keys_dir = settings.data_dir / "keys"
    return {
        "pepper": settings.pepper_file or keys_dir / "pepper.key",
        "secret": settings.secret_key_file or keys_dir / "secret.key",
        "receipt": settings.receipt_key_file or keys_dir / "receipt.key",
        "signing": settings.signing_key_file or keys_dir / "signing.key",
    }


def load_keys(settings: Settings) -> Keys:
    """Reads or creates every key; raises ``ConfigError`` with one clear line. Every key
    that exists is read (and checked) before any missing one is created, so a refused
    start leaves no new key behind."""
    data_dir = settings.data_dir
    # A new data dir is made for whoever will run the embedded server; an existing one is
    # only checked for its owner here (the embedded server makes its own, stricter check,
    # so commands that read keys alone, like `ledger public-key`, work on any of root's).
    claim_data_dir(data_dir, embedded=settings.embedded and not data_dir.exists())
    paths = key_paths(settings)
    named = {settings.pepper_file, settings.secret_key_file, settings.receipt_key_file, settings.signing_key_file}
    found = {name: _read_key(path, data_dir) for name, path in paths.items() if path in named or path.exists()}
    made = {name: _create_key(path, data_dir) for name, path in paths.items() if name not in found}
    return Keys(**found, **made)


# --- rotation -------------------------------------------------------------------------

def key_file_id(key: bytes) -> str:
    """A key's name in a retired key file's name and in messages: 16 hex digits of a keyed
    hash, which say nothing of the key."""
    return hmac.new(key, b"replayguard key file id v1", hashlib.sha256).hexdigest()[:16]


def pending_path(path: Path) -> Path:
    """Where a rotation writes the new key before the database moves to it."""
    return path.with_name(path.name + ".next")


def retired_dir(settings: Settings, name: str) -> Path:
    """Where the keys of ``name`` that rotations retired are kept: beside the key's file."""
    return key_paths(settings)[name].parent / "retired"


def retired_path(settings: Settings, name: str, key: bytes) -> Path:
    return retired_dir(settings, name) / f"{name}-{key_file_id(key)}.key"


def _make_retired_dir(directory: Path, data_dir: Path) -> None:
    """Makes ``retired/`` (0700) unless it exists, its entry durable in the keys' directory
    (the new key's rename there must not outlive it in a power loss); then holds it to the
    key-file rule."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        adopt(directory, data_dir)
    fsync_dir(directory.parent)
    check_private_dir(directory, "retired keys dir", data_dir=data_dir)


def keys_on_disk(settings: Settings, name: str) -> list[bytes]:
    """The keys of ``name`` its files hold as they are read now, for a message only: the
    key file's and a ``.next`` file's (a rotation renames the new key into place after its
    commit). A file that is absent or breaks the key-file rule gives nothing."""
    path = key_paths(settings)[name]
    found = []
    for candidate in (path, pending_path(path)):
        with contextlib.suppress(ConfigError):
            if candidate.exists():
                found.append(_read_key(candidate, settings.data_dir))
    return found


def retired_keys(settings: Settings, name: str) -> dict[Path, bytes]:
    """The keys of ``name`` that rotations retired (``retired_dir``), by file."""
    directory = retired_dir(settings, name)
    if not directory.is_dir():
        return {}
    return {path: _read_key(path, settings.data_dir) for path in sorted(directory.glob(f"{name}-*.key"))}


def rotation_lock(settings: Settings, names: Iterable[str] = ROTATABLE) -> list[int]:
    """The rotation lock of each directory holding a rotatable key (``names``: the signing
    key's rotation adds ``signing``) (descriptors; closing them releases): held by a
    rotation from writing its new keys to renaming them into place, and while
    ``settle_files`` runs. Raises ``ConfigError`` when one is held."""
    directories = sorted({key_paths(settings)[name].parent for name in names})
    held: list[int] = []
    try:
        for directory in directories:
            if directory == settings.data_dir / "keys":
                _make_keys_dir(directory, settings.data_dir)
            else:
                check_private_dir(directory, "key file directory", data_dir=settings.data_dir)
            try:
                held.append(lock_file(directory / ".rotation.lock", owner=inherited_owner(directory), wait=False))
            except BlockingIOError:
                raise ConfigError(f"a key rotation is running on {directory} (its lock .rotation.lock is held)"
                                  ) from None
    except BaseException:
        release(held)
        raise
    return held


def release(held: list[int]) -> None:
    for fd in held:
        os.close(fd)


def check_own_file(settings: Settings, name: str) -> None:
    """Before a rotation changes anything: ``name``'s key file is no other key's (the same
    path, or a link to the same file), since the rotation replaces that file. Rotating both
    keys of one file would leave it holding the new receipt key, and the new secret key,
    under which every token secret was re-encrypted, nowhere. Raises ``ConfigError``."""
    paths = key_paths(settings)
    for other, path in paths.items():
        if other != name and _same_file(paths[name], path):
            raise ConfigError(f"the {name} key's file {paths[name]} is also the {other} key's ({path}): rotating"
                              f" the {name} key would replace both; give each key a file of its own; nothing was"
                              " rotated")


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:  # one of them does not exist
        return one.resolve() == other.resolve()


def check_retired_place(settings: Settings, name: str, old: bytes) -> None:
    """Before a rotation changes anything: ``retired/`` beside the key can take ``old``
    (absent, or private), every retired file there passes the key-file rule (a start
    reads them all), and a file already under ``old``'s name holds ``old`` (one holding
    another key would be kept in its place, and ``old`` lost). Raises ``ConfigError``."""
    path = retired_path(settings, name, old)
    if not path.parent.exists() and not path.parent.is_symlink():
        return  # made at step 3 in the keys' directory, which is held to the same rule
    try:
        check_private_dir(path.parent, "retired keys dir", data_dir=settings.data_dir)
        there = retired_keys(settings, name)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; nothing was rotated") from None
    if path in there and not hmac.compare_digest(there[path], old):
        raise ConfigError(f"the retired key file {path} holds another key than the {name} key it is named after:"
                          " move it away; nothing was rotated")


def write_pending(settings: Settings, name: str) -> bytes:
    """A new random key for ``name``, on disk as its ``.next`` file (replacing one a dead
    rotation left), before the database moves to it."""
    raw = secrets.token_bytes(KEY_BYTES)
    path = pending_path(key_paths(settings)[name])
    atomic_write(path, (raw.hex() + "\n").encode(), owner=inherited_owner(settings.data_dir))
    return raw


def promote_pending(settings: Settings, name: str, old: bytes) -> Path:
    """After the database moved to the ``.next`` key: keeps the old key as a retired file
    (never replacing one), then renames the new key into place. Each step may have been
    done already by a process that died after it. Returns the retired file."""
    path = key_paths(settings)[name]
    retired = retired_path(settings, name, old)
    _make_retired_dir(retired.parent, settings.data_dir)
    with contextlib.suppress(FileExistsError):
        atomic_write(retired, (old.hex() + "\n").encode(), owner=inherited_owner(settings.data_dir), exclusive=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(pending_path(path), path)
    fsync_dir(path.parent)
    return retired


def settle_files(settings: Settings, bound: Callable[[str, bytes], bool],
                 names: Iterable[str] = ROTATABLE) -> list[str]:
    """For each ``.next`` key file of ``names``: promotes it if the database is bound to it
    (``bound(name, key)``), removes it if the database is bound to the current key, and
    leaves it otherwise (the key binding then refuses the start). The caller holds the
    rotation lock."""
    promoted = []
    for name in names:
        path = key_paths(settings)[name]
        pending = pending_path(path)
        if not pending.exists():
            continue
        current, new = _read_key(path, settings.data_dir), _read_key(pending, settings.data_dir)
        if bound(name, new):
            promote_pending(settings, name, current)
            promoted.append(name)
        elif bound(name, current):
            pending.unlink()
            fsync_dir(path.parent)
    return promoted
