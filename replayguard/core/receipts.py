"""State-continuity receipts: what a guest stores to prove its disk did not go back.

A receipt names a VM, the ledger position the host issued it at, and the VM's epoch,
under an HMAC the guest cannot forge. The guest sends back the last one it stored; the
ledger compares it with the latest it issued to that VM (a stale one means the guest was
rolled back, another VM's means a clone). Format: ``rg1.<b64url payload>.<b64url mac>``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import json
from dataclasses import dataclass

from .mac import keyed

PREFIX = "rg1"
# Every receipt issued fits: a VM id of 256 characters of four UTF-8 bytes each, the
# largest seq and epoch, is 1,460 characters (tests/unit/test_receipts.py). Guests' helpers
# and the request schema hold receipts to the same bound.
MAX_LENGTH = 2048
_DOMAIN = b"replayguard-receipt-v1\x00"


class ReceiptStatus(str, enum.Enum):
    ABSENT = "absent"
    MISSING = "missing"  # none sent by a caller that keeps receipts (``receipt_kept``)
    VALID = "valid"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ReceiptClaims:
    vm_id: str
    seq: int
    epoch: int


@dataclass(frozen=True, slots=True)
class ReceiptCheck:
    status: ReceiptStatus
    claims: ReceiptClaims | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return keyed(key).digest(_DOMAIN + payload)


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
    return f"{PREFIX}.{_b64(payload)}.{_b64(_mac(key, payload))}"


def check(key: bytes, receipt: str | None, kept: bool = False) -> ReceiptCheck:
    """Verifies a presented receipt's MAC and shape; never raises on hostile input.

    ``kept``: the caller says it keeps receipts, so sending none means it has lost the
    one it stored (the ledger flags that when the VM was issued receipts before)."""
    if receipt is None:
        return ReceiptCheck(ReceiptStatus.MISSING if kept else ReceiptStatus.ABSENT)
    claims = _decode(key, receipt)
    if claims is None:
        return ReceiptCheck(ReceiptStatus.INVALID)
    return ReceiptCheck(ReceiptStatus.VALID, claims)


def _decode(key: bytes, receipt: str) -> ReceiptClaims | None:
    parts = receipt.split(".")
    if len(receipt) > MAX_LENGTH or len(parts) != 3 or parts[0] != PREFIX:
        return None
    try:
        payload, mac = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(key, payload)):
        return None
    try:
        vm_id, seq, epoch = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if not (isinstance(vm_id, str) and type(seq) is int and type(epoch) is int):
        return None
    return ReceiptClaims(vm_id, seq, epoch)
