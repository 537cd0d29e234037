"""State-continuity receipts: what a guest stores to prove its disk did not go back.

A receipt names a VM, the ledger position the host issued it at, and the VM's epoch,
under an HMAC the guest cannot forge. The guest sends back the last one it stored; the
ledger compares it with the latest it issued to that VM (a stale one means the guest was
rolled back, another VM's means a clone). Format: ``rg2.<key id>.<b64url payload>.<b64url
mac>``, the key id naming the receipt key that MACed it (``key_id``), so a receipt issued
before a rotation of the receipt key (``replayguard keys rotate``) is checked under the
retired key it names, and no other. ``rg1.<payload>.<mac>`` receipts, issued before
receipts carried a key id, are checked under the oldest receipt key the database knows.

A receipt under a retired key is taken only as far as that key could have issued it: one
naming a ledger position after the key was retired is a forgery (``ReceiptKeys``); what
else is asked of it is the decision service's (``services/decide.py``). Claims no ledger
holds (a seq outside bigint or below 0, an epoch outside integer or below 0, a payload
nested too deep to parse) are invalid whatever key MACed them: the holder of a leaked
retired key makes them too.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hmac
import json
from dataclasses import dataclass
from typing import NamedTuple

from .mac import keyed

PREFIX = "rg2"
LEGACY_PREFIX = "rg1"
# Every receipt issued fits: a VM id of 256 characters of four UTF-8 bytes each, the
# largest seq and epoch, is 1,469 characters (tests/unit/test_receipts.py). Guests' helpers
# and the request schema hold receipts to the same bound.
MAX_LENGTH = 2048
# The ranges of a ledger seq (bigint) and a VM's epoch (integer): claims outside them were
# never issued, and must not reach the database as parameters it cannot hold.
MAX_SEQ = 2**63 - 1
MAX_EPOCH = 2**31 - 1
_DOMAIN = b"replayguard-receipt-v1\x00"
_DOMAIN_V2 = b"replayguard-receipt-v2\x00"
_KEY_ID_LABEL = b"replayguard-receipt-key-id-v1"


class ReceiptStatus(str, enum.Enum):
    ABSENT = "absent"
    MISSING = "missing"  # none sent by a caller that keeps receipts (``receipt_kept``)
    VALID = "valid"
    INVALID = "invalid"


class ReceiptClaims(NamedTuple):
    """What a receipt says (a NamedTuple: one is built for every decision)."""

    vm_id: str
    seq: int
    epoch: int


class ReceiptCheck(NamedTuple):
    status: ReceiptStatus
    claims: ReceiptClaims | None = None
    # Set when a retired receipt key MACed it: the last ledger seq that key issued at.
    retired_until: int | None = None


@dataclass(frozen=True, slots=True, repr=False)
class RetiredKey:
    """A receipt key a rotation retired, and the ledger's head when it did: it issued no
    receipt after that seq."""

    key: bytes
    issued_until: int


@dataclass(frozen=True, slots=True, repr=False)
class ReceiptKeys:
    """The receipt key new receipts are issued under, and the retired ones still checked,
    oldest first."""

    current: bytes
    retired: tuple[RetiredKey, ...] = ()

    def __repr__(self) -> str:
        return "ReceiptKeys(<redacted>)"

    def by_id(self, kid: str) -> tuple[bytes, int | None] | None:
        """The key with this id and, for a retired one, the last seq it issued at."""
        if kid == key_id(self.current):  # a key id is public
            return self.current, None
        for old in self.retired:
            if kid == key_id(old.key):
                return old.key, old.issued_until
        return None

    def legacy(self) -> tuple[bytes, int | None]:
        """The key of ``rg1`` receipts (which name none): the oldest the database knows."""
        if self.retired:
            return self.retired[0].key, self.retired[0].issued_until
        return self.current, None


# The checks that carry no claims, built once: every request without a receipt gets one.
_ABSENT = ReceiptCheck(ReceiptStatus.ABSENT)
_MISSING = ReceiptCheck(ReceiptStatus.MISSING)
_INVALID = ReceiptCheck(ReceiptStatus.INVALID)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return keyed(key).digest(_DOMAIN + payload)


def _mac_v2(key: bytes, kid: str, payload: bytes) -> bytes:
    return keyed(key).digest(_DOMAIN_V2 + kid.encode() + b"\x00" + payload)


@functools.lru_cache(maxsize=16)
def key_id(key: bytes) -> str:
    """A receipt key's public name: 8 characters of a keyed hash, which says nothing of the key."""
    return _b64(keyed(key).digest(_KEY_ID_LABEL)[:6])


