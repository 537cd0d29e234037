"""Times on output: microseconds since the epoch rendered as RFC 3339 UTC (CONTRACT §3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339_us(us: int | None) -> str | None:
    """``2026-11-29T10:05:00.123456Z``; exact (integer arithmetic, no float rounding)."""
    if us is None:
        return None
    moment = _EPOCH + timedelta(microseconds=us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_us(moment: datetime) -> int:
    """An aware datetime as microseconds since the epoch, exactly."""
    return (moment - _EPOCH) // timedelta(microseconds=1)
