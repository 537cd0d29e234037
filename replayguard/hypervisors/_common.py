"""Helpers shared by the native hypervisor parsers: safe access, identifiers, times.

Every native payload arrives as whatever a JSON decoder produced, so nothing about its
shape can be assumed. These helpers turn each wrong shape into ``MalformedPayload`` with
the path of the field at fault (``domain.name``, ``payload["nova_object.data"].uuid``),
so a parser never leaks a ``KeyError``/``TypeError`` and an operator can see which part
of the sender's JSON to fix. Nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone

from replayguard.core.events import MalformedPayload
from replayguard.core.validation import DOT_SEGMENTS

ROOT = "$"
"""Path used when the payload as a whole is at fault."""

MAX_IDENTIFIER = 256
HASHED_NAME_PREFIX = "sha256:"
"""Prefix of the identifier ``name_identifier`` derives from a name that is not one."""

# Times outside these bounds are rejected: nothing a hypervisor reports predates Unix
# time, and datetime cannot represent year 10000.
_MIN_UNIX = 0
_MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z
_MAX_TIME_TEXT = 64

# RFC 3339 section 5.6 (the 'T' may be a space or lower case, per its note); fraction of
# any length, we keep microseconds.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,12}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # \d must not match other scripts' digits
)
# The same without an offset, for senders documented to write UTC without saying so.
_NAIVE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,12}))?", re.ASCII
)
_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def child(path: str, key: str | int) -> str:
    """The path of ``key`` under ``path``; keys that are not plain names are quoted."""
    if isinstance(key, int):
        return f"{'' if path == ROOT else path}[{key}]"
    if _SIMPLE_KEY.fullmatch(key):
        return key if path in ("", ROOT) else f"{path}.{key}"
    quoted = f'["{key}"]'
    return quoted if path in ("", ROOT) else f"{path}{quoted}"


def as_mapping(value: object, path: str) -> dict[str, object]:
    """``value`` as a JSON object, or MalformedPayload naming ``path``."""
    if not isinstance(value, dict):
        raise MalformedPayload(f"expected an object, got {_kind(value)}", path)
    return value


def field(obj: dict[str, object], key: str, path: str) -> object:
    """The value under ``key`` that must be present and not null."""
    value = obj.get(key)
    if value is None:
        raise MalformedPayload(f"missing required field {key!r}", child(path, key))
    return value


def sub_mapping(obj: dict[str, object], key: str, path: str) -> dict[str, object]:
    """The required object under ``key``."""
    return as_mapping(field(obj, key, path), child(path, key))


def optional_mapping(obj: dict[str, object], key: str, path: str) -> dict[str, object] | None:
    """The object under ``key``, or None when absent or null."""
    value = obj.get(key)
    return None if value is None else as_mapping(value, child(path, key))


def string(obj: dict[str, object], key: str, path: str, *, max_len: int = 1024) -> str:
    """The required, bounded string under ``key`` (not necessarily an identifier)."""
    value = field(obj, key, path)
    if not isinstance(value, str):
        raise MalformedPayload(f"expected a string, got {_kind(value)}", child(path, key))
    if len(value) > max_len:
        raise MalformedPayload(f"longer than {max_len} characters", child(path, key))
    return value


def optional_string(
    obj: dict[str, object], key: str, path: str, *, max_len: int = 1024
) -> str | None:
    """The bounded string under ``key``, or None when absent or null."""
    return None if obj.get(key) is None else string(obj, key, path, max_len=max_len)


def integer(obj: dict[str, object], key: str, path: str, *, low: int, high: int) -> int:
    """The required integer under ``key`` within [low, high]; booleans are not integers."""
    value = field(obj, key, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedPayload(f"expected an integer, got {_kind(value)}", child(path, key))
    if not low <= value <= high:
        raise MalformedPayload(f"out of range [{low}, {high}]", child(path, key))
    return value


def check_identifier(value: object, path: str) -> str:
    """``value`` if it is an identifier: 1-256 printable characters, not "." or "..".

    One rule for every id that reaches the ledger (vm, host, snapshot, event), the same as
    the generic form's (``validation.check_identifier``), so an id that would be ambiguous
    or unprintable in an alert, or that no URL path can name, never gets in.
    """
    if not isinstance(value, str):
        raise MalformedPayload(f"expected a string identifier, got {_kind(value)}", path)
    if not 1 <= len(value) <= MAX_IDENTIFIER:
        raise MalformedPayload(f"identifier must be 1-{MAX_IDENTIFIER} characters", path)
    if not value.isprintable():
        raise MalformedPayload("identifier contains non-printable characters", path)
    if value in DOT_SEGMENTS:
        raise MalformedPayload("identifier must not be . or .., which no URL path can name", path)
    return value


def _is_identifier(value: str) -> bool:
    return 1 <= len(value) <= MAX_IDENTIFIER and value.isprintable() and value not in DOT_SEGMENTS


def name_identifier(value: object, path: str) -> str:
    """The identifier of a user-chosen name that is only a hint (a snapshot's name).

    A name that is an identifier is kept as it is. Any other string (empty, over 256
    characters, a no-break space, "..") becomes ``sha256:`` and the hex SHA-256 of its
    UTF-8 bytes: stable, so the creation and the revert of one snapshot still match, and
    the event that carries it is kept rather than refused. A name that itself starts with
    ``sha256:`` is hashed too, so two different names never give the same identifier.
    Only a value that is not a string is malformed.
    """
    if not isinstance(value, str):
        raise MalformedPayload(f"expected a string, got {_kind(value)}", path)
    if _is_identifier(value) and not value.startswith(HASHED_NAME_PREFIX):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return HASHED_NAME_PREFIX + digest


def optional_name_identifier(obj: dict[str, object], key: str, path: str) -> str | None:
    """``name_identifier`` of the value under ``key``, or None when absent or null."""
    value = obj.get(key)
    return None if value is None else name_identifier(value, child(path, key))


def identifier(obj: dict[str, object], key: str, path: str) -> str:
    """The required identifier under ``key``."""
    return check_identifier(field(obj, key, path), child(path, key))


def optional_identifier(obj: dict[str, object], key: str, path: str) -> str | None:
    """The identifier under ``key``, or None when absent or null."""
    value = obj.get(key)
    return None if value is None else check_identifier(value, child(path, key))


def unix_time(value: object, path: str) -> datetime:
    """Whole Unix seconds (JSON integer) as an aware UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedPayload(f"expected Unix seconds, got {_kind(value)}", path)
    if not _MIN_UNIX <= value <= _MAX_UNIX:
        raise MalformedPayload("Unix time out of range", path)
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=value)


