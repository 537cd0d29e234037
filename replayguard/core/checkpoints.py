"""Signed ledger checkpoints: "entry ``seq`` of the ledger has hash ``hash``", Ed25519.

A checkpoint that has left the host (a sink, an analyst's file) pins the chain: rewriting
history, even with every hash recomputed, no longer matches it, and nobody without the
signing key can make a new one. The signed message is fixed here, once, so that a third
party can check a checkpoint with nothing but the public key (``verify``, or OpenSSL on
``message``'s bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .timefmt import rfc3339_us

DOMAIN = b"replayguard-checkpoint-v1"
ALGORITHM = "Ed25519"
MAX_BIGINT = 2**63 - 1  # seq and ts_us go in bigint columns


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: bytes
    ts_us: int
    key_id: str
    signature: bytes


def message(seq: int, entry_hash: bytes, ts_us: int) -> bytes:
    """The exact bytes signed: a domain tag, then seq, hash (hex) and time, one per line."""
    return DOMAIN + f"\n{seq}\n{entry_hash.hex()}\n{ts_us}\n".encode("ascii")


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint naming the key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, seq: int, entry_hash: bytes, ts_us: int) -> Checkpoint:
    signature = key.sign(message(seq, entry_hash, ts_us))
    return Checkpoint(seq, entry_hash, ts_us, key_id(key.public_key()), signature)


def verify(public: Ed25519PublicKey, checkpoint: Checkpoint) -> bool:
    """True when ``checkpoint`` was signed by ``public``'s private key, unaltered."""
    try:
        public.verify(checkpoint.signature, message(checkpoint.seq, checkpoint.hash, checkpoint.ts_us))
    except InvalidSignature:
        return False
    return key_id(public) == checkpoint.key_id


def to_json(checkpoint: Checkpoint) -> dict[str, object]:
    """The one JSON form: API listing, CLI output, sink record and offline input alike."""
    return {
        "type": "checkpoint", "id": f"checkpoint-{checkpoint.seq}", "seq": checkpoint.seq,
        "hash": checkpoint.hash.hex(), "ts_us": checkpoint.ts_us, "created_at": rfc3339_us(checkpoint.ts_us),
        "algorithm": ALGORITHM, "key_id": checkpoint.key_id, "signature": checkpoint.signature.hex(),
        "summary": f"ledger entry {checkpoint.seq} has hash {checkpoint.hash.hex()}",
    }


def _int(data: Mapping[str, object], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BIGINT:
        raise ValueError(f"checkpoint field {name!r} must be an integer from 0 to {MAX_BIGINT}")
    return value


def _hex(data: Mapping[str, object], name: str, size: int) -> bytes:
    value = data.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ValueError(f"checkpoint field {name!r} must be {size} bytes of hex")
    return raw


def from_row(row: Mapping[str, Any]) -> Checkpoint:
    """A row of the ``checkpoints`` table (``seq``, ``hash``, ``ts_us``, ``key_id``,
    ``signature``; an asyncpg record or any mapping)."""
    return Checkpoint(row["seq"], bytes(row["hash"]), row["ts_us"], row["key_id"], bytes(row["signature"]))


def from_json(data: object) -> Checkpoint:
    """Parses ``to_json``'s form; raises ValueError naming the field at fault."""
    if not isinstance(data, Mapping):
        raise ValueError("a checkpoint must be a JSON object")
    kid = data.get("key_id")
    if not isinstance(kid, str) or not kid:
        raise ValueError("checkpoint field 'key_id' must be a string")
    return Checkpoint(_int(data, "seq"), _hex(data, "hash", 32), _int(data, "ts_us"), kid,
                      _hex(data, "signature", 64))


def public_key_pem(public: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM: what OpenSSL and every crypto library read."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Reads a PEM public key; raises ValueError unless it is an Ed25519 key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except UnsupportedAlgorithm:  # a key of a type the library does not know: not a ValueError
        raise ValueError("the public key is not an Ed25519 key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not an Ed25519 key")
    return key
