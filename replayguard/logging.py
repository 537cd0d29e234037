"""Logging: structlog JSON lines, configured once, with a redaction processor.

``redact`` is the last line of defence for CONTRACT §9: whatever a caller passes, a key
that names a credential never reaches the output with its value, and a value that looks
like a bearer token, an OTP receipt or a base32 secret is masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

REDACTED = "[redacted]"
SENSITIVE_KEYS = frozenset({
    "otp", "code", "nonce", "secret", "token", "password", "authorization", "api_token",
    "user-password", "user_password", "authtok", "receipt", "pepper", "key", "cookie",
})
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_RG_TOKEN = re.compile(r"rgt_[A-Za-z0-9_\-]{8,}")
_URI_SECRET = re.compile(r"(?i)([?&]secret=)[^&#\s]+")  # the base32 secret of an otpauth:// URI


def _scrub_text(value: str) -> str:
    lowered = value.lower()
    # Cheap substring tests first: almost every log value holds none of these.
    if "secret=" in lowered:
        value = _URI_SECRET.sub(r"\g<1>" + REDACTED, value)
    if "bearer" in lowered:
        value = _BEARER.sub("Bearer " + REDACTED, value)
    if "rgt_" in value:
        value = _RG_TOKEN.sub(REDACTED, value)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if str(k).lower() in SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Masks every credential-named key and every token-shaped value in a log event."""
    for key in list(event_dict):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]


def configure(level: str = "info", stream: Any = None) -> None:
    """Configures structlog for JSON lines on ``stream`` (stderr by default)."""
    structlog.configure(
        processors=processors(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
