"""The HMAC check in front of hypervisor events, when ``event_hmac_secret`` is set.

The relay signs ``f"{timestamp}.{raw body}"``; the service's own clock decides whether the
timestamp is fresh (``event_hmac_tolerance_s``). The verification itself is the pure
``core.signatures.verify_signature``.
"""

from __future__ import annotations

from aiohttp import web

from ..core.signatures import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from ..errors import Unauthorized
from .common import read_body
from .state import RUNTIME


async def check_event_signature(request: web.Request) -> None:
    """Raises ``Unauthorized`` unless the event is signed (a no-op when no secret is set)."""
    runtime = request.app[RUNTIME]
    secret = runtime.settings.event_hmac_secret
    if secret is None:
        return
    timestamp = request.headers.get(TIMESTAMP_HEADER)
    signature = request.headers.get(SIGNATURE_HEADER)
    if timestamp is None or signature is None:
        raise Unauthorized(f"signed events are required: send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}")
    raw = await read_body(request)
    verify_signature(secret.reveal().encode("utf-8"), timestamp, raw, signature, runtime.clock(),
                     runtime.settings.event_hmac_tolerance_s)
