"""Edges of the pure core that stored data and wire formats depend on: the chain's canonical form,
output times, receipt shapes, TOTP/HOTP windows and defaults, and the causes windows record."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core import otp, receipts
from replayguard.core.chain import Entry, canonical
from replayguard.core.events import EventType, GenericEvent
from replayguard.core.receipts import MAX_LENGTH, ReceiptClaims, ReceiptStatus
from replayguard.core.timefmt import rfc3339_us, to_us
from replayguard.core.windows import Ancestor, EventContext, windows_for

KEY = bytes(range(32))
SECRET = base64.b32encode(b"12345678901234567890").decode()


def test_canonical_form_of_an_entry_with_empty_fields() -> None:
    """Absent fields are empty strings between unit separators: the bytes every stored hash was made from."""
    entry = Entry(7, 1_790_000_000_000_000, "event", None, None, None, None, None, "{}")
    assert canonical(entry) == b"7\x1f1790000000000000\x1fevent\x1f\x1f\x1f\x1f\x1f\x1f{}"
    full = Entry(8, 1, "otp", "vm-é", "alice", b"\x01\xff", "accept", "ok", '{"a":1}')
    assert canonical(full) == "8\x1f1\x1fotp\x1fvm-é\x1falice\x1f01ff\x1faccept\x1fok\x1f{\"a\":1}".encode()


@pytest.mark.parametrize(("us", "text"), [
    (None, None),
    (0, "1970-01-01T00:00:00.000000Z"),
    (1_790_000_000_123_456, "2026-09-21T14:13:20.123456Z"),
])
def test_rfc3339_us(us: int | None, text: str | None) -> None:
    """Output times are RFC 3339 UTC with exactly six fraction digits; None stays None."""
    assert rfc3339_us(us) == text
    if us is not None:
        assert text is not None
        back = to_us(datetime.fromisoformat(text.replace("Z", "+00:00")))
        assert back == us and isinstance(back, int)


def _forge(payload: bytes, prefix: str = "rg1") -> str:
    """A receipt with a correct MAC over any payload (the tests hold the key)."""
    return f"{prefix}.{receipts._b64(payload)}.{receipts._b64(receipts._mac(KEY, payload))}"


@settings(max_examples=200, deadline=None)
@given(vm_id=st.text(min_size=1, max_size=80), seq=st.integers(0, 2**63 - 1), epoch=st.integers(0, 2**31 - 1))
def test_receipts_round_trip_without_padding(vm_id: str, seq: int, epoch: int) -> None:
    """Any issued receipt verifies to its claims and carries no base64 padding."""
    receipt = receipts.issue(KEY, ReceiptClaims(vm_id, seq, epoch))
    assert "=" not in receipt
    assert receipts.check(KEY, receipt) == receipts.ReceiptCheck(ReceiptStatus.VALID, ReceiptClaims(vm_id, seq, epoch))


@pytest.mark.parametrize(("case", "payload"), [
    ("vm_id not a string", b"[1,2,3]"),
    ("seq not an integer", b'["vm","2",3]'),
    ("epoch not an integer", b'["vm",2,"3"]'),
    ("seq a boolean", b'["vm",true,3]'),
    ("not a list of three", b'{"vm":1}'),
])
def test_a_correctly_maced_payload_of_the_wrong_shape_is_invalid(case: str, payload: bytes) -> None:
    """A MAC is not enough: the payload must be [vm_id string, seq int, epoch int]."""
    assert receipts.check(KEY, _forge(payload)).status is ReceiptStatus.INVALID, case


def test_receipt_prefix_and_length_are_checked_before_the_mac() -> None:
    """Another format prefix, or a receipt past MAX_LENGTH, is invalid even with a correct MAC."""
    payload = json.dumps(["vm", 1, 0], separators=(",", ":")).encode()
    assert receipts.check(KEY, _forge(payload)).status is ReceiptStatus.VALID
    assert receipts.check(KEY, _forge(payload, prefix="rg2")).status is ReceiptStatus.INVALID
    at_limit = receipts.issue(KEY, ReceiptClaims("v" * 1485, 1, 0))  # 4 + 9 + 1991 + 1 + 43 characters
    past_limit = receipts.issue(KEY, ReceiptClaims("v" * 1486, 1, 0))
    assert (len(at_limit), len(past_limit)) == (MAX_LENGTH, MAX_LENGTH + 1)
    assert receipts.check(KEY, at_limit).status is ReceiptStatus.VALID
    assert receipts.check(KEY, past_limit).status is ReceiptStatus.INVALID


def test_totp_defaults_are_one_step_of_drift_and_thirty_seconds() -> None:
    """Without arguments a code two steps away is refused, one step away accepted; a 60 s period is honoured."""
    now = 1_790_000_000.0
    step = int(now // 30)
    totp = pyotp.TOTP(SECRET)
    assert otp.totp_matches(SECRET, totp.at(now + 30), now_s=now) == [step + 1]
    assert otp.totp_matches(SECRET, totp.at(now + 60), now_s=now) == []
    slow = pyotp.TOTP(SECRET, interval=60)
    assert otp.totp_matches(SECRET, slow.at(now), now_s=now, period=60) == [int(now // 60)]


def test_hotp_window_edges_and_default_look_ahead() -> None:
    """HOTP looks look_ahead counters ahead (default 10) and look_ahead - 1 behind the last counter."""
    hotp = pyotp.HOTP(SECRET)
    assert otp.hotp_matches(SECRET, hotp.at(30), last_counter=20) == [30]
    assert otp.hotp_matches(SECRET, hotp.at(31), last_counter=20) == []
    assert otp.hotp_matches(SECRET, hotp.at(11), last_counter=20) == [11]
    assert otp.hotp_matches(SECRET, hotp.at(10), last_counter=20) == []


@pytest.mark.parametrize("code", ["１２３４５６", "12345", "1234567", "12a456", "12 456"])  # noqa: RUF001 - fullwidth digits on purpose
def test_codes_of_the_wrong_shape_match_nothing_and_never_raise(code: str) -> None:
    """Non-ASCII digits, wrong lengths and letters match no counter (and raise nothing)."""
    assert otp.totp_matches(SECRET, code, now_s=1_790_000_000.0, drift=3) == []
    assert otp.hotp_matches(SECRET, code, last_counter=0) == []


def test_windows_record_their_cause() -> None:
    """A window names the event type that opened it; an ancestor's window adds ':lineage'."""
    base = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    event = GenericEvent(event_id="e", type=EventType.SNAPSHOT_REVERTED, vm_id="clone", snapshot_id="s",
                         snapshot_created_at=base, occurred_at=base.replace(minute=5), source_vm_id=None)
    context = EventContext(to_us(base.replace(minute=5)), (), (Ancestor("parent", to_us(base.replace(minute=1))),))
    assert [(w.vm_id, w.cause) for w in windows_for(event, context)] == [
        ("clone", "snapshot.reverted"), ("parent", "snapshot.reverted:lineage")]
