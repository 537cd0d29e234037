"""Request validation: untrusted JSON in, typed requests out, or ``InvalidRequest``.

Every check names the field at fault, so a client error is always a 4xx with ``field``.
"""

from __future__ import annotations

import binascii
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pyotp

from ..errors import InvalidRequest
from .receipts import MAX_LENGTH as MAX_RECEIPT

MAX_ID = 256
# A VM or principal is named in URL paths (/v1/vms/{vm_id}/timeline): browsers and clients
# resolve these segments away, so such an identifier could never be looked at.
DOT_SEGMENTS = (".", "..")
MAX_NONCE = 1024
MIN_REQUEST_ID, MAX_REQUEST_ID = 16, 128  # a receipt_request: random enough not to be guessed
DEFAULT_TTL_S = 300  # a nonce's ttl when the request names none (nonce_max_ttl_s if lower)
MAX_CONTEXT_KEYS = 16
MAX_CONTEXT_VALUE = 256
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_BASE32 = re.compile(r"[A-Z2-7]+=*")


def _decodes(secret: str) -> bool:
    """Whether pyotp, which computes the codes, can decode the secret (a length of 1, 3 or
    6 characters past a multiple of 8, or too much padding, it cannot)."""
    try:
        pyotp.HOTP(secret).byte_secret()
    except (binascii.Error, ValueError):
        return False
    return True


def _printable(text: str) -> bool:
    return text.isprintable()


def identifier(body: dict[str, Any], name: str) -> str:
    """A required identifier (vm_id, principal, scope, …): 1 to 256 printable characters."""
    if body.get(name) is None:
        raise InvalidRequest(f"{name} is required", field=name)
    return check_identifier(body[name], name)


