"""Webhook signatures: a pure function of secret, timestamp, body, header and time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import pytest

from replayguard.core.signatures import sign, verify_signature
from replayguard.errors import Unauthorized

SECRET = b"relay-shared-secret"
BODY = b'{"event_id": "evt-1", "type": "snapshot.reverted", "vm_id": "web-01"}'
NOW = 1_790_000_000.0
TS = str(int(NOW))


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    """The signature is v1= and the hex HMAC-SHA256 of 'timestamp.body' under the secret."""
    expected = hmac.new(SECRET, TS.encode() + b"." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, TS, BODY) == f"v1={expected}"


def test_genuine_fresh_signature_passes() -> None:
    """A genuine signature inside the tolerance verifies without raising."""
    verify_signature(SECRET, TS, BODY, sign(SECRET, TS, BODY), NOW, 300)


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_signature_at_the_edges_of_the_tolerance_passes(skew: int) -> None:
    """A timestamp exactly at the tolerance on either side still verifies."""
    ts = str(int(NOW) + skew)
    verify_signature(SECRET, ts, BODY, sign(SECRET, ts, BODY), NOW, 300)


@pytest.mark.parametrize("skew", [-301, 301, -86400, 10**9])
def test_signature_outside_the_tolerance_is_refused(skew: int) -> None:
    """A genuine signature replayed (or pre-dated) beyond the tolerance is Unauthorized."""
    ts = str(int(NOW) + skew)
    with pytest.raises(Unauthorized, match="tolerance"):
        verify_signature(SECRET, ts, BODY, sign(SECRET, ts, BODY), NOW, 300)


def test_rotated_signature_list_passes_when_one_matches() -> None:
    """A header listing several v1 signatures (key rotation) verifies when one matches."""
    header = f"v1={'0' * 64},{sign(SECRET, TS, BODY)}"
    verify_signature(SECRET, TS, BODY, header, NOW, 300)


def test_uppercase_hex_signature_passes() -> None:
    """Hex case does not matter."""
    scheme, _, value = sign(SECRET, TS, BODY).partition("=")
    verify_signature(SECRET, TS, BODY, f"{scheme}={value.upper()}", NOW, 300)


BAD_SIGNATURES = [
    ("another body", lambda: sign(SECRET, TS, BODY + b" ")),
    ("another secret", lambda: sign(b"other", TS, BODY)),
    ("another timestamp", lambda: sign(SECRET, str(int(NOW) - 1), BODY)),
    ("empty", lambda: ""),
    ("no scheme", lambda: sign(SECRET, TS, BODY).partition("=")[2]),
    ("wrong scheme", lambda: "v0=" + sign(SECRET, TS, BODY).partition("=")[2]),
    ("scheme only", lambda: "v1="),
    ("truncated", lambda: sign(SECRET, TS, BODY)[:-2]),
    ("not hex", lambda: "v1=" + "zz" * 32),
    ("non-ascii", lambda: "v1=" + "é" * 64),
    ("huge", lambda: "v1=" + "a" * 10_000),
]


@pytest.mark.parametrize(("name", "make"), BAD_SIGNATURES, ids=[n for n, _ in BAD_SIGNATURES])
def test_wrong_or_malformed_signature_is_refused(name: str, make: Callable[[], str]) -> None:
    """A signature that is not the genuine MAC of this timestamp and body is Unauthorized."""
    with pytest.raises(Unauthorized):
        verify_signature(SECRET, TS, BODY, make(), NOW, 300)


@pytest.mark.parametrize("timestamp", ["", "abc", "-5", "1.5", " 1790000000", "1e9", "١٢٣", "9" * 40])
def test_malformed_timestamp_is_refused(timestamp: str) -> None:
    """A timestamp that is not plain Unix seconds is Unauthorized, whatever the signature."""
    with pytest.raises(Unauthorized):
        verify_signature(SECRET, timestamp, BODY, sign(SECRET, timestamp, BODY) if timestamp.isascii() else "v1=00",
                         NOW, 300)


def test_now_that_is_not_finite_refuses() -> None:
    """A broken clock (NaN) never lets a signature through."""
    with pytest.raises(Unauthorized):
        verify_signature(SECRET, TS, BODY, sign(SECRET, TS, BODY), float("nan"), 300)


def test_rotated_signature_list_passes_when_the_first_matches() -> None:
    """Every candidate counts, not only the last: the genuine signature first, a stale one after, verifies."""
    header = f"{sign(SECRET, TS, BODY)},v1={'0' * 64}"
    verify_signature(SECRET, TS, BODY, header, NOW, 300)


def test_header_length_limits_are_inclusive() -> None:
    """A 20-digit timestamp and a 1024-character signature header are read; one more character is refused."""
    padded = sign(SECRET, TS, BODY) + "," + "v1=" + "0" * (1024 - len(sign(SECRET, TS, BODY)) - 4)
    assert len(padded) == 1024
    verify_signature(SECRET, TS, BODY, padded, NOW, 300)
    with pytest.raises(Unauthorized, match="too long"):
        verify_signature(SECRET, TS, BODY, padded + "0", NOW, 300)
    twenty = TS.zfill(20)
    verify_signature(SECRET, twenty, BODY, sign(SECRET, twenty, BODY), NOW, 300)
    with pytest.raises(Unauthorized, match="Unix seconds"):
        verify_signature(SECRET, "0" + twenty, BODY, sign(SECRET, "0" + twenty, BODY), NOW, 300)
