"""Nonce time rules: when a nonce is refused as expired, and how long its use is remembered.

The ledger forgets a nonce's use once ``expires_us`` has passed (retention); these rules
make sure that forgetting it lets nothing in: by then the nonce is refused as expired
anyway, or, with no ``issued_at`` to expire by, it has been kept for the longest ttl the
service accepts.
"""

from __future__ import annotations

from .validation import NonceRequest

# A use is kept a minute past the moment its nonce expires: a margin, so that it is never
# forgotten before the nonce is refused as expired.
EXPIRY_GRACE_S = 60


def nonce_expired(req: NonceRequest, now_s: float) -> bool:
    """A nonce whose ``issued_at`` is older than its ttl is refused, remembered or not."""
    return req.issued_at is not None and req.issued_at.timestamp() + req.ttl_s < now_s


def nonce_expiry_us(req: NonceRequest, now_s: float, max_ttl_s: int) -> int:
    """How long the ledger must remember a nonce so that forgetting it lets nothing in."""
    if req.issued_at is None:
        return int((now_s + max(req.ttl_s, max_ttl_s)) * 1e6)
    return int((max(req.issued_at.timestamp(), now_s) + req.ttl_s + EXPIRY_GRACE_S) * 1e6)
