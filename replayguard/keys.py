"""Key material: generated once under the data dir (mode 0600) or read from named files.

Four independent keys, so that leaking one does not weaken the others:
``pepper`` keys the credential digests, ``secret`` encrypts token secrets (AES-256-GCM),
``receipt`` MACs the receipts given to guests, ``signing`` (Ed25519) signs checkpoints.
A key file that breaks the key-file rule (``replayguard.private_files``: others can read
it, someone else owns it or can swap it) stops start-up: a pepper anyone on the host can
read turns every ledger digest back into a guessable OTP.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .durable import adopt, atomic_write, inherited_owner
from .errors import ConfigError
from .pg.embedded import claim_data_dir
from .private_files import check_private_file
from .settings import Settings

KEY_BYTES = 32


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
    """Creates the keys dir (0700, for the data dir's owner) unless it exists; a process
    that loses the race to create it uses the winner's."""
    try:
        keys_dir.mkdir(mode=0o700)
    except FileExistsError:
        return
    adopt(keys_dir, data_dir)


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


def _load_one(named: Path | None, default: Path, data_dir: Path) -> bytes:
    if named is not None:
        return _read_key(named, data_dir)
    if default.exists():
        return _read_key(default, data_dir)
    return _create_key(default, data_dir)


def load_keys(settings: Settings) -> Keys:
    """Reads or creates every key; raises ``ConfigError`` with one clear line."""
    data_dir = settings.data_dir
    # A new data dir is made for whoever will run the embedded server; an existing one is
    # only checked for its owner here (the embedded server makes its own, stricter check,
    # so commands that read keys alone, like `ledger public-key`, work on any of root's).
    claim_data_dir(data_dir, embedded=settings.embedded and not data_dir.exists())
    keys_dir = data_dir / "keys"
    return Keys(
        pepper=_load_one(settings.pepper_file, keys_dir / "pepper.key", data_dir),
        secret=_load_one(settings.secret_key_file, keys_dir / "secret.key", data_dir),
        receipt=_load_one(settings.receipt_key_file, keys_dir / "receipt.key", data_dir),
        signing=_load_one(settings.signing_key_file, keys_dir / "signing.key", data_dir),
    )