def check_identifier(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string", field=name)
    if not 1 <= len(value) <= MAX_ID:
        raise InvalidRequest(f"{name} must be 1 to {MAX_ID} characters", field=name)
    if not _printable(value):
        raise InvalidRequest(f"{name} must not contain control characters", field=name)
    if value in DOT_SEGMENTS:
        raise InvalidRequest(f"{name} must not be . or .., which no URL path can name", field=name)
    return value


def parse_time(value: object, name: str) -> datetime:
    """RFC 3339 text or Unix seconds, as an aware UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"{name} must be an RFC 3339 time or Unix seconds", field=name)
    if isinstance(value, str):
        return _parse_rfc3339(value, name)
    if not math.isfinite(value) or not 0 <= value < 253402300800:
        raise InvalidRequest(f"{name} is out of range (years 1970 to 9999)", field=name)
    return datetime.fromtimestamp(value, tz=UTC)


def _parse_rfc3339(text: str, name: str) -> datetime:
    if not _RFC3339.match(text):
        raise InvalidRequest(f"{name} must be an RFC 3339 time", field=name)
    normalised = text.replace("z", "Z").replace("Z", "+00:00").replace("t", "T")
    if "." in normalised:
        head, rest = normalised.split(".", 1)
        digits = re.match(r"\d+", rest)
        assert digits is not None  # noqa: S101 - narrows the type for mypy; the regex above guarantees fraction digits
        normalised = head + "." + digits.group(0)[:6].ljust(6, "0") + rest[len(digits.group(0)):]
    # RFC 3339 §5.6 allows a leap second (:60), which datetime does not: the moment after :59.
    leap = normalised[17:19] == "60"
    if leap:
        normalised = normalised[:17] + "59" + normalised[19:]
    try:
        moment = datetime.fromisoformat(normalised).astimezone(UTC) + timedelta(seconds=1 if leap else 0)
    except (ValueError, OverflowError):  # OverflowError: in range locally, not in UTC
        raise InvalidRequest(f"{name} is not a valid time", field=name) from None
    if moment.year < 1970:  # the upper bound, 9999, is datetime's own
        raise InvalidRequest(f"{name} is out of range (years 1970 to 9999)", field=name)
    return moment


def optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false", field=name)
    return value


def optional_request_id(body: dict[str, Any], name: str) -> str | None:
    """A caller's id of one of its requests (``receipt_request``, ``receipt_unanswered``):
    16 to 128 printable ASCII characters without spaces, or absent."""
    value = body.get(name)
    if value is None:
        return None
    if not (isinstance(value, str) and MIN_REQUEST_ID <= len(value) <= MAX_REQUEST_ID and value.isascii()
            and value.isprintable() and " " not in value):
        raise InvalidRequest(f"{name} must be {MIN_REQUEST_ID} to {MAX_REQUEST_ID} printable ASCII characters"
                             " without spaces", field=name)
    return value


def optional_string(body: dict[str, Any], name: str, max_len: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidRequest(f"{name} must be a string of at most {max_len} characters", field=name)
    return value


def integer(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    """An integer field. A JSON number written with a zero fraction (``300.0``) is one:
    JSON Schema 2020-12, which the OpenAPI 3.1 document uses, counts it an integer. A
    boolean, another fraction, NaN or an infinity is not."""
    value = body.get(name, default)
    if isinstance(value, float) and value.is_integer():  # False for NaN and the infinities
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer", field=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", field=name)
    return value


def context(body: dict[str, Any]) -> dict[str, str]:
    """The optional ``context`` object: a few short printable strings, kept for analysts."""
    value = body.get("context")
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_CONTEXT_KEYS:
        raise InvalidRequest(f"context must be an object of at most {MAX_CONTEXT_KEYS} entries", field="context")
    out: dict[str, str] = {}
    for key, item in value.items():
        field = f"context.{key}"[:64]
        if not (1 <= len(key) <= 64 and _printable(key)):
            raise InvalidRequest("context keys must be 1 to 64 printable characters", field="context")
        if item is None:
            continue
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise InvalidRequest("context values must be strings or numbers", field=field)
        text = str(item)
        if len(text) > MAX_CONTEXT_VALUE or not _printable(text):
            raise InvalidRequest(f"context values must be printable and at most {MAX_CONTEXT_VALUE} characters",
                                 field=field)
        out[key] = text
    return out


def require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


# The requests of the decision routes are NamedTuples rather than frozen dataclasses: one is
# built for every decision, and a frozen dataclass's constructor sets each field through
# object.__setattr__ (about 19,000 instructions for NonceRequest against about 3,000).
class OtpRequest(NamedTuple):
    vm_id: str
    principal: str
    otp: str
    receipt: str | None
    context: dict[str, str]
    receipt_kept: bool = False  # the caller keeps receipts: none sent means it lost its own
    receipt_request: str | None = None  # this request's id, which the caller stored before sending it
    receipt_unanswered: str | None = None  # the id of its earlier request whose answer never came


class NonceRequest(NamedTuple):
    vm_id: str
    scope: str
    nonce: bytes
    ttl_s: int
    issued_at: datetime | None
    receipt: str | None
    receipt_kept: bool = False
    receipt_request: str | None = None
    receipt_unanswered: str | None = None


def otp_request(raw: object) -> OtpRequest:
    body = require_object(raw)
    otp = body.get("otp")
    if not isinstance(otp, str) or not 1 <= len(otp) <= 64 or not _printable(otp):
        raise InvalidRequest("otp must be a string of 1 to 64 printable characters", field="otp")
    return OtpRequest(
        vm_id=identifier(body, "vm_id"),
        principal=identifier(body, "principal"),
        otp=otp,
        receipt=optional_string(body, "receipt", MAX_RECEIPT),
        context=context(body),
        receipt_kept=optional_bool(body, "receipt_kept"),
        receipt_request=optional_request_id(body, "receipt_request"),
        receipt_unanswered=optional_request_id(body, "receipt_unanswered"),
    )


def nonce_request(raw: object, max_ttl_s: int) -> NonceRequest:
    body = require_object(raw)
    nonce = body.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        raise InvalidRequest("nonce must be a non-empty string", field="nonce")
    encoded = nonce.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_NONCE:
        raise InvalidRequest(f"nonce must be at most {MAX_NONCE} bytes", field="nonce")
    issued = body.get("issued_at")
    return NonceRequest(
        vm_id=identifier(body, "vm_id"),
        scope=identifier(body, "scope"),
        nonce=encoded,
        ttl_s=integer(body, "ttl_s", min(DEFAULT_TTL_S, max_ttl_s), 1, max_ttl_s),
        issued_at=None if issued is None else parse_time(issued, "issued_at"),
        receipt=optional_string(body, "receipt", MAX_RECEIPT),
        receipt_kept=optional_bool(body, "receipt_kept"),
        receipt_request=optional_request_id(body, "receipt_request"),
        receipt_unanswered=optional_request_id(body, "receipt_unanswered"),
    )


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    type: str
    secret: str | None
    digits: int
    period: int
    algorithm: str


def enroll_request(raw: object) -> EnrollRequest:
    body = require_object(raw)
    kind = body.get("type", "totp")
    if kind not in ("totp", "hotp"):
        raise InvalidRequest("type must be 'totp' or 'hotp'", field="type")
    algorithm = body.get("algorithm", "SHA1")
    if algorithm not in ("SHA1", "SHA256", "SHA512"):
        raise InvalidRequest("algorithm must be SHA1, SHA256 or SHA512", field="algorithm")
    secret = body.get("secret")
    if secret is not None:
        if not isinstance(secret, str):
            raise InvalidRequest("secret must be a base32 string", field="secret")
        secret = secret.replace(" ", "").upper()
        # RFC 4226 R6: at least 128 bits (26 base32 characters); pyotp itself refuses under 112.
        if (_BASE32.fullmatch(secret) is None or not 26 <= len(secret.rstrip("=")) <= 256
                or not _decodes(secret)):
            raise InvalidRequest("secret must be base32 of 128 bits or more (RFC 4226)", field="secret")
    return EnrollRequest(
        type=kind, secret=secret,
        digits=integer(body, "digits", 6, 6, 8),
        period=integer(body, "period", 30, 10, 120),  # pyotp refuses intervals over 120 s
        algorithm=algorithm,
    )
