"""Receipts: issued under a MAC, verified without trusting anything the guest sends."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core.receipts import ReceiptClaims, ReceiptStatus, check, issue

KEY = bytes(range(32))


def test_round_trip() -> None:
    """A receipt the host issued verifies and gives back its claims."""
    claims = ReceiptClaims("web-01", 1234, 2)
    result = check(KEY, issue(KEY, claims))
    assert result.status is ReceiptStatus.VALID and result.claims == claims


def test_absent() -> None:
    """No receipt is reported as absent, not invalid."""
    assert check(KEY, None).status is ReceiptStatus.ABSENT


def test_other_key_is_invalid() -> None:
    """A receipt made under another key does not verify."""
    receipt = issue(bytes(32), ReceiptClaims("web-01", 1, 0))
    assert check(KEY, receipt).status is ReceiptStatus.INVALID


def test_tampered_payload_is_invalid() -> None:
    """Changing the claims (e.g. a later seq) breaks the MAC."""
    good = issue(KEY, ReceiptClaims("web-01", 5, 0))
    forged_payload = issue(bytes(32), ReceiptClaims("web-01", 9, 0)).split(".")[1]
    prefix, _, mac = good.split(".")
    assert check(KEY, f"{prefix}.{forged_payload}.{mac}").status is ReceiptStatus.INVALID


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_garbage_is_invalid_and_never_raises(text: str) -> None:
    """Any string the host did not issue is invalid (never valid, never absent), and checking it never raises."""
    result = check(KEY, text)
    assert result.status is ReceiptStatus.INVALID and result.claims is None


@settings(max_examples=300, deadline=None)
@given(vm_id=st.text(min_size=1, max_size=64), seq=st.integers(0, 2**63 - 1), epoch=st.integers(0, 2**31 - 1))
def test_the_payload_is_compact_ascii_json(vm_id: str, seq: int, epoch: int) -> None:
    """Receipts already issued must keep verifying: the payload is byte for byte what the
    standard library's compact encoder writes."""
    import json

    from replayguard.core.receipts import _payload

    expected = json.dumps([vm_id, seq, epoch], separators=(",", ":")).encode()
    assert _payload(ReceiptClaims(vm_id, seq, epoch)) == expected
