"""``core.nonces``: when a nonce is expired, and until when the ledger remembers its use.

Tables of (issued_at, ttl, now) → expected, one row a case; ``NOW`` is a fixed time, so
every expected value is exact.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from replayguard.core.nonces import EXPIRY_GRACE_S, nonce_expired, nonce_expiry_us
from replayguard.core.validation import NonceRequest

NOW = 1_790_000_000.0
DAY = 86_400
MAX_TTL_S = 7 * DAY


def nonce(ttl_s: int, issued_at: float | None = None) -> NonceRequest:
    issued = None if issued_at is None else datetime.fromtimestamp(issued_at, UTC)
    return NonceRequest("web-01", "login", b"n", ttl_s, issued, None)


@pytest.mark.parametrize(("issued_at", "ttl_s", "now", "expired"), [
    pytest.param(None, 1, NOW, False, id="no issued_at: nothing to expire by"),
    pytest.param(None, 1, NOW + 10 * DAY, False, id="no issued_at, much later"),
    pytest.param(NOW - 300, 300, NOW, False, id="exactly at its ttl: still valid"),
    pytest.param(NOW - 301, 300, NOW, True, id="a second past its ttl"),
    pytest.param(NOW - 300.5, 300, NOW, True, id="half a second past its ttl"),
    pytest.param(NOW, 300, NOW, False, id="issued now"),
    pytest.param(NOW + 3600, 300, NOW, False, id="issued in the future (guest clock ahead)"),
    pytest.param(NOW - DAY, DAY, NOW, False, id="a day's ttl, a day old"),
    pytest.param(NOW - DAY - 1, DAY, NOW, True, id="a day's ttl, a day and a second old"),
])
def test_nonce_expired(issued_at: float | None, ttl_s: int, now: float, expired: bool) -> None:
    """A nonce is expired only when its issued_at plus its ttl lies before now."""
    assert nonce_expired(nonce(ttl_s, issued_at), now) is expired


@pytest.mark.parametrize(("issued_at", "ttl_s", "max_ttl_s", "expires_at"), [
    pytest.param(None, 300, MAX_TTL_S, NOW + MAX_TTL_S, id="no issued_at: the longest ttl accepted"),
    pytest.param(None, 1, MAX_TTL_S, NOW + MAX_TTL_S, id="no issued_at, short ttl: still the longest"),
    pytest.param(None, 30 * DAY, MAX_TTL_S, NOW + 30 * DAY, id="no issued_at, a ttl over the longest: its own"),
    pytest.param(None, 300, 0, NOW + 300, id="no issued_at, no longest ttl: its own"),
    pytest.param(NOW, 300, MAX_TTL_S, NOW + 300 + EXPIRY_GRACE_S, id="issued now"),
    pytest.param(NOW - 100, 300, MAX_TTL_S, NOW + 300 + EXPIRY_GRACE_S,
                 id="issued in the past: counted from now"),
    pytest.param(NOW - 1000, 300, MAX_TTL_S, NOW + 300 + EXPIRY_GRACE_S,
                 id="already expired: counted from now"),
    pytest.param(NOW + 500, 300, MAX_TTL_S, NOW + 500 + 300 + EXPIRY_GRACE_S,
                 id="issued in the future: counted from issued_at"),
    pytest.param(NOW, 30 * DAY, MAX_TTL_S, NOW + 30 * DAY + EXPIRY_GRACE_S,
                 id="issued now, a ttl over the longest: its own"),
])
def test_nonce_expiry_us(issued_at: float | None, ttl_s: int, max_ttl_s: int, expires_at: float) -> None:
    """The use is remembered until the time the table row names, in microseconds."""
    assert nonce_expiry_us(nonce(ttl_s, issued_at), NOW, max_ttl_s) == int(expires_at * 1e6)


@pytest.mark.parametrize("issued_at", [NOW - 1000, NOW - 100, NOW, NOW + 500, NOW + 10 * DAY])
@pytest.mark.parametrize("ttl_s", [1, 300, DAY, 30 * DAY])
def test_a_forgotten_nonce_is_refused_as_expired(issued_at: float, ttl_s: int) -> None:
    """With issued_at, at the moment its use is forgotten the nonce is already refused as expired."""
    req = nonce(ttl_s, issued_at)
    assert nonce_expired(req, nonce_expiry_us(req, NOW, MAX_TTL_S) / 1e6)
