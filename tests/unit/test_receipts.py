"""Receipts: issued under a MAC, verified without trusting anything the guest sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core.receipts import (
    LEGACY_PREFIX,
    MAX_LENGTH,
    PREFIX,
    ReceiptCheck,
    ReceiptClaims,
    ReceiptKeys,
    ReceiptStatus,
    RetiredKey,
    _b64,
    _mac,
    _mac_v2,
    _payload,
    check,
    issue,
    key_id,
)
from replayguard.core.validation import MAX_ID, nonce_request
from replayguard.http.callouts import _RECEIPT

KEY = bytes(range(32))


def test_round_trip() -> None:
    """A receipt the host issued verifies and gives back its claims."""
    claims = ReceiptClaims("web-01", 1234, 2)
    result = check(KEY, issue(KEY, claims))
    assert result.status is ReceiptStatus.VALID and result.claims == claims


def test_absent() -> None:
    """No receipt is reported as absent, not invalid."""
    assert check(KEY, None).status is ReceiptStatus.ABSENT


def test_none_from_a_caller_that_keeps_receipts_is_missing() -> None:
    """A caller that says it keeps receipts and sends none has lost the one it stored:
    missing, not absent; a receipt it does send is checked as usual."""
    assert check(KEY, None, kept=True).status is ReceiptStatus.MISSING
    assert check(KEY, issue(KEY, ReceiptClaims("web-01", 1, 0)), kept=True).status is ReceiptStatus.VALID


def test_other_key_is_invalid() -> None:
    """A receipt made under another key does not verify."""
    receipt = issue(bytes(32), ReceiptClaims("web-01", 1, 0))
    assert check(KEY, receipt).status is ReceiptStatus.INVALID


def test_tampered_payload_is_invalid() -> None:
    """Changing the claims (e.g. a later seq) breaks the MAC."""
    good = issue(KEY, ReceiptClaims("web-01", 5, 0))
    forged_payload = issue(bytes(32), ReceiptClaims("web-01", 9, 0)).split(".")[2]
    prefix, kid, _, mac = good.split(".")
    assert check(KEY, f"{prefix}.{kid}.{forged_payload}.{mac}").status is ReceiptStatus.INVALID


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_garbage_is_invalid_and_never_raises(text: str) -> None:
    """Any string the host did not issue is invalid (never valid, never absent), and checking it never raises."""
    result = check(KEY, text)
    assert result.status is ReceiptStatus.INVALID and result.claims is None


@settings(max_examples=300, deadline=None)
@given(vm_id=st.text(min_size=1, max_size=64), seq=st.integers(0, 2**63 - 1), epoch=st.integers(0, 2**31 - 1))
def test_the_payload_is_compact_utf8_json(vm_id: str, seq: int, epoch: int) -> None:
    """The payload is byte for byte what the standard library's compact encoder writes
    without ASCII escapes, and receipts whose payload has the escapes verify too."""
    vm_id = vm_id.encode("utf-8", "replace").decode("utf-8")  # identifiers hold no lone surrogate
    claims = ReceiptClaims(vm_id, seq, epoch)
    expected = json.dumps([vm_id, seq, epoch], separators=(",", ":"), ensure_ascii=False).encode()
    assert _payload(claims) == expected
    escaped = json.dumps([vm_id, seq, epoch], separators=(",", ":")).encode()
    receipt = f"{LEGACY_PREFIX}.{_b64(escaped)}.{_b64(_mac(KEY, escaped))}"
    assert check(KEY, receipt) == ReceiptCheck(ReceiptStatus.VALID, claims)


@pytest.mark.parametrize("char", ["a", "é", "\u4e2d", "\U0001F600", '"', "\\"])
def test_the_longest_vm_id_gets_a_receipt_it_can_present(char: str) -> None:
    """A VM id of 256 characters of any width, with the largest seq and epoch, gets a receipt
    within MAX_LENGTH, which the request schema, the decision request's check and the PAM
    helper all take (their bounds are MAX_LENGTH), and which verifies."""
    claims = ReceiptClaims(char * MAX_ID, 2**63 - 1, 2**31 - 1)
    receipt = issue(KEY, claims)
    assert len(receipt) <= MAX_LENGTH
    assert check(KEY, receipt) == ReceiptCheck(ReceiptStatus.VALID, claims)
    body = {"vm_id": claims.vm_id, "scope": "s", "nonce": "n", "receipt": receipt}
    assert nonce_request(body, 300).receipt == receipt
    assert _RECEIPT["maxLength"] == MAX_LENGTH
    helper = (Path(__file__).parents[2] / "deploy" / "pam" / "replayguard-pam-helper").read_text()
    assert f"MAX_RECEIPT = {MAX_LENGTH}\n" in helper


OLD, NEW = bytes(32), bytes(range(1, 33))
ROTATED = ReceiptKeys(NEW, (RetiredKey(OLD, issued_until=100),))


def test_a_receipt_names_its_key_and_is_checked_under_that_key_alone() -> None:
    """A receipt carries its key's id (``rg2.<id>.``); after a rotation, one under the
    retired key verifies under it and says so (``retired_until``), one under the current
    key does not, and a receipt whose key id was swapped for the other key's is invalid."""
    claims = ReceiptClaims("web-01", 7, 0)
    old, new = issue(OLD, claims), issue(NEW, claims)
    assert old.split(".")[:2] == [PREFIX, key_id(OLD)] and new.split(".")[1] == key_id(NEW)
    assert check(ROTATED, old) == ReceiptCheck(ReceiptStatus.VALID, claims, retired_until=100)
    assert check(ROTATED, new) == ReceiptCheck(ReceiptStatus.VALID, claims)
    swapped = ".".join([PREFIX, key_id(NEW), *old.split(".")[2:]])
    assert check(ROTATED, swapped).status is ReceiptStatus.INVALID
    assert check(ReceiptKeys(NEW), old).status is ReceiptStatus.INVALID  # a key no longer kept


