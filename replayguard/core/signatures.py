"""Request authenticity: the HMAC signature of hypervisor events (relays sign, the service
checks) and of the webhook sinks' requests (the service signs, receivers check).

A signed event carries ``X-Replayguard-Timestamp: <unix seconds>`` and
``X-Replayguard-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{raw body}")>``.
The timestamp is inside the MAC, so a captured event replayed after the tolerance is
refused even though its signature is genuine. Pure: the caller passes the time.
"""

from __future__ import annotations

import hashlib
import hmac
import math

from ..errors import Unauthorized

TIMESTAMP_HEADER = "X-Replayguard-Timestamp"
SIGNATURE_HEADER = "X-Replayguard-Signature"
SCHEME = "v1"
_MAX_TIMESTAMP_LEN = 20
_MAX_SIGNATURE_LEN = 1024


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The header value a relay sends: ``v1=<hex>``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def _timestamp(timestamp: str) -> int:
    if not timestamp or len(timestamp) > _MAX_TIMESTAMP_LEN or not timestamp.isascii() or not timestamp.isdigit():
        raise Unauthorized(f"{TIMESTAMP_HEADER} must be Unix seconds")
    return int(timestamp)


def _candidates(signature: str) -> list[str]:
    """The ``v1`` values of a header that may list several (key rotation): ``v1=a,v1=b``."""
    if len(signature) > _MAX_SIGNATURE_LEN:
        raise Unauthorized(f"{SIGNATURE_HEADER} is too long")
    found = []
    for part in signature.split(","):
        scheme, sep, value = part.strip().partition("=")
        if sep and scheme == SCHEME and value:
            found.append(value)
    if not found:
        raise Unauthorized(f"{SIGNATURE_HEADER} must be 'v1=<hex HMAC-SHA256>'")
    return found


def verify_signature(secret: bytes, timestamp: str, body: bytes, signature: str, now: float,
                     tolerance_s: int) -> None:
    """Raises ``Unauthorized`` unless ``signature`` is a fresh, genuine MAC of the body."""
    sent = _timestamp(timestamp)
    if not math.isfinite(now) or abs(now - sent) > tolerance_s:
        raise Unauthorized("the event's signature timestamp is outside the tolerance")
    expected = sign(secret, timestamp, body).partition("=")[2].encode("ascii")
    valid = False
    for candidate in _candidates(signature):
        # Compare every candidate, bytes to bytes, in constant time; no early exit.
        valid |= hmac.compare_digest(expected, candidate.lower().encode("ascii", "replace"))
    if not valid:
        raise Unauthorized("the event's signature does not match")