def rfc3339_time(value: object, path: str, *, assume_utc: bool = False) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime.

    ``assume_utc`` also accepts a timestamp without offset and reads it as UTC; only for
    senders that are documented to write UTC that way (oslo.messaging).
    """
    if not isinstance(value, str):
        raise MalformedPayload(f"expected an RFC 3339 string, got {_kind(value)}", path)
    if len(value) > _MAX_TIME_TEXT:
        raise MalformedPayload("timestamp too long", path)
    match = _RFC3339.fullmatch(value)
    if match is not None:
        return _build(match.groups()[:7], _offset(match.groups()[7:]), path)
    naive = _NAIVE.fullmatch(value) if assume_utc else None
    if naive is None:
        raise MalformedPayload("not an RFC 3339 timestamp", path)
    return _build(naive.groups(), UTC, path)


def any_time(value: object, path: str) -> datetime:
    """Unix seconds or RFC 3339, for fields where senders use either."""
    if isinstance(value, str):
        return rfc3339_time(value, path)
    return unix_time(value, path)


def _offset(groups: tuple[str | None, ...]) -> timezone:
    zulu, sign, hours, minutes = groups
    if zulu is not None or hours is None or minutes is None:
        return UTC
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    return timezone(-delta if sign == "-" else delta)


def _build(parts: tuple[str | None, ...], tz: timezone, path: str) -> datetime:
    year, month, day, hour, minute, second, fraction = parts
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        local = datetime(
            int(str(year)), int(str(month)), int(str(day)),
            int(str(hour)), int(str(minute)), int(str(second)), micros, tzinfo=tz,
        )
        result = local.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise MalformedPayload(f"invalid timestamp: {exc}", path) from None
    if result.year < 1970:
        raise MalformedPayload("timestamp before 1970", path)
    return result


def _kind(value: object) -> str:
    """A short JSON-ish name for a value's type, for error messages."""
    names = {bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
