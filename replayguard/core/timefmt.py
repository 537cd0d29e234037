"""Times on output: microseconds since the epoch rendered as RFC 3339 UTC (CONTRACT §3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# What datetime can hold; a stored value outside it (no input reaches it: input is
# bounded to years 1970-9999) is printed at the nearest bound rather than failing.
_MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


def rfc3339_us(us: int | None) -> str | None:
    """``2026-11-29T10:05:00.123456Z``; exact (integer arithmetic, no float rounding).

    The year always has four digits (``strftime("%Y")`` prints year 1 as ``1``).
    """
    if us is None:
        return None
    m = _EPOCH + timedelta(microseconds=min(max(us, _MIN_US), _MAX_US))
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
            f".{m.microsecond:06d}Z")


def to_us(moment: datetime) -> int:
    """An aware datetime as microseconds since the epoch, exactly."""
    return (moment - _EPOCH) // timedelta(microseconds=1)
