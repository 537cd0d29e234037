"""Request validation at its edges: the exact typed value of a good request, and each limit from both sides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from replayguard.core import validation
from replayguard.core.validation import EnrollRequest, NonceRequest, OtpRequest
from replayguard.errors import InvalidRequest

MAX_TTL = 7 * 86400
OTP = {"vm_id": "web-01", "principal": "alice", "otp": "123456"}
NONCE = {"vm_id": "web-01", "scope": "login", "nonce": "n-1"}
K64 = "k" * 64


def test_good_requests_become_exact_values() -> None:
    """Every field of a well-formed request reaches the typed value unchanged, defaults filled in."""
    assert validation.otp_request({**OTP, "receipt": "rg1.a.b", "context": {"service": "sshd", "port": 22,
                                                                             "gone": None}}) == OtpRequest(
        "web-01", "alice", "123456", "rg1.a.b", {"service": "sshd", "port": "22"})
    assert validation.otp_request(OTP) == OtpRequest("web-01", "alice", "123456", None, {})
    assert validation.nonce_request({**NONCE, "ttl_s": 60, "issued_at": 1_790_000_000, "receipt": "r"},
                                    MAX_TTL) == NonceRequest(
        "web-01", "login", b"n-1", 60, datetime.fromtimestamp(1_790_000_000, UTC), "r")
    assert validation.nonce_request(NONCE, MAX_TTL) == NonceRequest("web-01", "login", b"n-1", 300, None, None)
    assert validation.enroll_request({}) == EnrollRequest("totp", None, 6, 30, "SHA1")
    assert validation.enroll_request({"type": "hotp", "secret": "jbsw y3dp ehpk 3pxp jbsw y3dp ab", "digits": 8,
                                      "period": 60, "algorithm": "SHA512"}) == EnrollRequest(
        "hotp", "JBSWY3DPEHPK3PXPJBSWY3DPAB", 8, 60, "SHA512")


def _otp(**change: Any) -> Any:
    return validation.otp_request({**OTP, **change})


def _nonce(**change: Any) -> Any:
    return validation.nonce_request({**NONCE, **change}, MAX_TTL)


def _enroll(**change: Any) -> Any:
    return validation.enroll_request(change)


# (case, call, field at fault or None when the request is fine)
EDGES: list[tuple[str, Any, str | None]] = [
    ("identifier of 256", lambda: _otp(vm_id="v" * 256), None),
    ("identifier of 257", lambda: _otp(vm_id="v" * 257), "vm_id"),
    ("otp of 64", lambda: _otp(otp="1" * 64), None),
    ("otp of 65", lambda: _otp(otp="1" * 65), "otp"),
    ("otp with a control character", lambda: _otp(otp="12\x0734"), "otp"),
    ("receipt of 2048", lambda: _otp(receipt="r" * 2048), None),
    ("receipt of 2049", lambda: _otp(receipt="r" * 2049), "receipt"),
    ("nonce receipt of 2049", lambda: _nonce(receipt="r" * 2049), "receipt"),
    ("context key of 64", lambda: _otp(context={K64: "v"}), None),
    ("context key of 65", lambda: _otp(context={K64 + "k": "v"}), "context"),
    ("context key of 1", lambda: _otp(context={"k": "v"}), None),
    ("context key empty", lambda: _otp(context={"": "v"}), "context"),
    ("context key not printable", lambda: _otp(context={"a\nb": "v"}), "context"),
    ("context of 16 entries", lambda: _otp(context={f"k{i}": "v" for i in range(16)}), None),
    ("context of 17 entries", lambda: _otp(context={f"k{i}": "v" for i in range(17)}), "context"),
    ("context value of 256", lambda: _otp(context={"k": "v" * 256}), None),
    ("context value of 257", lambda: _otp(context={"k": "v" * 257}), "context.k"),
    ("context value not printable", lambda: _otp(context={"k": "a\x00b"}), "context.k"),
    ("context value a boolean", lambda: _otp(context={"k": True}), "context.k"),
    ("context field name cut at 64", lambda: _otp(context={K64: ["x"]}), ("context." + K64)[:64]),
    ("nonce of 1024 bytes", lambda: _nonce(nonce="n" * 1024), None),
    ("nonce of 1025 bytes", lambda: _nonce(nonce="n" * 1025), "nonce"),
    ("nonce of 512 two-byte characters", lambda: _nonce(nonce="é" * 512), None),
    ("nonce of 513 two-byte characters", lambda: _nonce(nonce="é" * 513), "nonce"),
    ("nonce with a lone surrogate", lambda: _nonce(nonce="a\ud800"), None),
    ("nonce empty", lambda: _nonce(nonce=""), "nonce"),
    ("ttl of 1", lambda: _nonce(ttl_s=1), None),
    ("ttl of 0", lambda: _nonce(ttl_s=0), "ttl_s"),
    ("ttl of the maximum", lambda: _nonce(ttl_s=MAX_TTL), None),
    ("ttl over the maximum", lambda: _nonce(ttl_s=MAX_TTL + 1), "ttl_s"),
    ("ttl a boolean", lambda: _nonce(ttl_s=True), "ttl_s"),
    ("ttl of the maximum written as a float", lambda: _nonce(ttl_s=float(MAX_TTL)), None),
    ("ttl over the maximum written as a float", lambda: _nonce(ttl_s=MAX_TTL + 1.0), "ttl_s"),
    ("ttl of 0.0", lambda: _nonce(ttl_s=0.0), "ttl_s"),
    ("digits 8.0", lambda: _enroll(digits=8.0), None),
    ("issued_at not a time", lambda: _nonce(issued_at="yesterday"), "issued_at"),
    ("digits 6..8", lambda: (_enroll(digits=6), _enroll(digits=8)), None),
    ("digits 5", lambda: _enroll(digits=5), "digits"),
    ("digits 9", lambda: _enroll(digits=9), "digits"),
    ("period 10..120", lambda: (_enroll(period=10), _enroll(period=120)), None),
    ("period 9", lambda: _enroll(period=9), "period"),
    ("period 121", lambda: _enroll(period=121), "period"),
    ("secret of 26 base32 characters (128 bits), padded", lambda: _enroll(secret="A" * 26 + "======"), None),
    ("secret of 25", lambda: _enroll(secret="A" * 25), "secret"),
    ("secret of 256", lambda: _enroll(secret="A" * 256), None),
    ("secret of 257", lambda: _enroll(secret="A" * 257), "secret"),
    ("secret not base32", lambda: _enroll(secret="A" * 25 + "1"), "secret"),
    ("secret not a string", lambda: _enroll(secret=12345678901234567), "secret"),
    ("type unknown", lambda: _enroll(type="sms"), "type"),
    ("algorithm unknown", lambda: _enroll(algorithm="MD5"), "algorithm"),
    ("algorithm lower case", lambda: _enroll(algorithm="sha1"), "algorithm"),
]


@pytest.mark.parametrize(("case", "call", "field"), EDGES, ids=[case for case, _, _ in EDGES])
def test_limits_from_both_sides(case: str, call: Any, field: str | None) -> None:
    """A value at a limit is accepted; one past it is refused, naming the field at fault."""
    if field is None:
        call()
        return
    with pytest.raises(InvalidRequest) as err:
        call()
    assert err.value.field == field and err.value.message, case


def test_an_integral_float_is_read_as_the_int_it_names() -> None:
    """``300.0`` is the integer 300 (JSON Schema 2020-12): the request holds an ``int``, never a float."""
    ttl = _nonce(ttl_s=300.0).ttl_s
    assert ttl == 300 and type(ttl) is int
    enrolment = _enroll(digits=8.0, period=60.0)
    assert (enrolment.digits, enrolment.period) == (8, 60) and type(enrolment.digits) is int


def test_nonce_keeps_a_lone_surrogate_as_its_bytes() -> None:
    """A nonce that is not valid UTF-16 text is still one credential: its surrogatepass bytes."""
    assert _nonce(nonce="a\ud800").nonce == "a\ud800".encode("utf-8", "surrogatepass")


UTC = UTC


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-11-29t10:05:00z", datetime(2026, 11, 29, 10, 5, tzinfo=UTC)),  # RFC 3339 allows lower case
    ("2026-11-29 10:05:00Z", datetime(2026, 11, 29, 10, 5, tzinfo=UTC)),
    ("2026-11-29T10:05:00.5Z", datetime(2026, 11, 29, 10, 5, 0, 500000, tzinfo=UTC)),  # a fraction, not 5 µs
    ("2026-11-29T10:05:00.1234567+02:00", datetime(2026, 11, 29, 8, 5, 0, 123456, tzinfo=UTC)),
    ("2026-11-29T12:05:00.000001+02:00", datetime(2026, 11, 29, 10, 5, 0, 1, tzinfo=UTC)),
    (0, datetime(1970, 1, 1, tzinfo=UTC)),
    (253402300799, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
])
def test_more_times(value: object, expected: datetime) -> None:
    """Lower-case separators, a space, short and long fractions,
    offsets, and the ends of the Unix range parse exactly."""
    parsed = validation.parse_time(value, "t")
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: validation.parse_time(253402300800, "t"), "t"),
    (lambda: validation.parse_time(-0.5, "t"), "t"),
    (lambda: validation.parse_time([1], "t"), "t"),
    (lambda: validation.parse_time("2026-11-29T10:05:00.Z", "t"), "t"),
    (lambda: validation.parse_time("2026-13-40T10:05:00Z", "t"), "t"),
    (lambda: validation.otp_request({"principal": "a", "otp": "1"}), "vm_id"),
    (lambda: validation.otp_request({**OTP, "vm_id": 5}), "vm_id"),
    (lambda: validation.otp_request({**OTP, "vm_id": "a\tb"}), "vm_id"),
    (lambda: validation.otp_request([OTP]), None),
])
def test_every_refusal_has_a_message(call: Any, field: str | None) -> None:
    """Each refusal carries a human message and names its field (none for a body that is not an object)."""
    with pytest.raises(InvalidRequest) as err:
        call()
    assert err.value.field == field and isinstance(err.value.message, str) and err.value.message


def test_one_character_identifiers_and_codes_and_skipped_context_values() -> None:
    """One-character identifiers and codes are fine; a null context value is skipped, not the rest of the context."""
    assert validation.otp_request({"vm_id": "v", "principal": "p", "otp": "1",
                                   "context": {"a": None, "b": "x"}}) == OtpRequest("v", "p", "1", None, {"b": "x"})
    assert validation.enroll_request({"algorithm": "SHA256"}).algorithm == "SHA256"


def test_times_are_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing never depends on the machine's time zone: the result is in UTC."""
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        parsed = validation.parse_time("2026-11-29T12:05:00+02:00", "t")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert parsed == datetime(2026, 11, 29, 10, 5, tzinfo=UTC) and parsed.utcoffset() == timedelta(0)