def test_a_retired_key_never_vouches_for_a_position_after_its_retirement() -> None:
    """Whoever holds a leaked, retired receipt key can MAC any claims: a receipt under it
    that names a ledger position after the rotation is invalid, one at or before it valid."""
    assert check(ROTATED, issue(OLD, ReceiptClaims("web-01", 100, 3))).status is ReceiptStatus.VALID
    assert check(ROTATED, issue(OLD, ReceiptClaims("web-01", 101, 3))).status is ReceiptStatus.INVALID
    assert check(ROTATED, issue(NEW, ReceiptClaims("web-01", 101, 3))).status is ReceiptStatus.VALID


def test_legacy_receipts_are_checked_under_the_oldest_key() -> None:
    """``rg1`` receipts (no key id) verify under the only key before any rotation, and
    under the oldest retired key after, bounded by its retirement."""
    payload = _payload(ReceiptClaims("web-01", 5, 0))
    legacy = f"{LEGACY_PREFIX}.{_b64(payload)}.{_b64(_mac(OLD, payload))}"
    assert check(OLD, legacy).status is ReceiptStatus.VALID
    assert check(ROTATED, legacy) == ReceiptCheck(ReceiptStatus.VALID, ReceiptClaims("web-01", 5, 0), 100)
    assert check(ReceiptKeys(NEW), legacy).status is ReceiptStatus.INVALID


@pytest.mark.parametrize("kid", ["", "é" * 8, "A" * 9, "....", "\x00"])
def test_an_unknown_or_hostile_key_id_is_invalid(kid: str) -> None:
    """A key id that names no key (empty, non-ASCII, too long) is invalid, never an error."""
    parts = issue(NEW, ReceiptClaims("web-01", 1, 0)).split(".")
    assert check(ROTATED, ".".join([parts[0], kid, *parts[2:]])).status is ReceiptStatus.INVALID


def _signed_by_old(payload: bytes) -> str:
    """Any payload MACed by the retired key, as its leaked copy's holder can make one."""
    kid = key_id(OLD)
    return f"{PREFIX}.{kid}.{_b64(payload)}.{_b64(_mac_v2(OLD, kid, payload))}"


@pytest.mark.parametrize("payload", [
    b"[" * 1400,  # nested deeper than the interpreter's recursion limit: RecursionError
    b'["web-01",-1,0]', b'["web-01",-99999999999999999999999,0]',  # below any seq; out of bigint
    b'["web-01",5,-1]', b'["web-01",5,2147483648]', b'["web-01",5,99999999999999999999999]',  # epoch out of range
])
def test_claims_no_ledger_could_hold_are_invalid_even_under_a_key(payload: bytes) -> None:
    """A receipt whose MAC verifies under a leaked retired key but whose payload no ledger
    could have issued (nested too deep to parse, a negative or out-of-range seq or epoch)
    is invalid: checking it raises nothing, and no such number reaches the database."""
    receipt = _signed_by_old(payload)
    assert len(receipt) <= MAX_LENGTH
    assert check(ROTATED, receipt) == ReceiptCheck(ReceiptStatus.INVALID)
