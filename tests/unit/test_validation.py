"""Request validation: every bad field is named; good requests become typed values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from replayguard.core import validation
from replayguard.errors import InvalidRequest

GOOD_OTP = {"vm_id": "web-01", "principal": "alice", "otp": "123456"}


@pytest.mark.parametrize(("change", "field"), [
    ({"vm_id": None}, "vm_id"),
    ({"vm_id": ""}, "vm_id"),
    ({"vm_id": "x" * 257}, "vm_id"),
    ({"vm_id": "web\n01"}, "vm_id"),
    ({"vm_id": "web\x0001"}, "vm_id"),
    ({"vm_id": 7}, "vm_id"),
    ({"principal": ["alice"]}, "principal"),
    ({"otp": 123456}, "otp"),
    ({"otp": ""}, "otp"),
    ({"receipt": 5}, "receipt"),
    ({"context": "sshd"}, "context"),
    ({"context": {"service": {"nested": 1}}}, "context.service"),
])
def test_otp_request_fields(change: dict[str, Any], field: str) -> None:
    """Each malformed field of a verify request is reported with its name."""
    body = {**GOOD_OTP, **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(InvalidRequest) as err:
        validation.otp_request(body)
    assert err.value.field == field


def test_identifier_limits() -> None:
    """256 printable characters are fine; unicode letters are printable."""
    req = validation.otp_request({**GOOD_OTP, "vm_id": "é" * 256})
    assert len(req.vm_id) == 256


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-11-29T10:00:00Z", datetime(2026, 11, 29, 10, tzinfo=UTC)),
    ("2026-11-29T11:00:00+01:00", datetime(2026, 11, 29, 10, tzinfo=UTC)),
    ("2026-11-29T10:00:00.123456789Z", datetime(2026, 11, 29, 10, 0, 0, 123456, tzinfo=UTC)),
    (1795946400, datetime(2026, 11, 29, 10, tzinfo=UTC)),
    (1795946400.5, datetime(2026, 11, 29, 10, 0, 0, 500000, tzinfo=UTC)),
])
def test_times(value: object, expected: datetime) -> None:
    """RFC 3339 text and Unix seconds both parse to aware UTC."""
    assert validation.parse_time(value, "t") == expected


@pytest.mark.parametrize("value", [
    "2026-11-29", "2026-11-29T10:00:00", "yesterday", True, None, float("nan"), float("inf"), -1, 1e20,
    "2026-13-40T10:00:00Z",
])
def test_bad_times(value: object) -> None:
    """Anything else is an InvalidRequest naming the field."""
    with pytest.raises(InvalidRequest) as err:
        validation.parse_time(value, "issued_at")
    assert err.value.field == "issued_at"


@pytest.mark.parametrize(("change", "field"), [
    ({"nonce": ""}, "nonce"),
    ({"nonce": "n" * 1025}, "nonce"),
    ({"nonce": "é" * 513}, "nonce"),
    ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": True}, "ttl_s"),
    ({"ttl_s": "300"}, "ttl_s"),
    ({"ttl_s": 1.5}, "ttl_s"),
    ({"ttl_s": float("nan")}, "ttl_s"),
    ({"ttl_s": float("inf")}, "ttl_s"),
    ({"ttl_s": 1e300}, "ttl_s"),
    ({"issued_at": "soon"}, "issued_at"),
    ({"scope": None}, "scope"),
])
def test_nonce_request_fields(change: dict[str, Any], field: str) -> None:
    """Each malformed field of a consume request is reported with its name."""
    body = {"vm_id": "web-01", "scope": "api", "nonce": "abc", **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(InvalidRequest) as err:
        validation.nonce_request(body, max_ttl_s=86400)
    assert err.value.field == field


@pytest.mark.parametrize(("body", "field"), [
    ({"type": "sms"}, "type"),
    ({"secret": "not base32!"}, "secret"),
    ({"secret": "GEZDGNBV"}, "secret"),
    ({"digits": 4}, "digits"),
    ({"period": 5}, "period"),
    ({"algorithm": "MD5"}, "algorithm"),
])
def test_enroll_request_fields(body: dict[str, Any], field: str) -> None:
    """Each malformed enrolment field is reported with its name."""
    with pytest.raises(InvalidRequest) as err:
        validation.enroll_request(body)
    assert err.value.field == field


def test_non_object_bodies() -> None:
    """A JSON array, string or number where an object belongs is an InvalidRequest."""
    bodies: list[object] = [[], "x", 1, None]
    for body in bodies:
        with pytest.raises(InvalidRequest):
            validation.otp_request(body)


@pytest.mark.parametrize("parse", ["otp", "nonce"])
def test_receipt_kept_is_read_and_must_be_a_boolean(parse: str) -> None:
    """``receipt_kept`` reaches the request (a lost receipt is flagged only when it is true),
    defaults to false, and anything but a JSON boolean is a 400 naming it."""
    base: dict[str, Any] = {"vm_id": "v", "principal": "p", "otp": "123456"} if parse == "otp" else {
        "vm_id": "v", "scope": "s", "nonce": "n"}

    def read(body: dict[str, Any]) -> Any:
        return validation.otp_request(body) if parse == "otp" else validation.nonce_request(body, 300)

    assert read({**base, "receipt_kept": True}).receipt_kept is True
    assert read(base).receipt_kept is False
    for bad in ("true", 1, None):
        with pytest.raises(InvalidRequest) as caught:
            read({**base, "receipt_kept": bad})
        assert caught.value.field == "receipt_kept"


def test_rfc3339_times_start_in_1970() -> None:
    """The first instant of 1970 is read; one second before it is a 400 naming the field."""
    assert validation.parse_time("1970-01-01T00:00:00Z", "issued_at") == datetime(1970, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequest) as caught:
        validation.parse_time("1969-12-31T23:59:59Z", "issued_at")
    assert caught.value.field == "issued_at" and "1970" in str(caught.value)
