"""Keyed digests: the only form in which a credential is ever stored or compared.

HMAC-SHA256 under the pepper, over the credential's kind, scope and value, NUL-separated
so that no two (scope, value) pairs can produce the same message.
"""

from __future__ import annotations

import hmac


def digest(pepper: bytes, kind: str, scope: str, value: bytes | str) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    message = kind.encode() + b"\x00" + scope.encode("utf-8") + b"\x00" + raw
    return hmac.digest(pepper, message, "sha256")  # one-shot, in C


def otp_digest(pepper: bytes, token_id: str, counter: int) -> bytes:
    """Identity of one OTP use: a token's time step (TOTP) or counter (HOTP)."""
    return digest(pepper, "otp", token_id, str(counter))


def nonce_digest(pepper: bytes, scope: str, nonce: bytes) -> bytes:
    return digest(pepper, "nonce", scope, nonce)


def api_token_digest(pepper: bytes, token: str) -> bytes:
    return digest(pepper, "api-token", "", token)