_json_string = json.encoder.encode_basestring  # escapes only what JSON requires


def _payload(claims: ReceiptClaims) -> bytes:
    """``[vm_id,seq,epoch]`` as compact UTF-8 JSON: what ``json.dumps(..., separators=(",",
    ":"), ensure_ascii=False)`` writes, formatted directly (the encoder object cost more
    than the MAC). Not ASCII-escaped: a character outside the BMP would take 12 bytes
    (two ``\\uXXXX``) instead of 4, and the longest VM id's receipt would outgrow
    ``MAX_LENGTH``. Receipts of either form verify: the MAC covers the bytes presented."""
    return f"[{_json_string(claims.vm_id)},{int(claims.seq)},{int(claims.epoch)}]".encode()


def issue(key: bytes, claims: ReceiptClaims) -> str:
    payload = _payload(claims)
    kid = key_id(key)
    return f"{PREFIX}.{kid}.{_b64(payload)}.{_b64(_mac_v2(key, kid, payload))}"


def check(keys: bytes | ReceiptKeys, receipt: str | None, kept: bool = False) -> ReceiptCheck:
    """Verifies a presented receipt's MAC and shape; never raises on hostile input.

    ``keys``: the receipt keys (a bare key: the only one). ``kept``: the caller says it
    keeps receipts, so sending none means it has lost the one it stored (the ledger flags
    that when the VM was issued receipts before). A receipt under a retired key that
    names a position after the key's retirement is invalid: that key never issued it."""
    if receipt is None:
        return _MISSING if kept else _ABSENT
    ring = keys if isinstance(keys, ReceiptKeys) else ReceiptKeys(keys)
    found = _decode(ring, receipt)
    if found is None:
        return _INVALID
    claims, until = found
    if until is not None and claims.seq > until:
        return _INVALID
    return ReceiptCheck(ReceiptStatus.VALID, claims, until)


def _verified_payload(ring: ReceiptKeys, parts: list[str]) -> tuple[bytes, int | None] | None:
    """The payload of a receipt's parts whose MAC verifies under the key they name (``rg2``)
    or the legacy key (``rg1``), and the key's retirement seq; None otherwise."""
    if len(parts) == 4 and parts[0] == PREFIX:
        kid, payload_text, mac_text = parts[1:]
        named = ring.by_id(kid)
        if named is None:
            return None
        key, until = named
        payload, mac = _unb64(payload_text), _unb64(mac_text)
        return (payload, until) if hmac.compare_digest(mac, _mac_v2(key, kid, payload)) else None
    if len(parts) == 3 and parts[0] == LEGACY_PREFIX:
        key, until = ring.legacy()
        payload, mac = _unb64(parts[1]), _unb64(parts[2])
        return (payload, until) if hmac.compare_digest(mac, _mac(key, payload)) else None
    return None


def _decode(ring: ReceiptKeys, receipt: str) -> tuple[ReceiptClaims, int | None] | None:
    if len(receipt) > MAX_LENGTH:
        return None
    try:
        verified = _verified_payload(ring, receipt.split("."))
    except (binascii.Error, ValueError):
        return None
    if verified is None:
        return None
    payload, until = verified
    try:  # a payload nested past the recursion limit raises RecursionError
        vm_id, seq, epoch = json.loads(payload)
    except (ValueError, TypeError, RecursionError):
        return None
    if not (isinstance(vm_id, str) and type(seq) is int and type(epoch) is int
            and 0 <= seq <= MAX_SEQ and 0 <= epoch <= MAX_EPOCH):
        return None
    return ReceiptClaims(vm_id, seq, epoch), until
