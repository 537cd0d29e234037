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
from .private_files import check_private_dir, check_private_file
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


def load_keys(settings: Settings) -> Keys:
    """Reads or creates every key; raises ``ConfigError`` with one clear line. Every key
    that exists is read (and checked) before any missing one is created, so a refused
    start leaves no new key behind."""
    data_dir = settings.data_dir
    # A new data dir is made for whoever will run the embedded server; an existing one is
    # only checked for its owner here (the embedded server makes its own, stricter check,
    # so commands that read keys alone, like `ledger public-key`, work on any of root's).
    claim_data_dir(data_dir, embedded=settings.embedded and not data_dir.exists())
    keys_dir = data_dir / "keys"
    paths = {
        "pepper": settings.pepper_file or keys_dir / "pepper.key",
        "secret": settings.secret_key_file or keys_dir / "secret.key",
        "receipt": settings.receipt_key_file or keys_dir / "receipt.key",
        "signing": settings.signing_key_file or keys_dir / "signing.key",
    }
    named = {settings.pepper_file, settings.secret_key_file, settings.receipt_key_file, settings.signing_key_file}
    found = {name: _read_key(path, data_dir) for name, path in paths.items() if path in named or path.exists()}
    made = {name: _create_key(path, data_dir) for name, path in paths.items() if name not in found}
    return Keys(**found, **made)
