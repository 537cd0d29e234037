"""Keyed digests: the only form in which a credential is ever stored or compared.

HMAC-SHA256 under the pepper, over the credential's kind, scope and value, NUL-separated
so that no two (scope, value) pairs can produce the same message.
"""

from __future__ import annotations

import base64
import binascii

from .mac import keyed


def digest(pepper: bytes, kind: str, scope: str, value: bytes | str) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    message = kind.encode() + b"\x00" + scope.encode("utf-8") + b"\x00" + raw
    return keyed(pepper).digest(message)


def secret_fingerprint(pepper: bytes, otp_type: str, algorithm: str, period: int, secret_b32: str) -> bytes:
    """Identity of an OTP credential, whichever token row holds it.

    Two enrolments of one secret (after a deletion, or for another principal) produce the
    same codes for the same counters, so their counters, high-water marks and uses are
    one credential's. The number of digits is left out on purpose: a 6-digit code is the
    tail of the 8-digit code of the same counter. The period is in (TOTP steps of another
    length are other counters), and so is the type.
    """
    text = secret_b32.upper().replace(" ", "").rstrip("=")
    try:
        secret = base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error:  # a length base32 cannot have: no codes either; the text names it
        secret = text.encode()
    scope = f"{otp_type}:{algorithm.upper()}:{period if otp_type == 'totp' else 0}"
    return digest(pepper, "otp-credential", scope, secret)


def otp_digest(pepper: bytes, credential: str, counter: int) -> bytes:
    """Identity of one OTP use: a credential's time step (TOTP) or counter (HOTP).

    ``credential`` is the hex of the credential's ``secret_fingerprint``.
    """
    return digest(pepper, "otp", credential, str(counter))


def nonce_digest(pepper: bytes, scope: str, nonce: bytes) -> bytes:
    return digest(pepper, "nonce", scope, nonce)


def api_token_digest(pepper: bytes, token: str) -> bytes:
    return digest(pepper, "api-token", "", token)
