"""Keyed digests: the only form in which a credential is ever stored or compared.

HMAC-SHA256 under the pepper, over the credential's kind, scope and value, NUL-separated
so that no two (scope, value) pairs can produce the same message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from .mac import keyed


def digest(pepper: bytes, kind: str, scope: str, value: bytes | str) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    message = kind.encode() + b"\x00" + scope.encode("utf-8") + b"\x00" + raw
    return keyed(pepper).digest(message)


# HMAC's block size per hash (RFC 2104 §2): a longer key is hashed first, a shorter one
# padded with zero bytes to it.
_HMAC_BLOCK = {"SHA1": 64, "SHA256": 64, "SHA512": 128}


def _decoded(secret_b32: str) -> bytes:
    text = secret_b32.upper().replace(" ", "").rstrip("=")
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error:  # a length base32 cannot have: no codes either; the text names it
        return text.encode()


def _scope(otp_type: str, algorithm: str, period: int) -> str:
    return f"{otp_type}:{algorithm.upper()}:{period if otp_type == 'totp' else 0}"


def hmac_key(algorithm: str, secret: bytes) -> bytes:
    """The key HMAC really uses, up to its zero padding (RFC 2104 §2): ``secret`` hashed when
    it is longer than the block, then without trailing zero bytes. Two secrets give every
    code alike exactly when this is the same."""
    name = algorithm.upper()
    if len(secret) > _HMAC_BLOCK.get(name, 64):
        secret = hashlib.new(name.lower(), secret).digest()
    return secret.rstrip(b"\x00")


def secret_fingerprint(pepper: bytes, otp_type: str, algorithm: str, period: int, secret_b32: str) -> bytes:
    """Identity of an OTP credential, whichever token row holds it.

    Two enrolments of one secret (after a deletion, or for another principal) produce the
    same codes for the same counters, so their counters, high-water marks and uses are
    one credential's; so do two secrets HMAC treats as one key (``hmac_key``: one padded
    with zero bytes, or one longer than the block and its hash). The number of digits is
    left out on purpose: a 6-digit code is the tail of the 8-digit code of the same
    counter. The period is in (TOTP steps of another length are other counters), and so
    is the type.
    """
    return digest(pepper, "otp-credential", _scope(otp_type, algorithm, period),
                  hmac_key(algorithm, _decoded(secret_b32)))


def secret_fingerprint_as_enrolled(pepper: bytes, otp_type: str, algorithm: str, period: int,
                                   secret_b32: str) -> bytes:
    """The fingerprint of the secret's bytes as they are, which tokens enrolled before
    ``hmac_key`` took part carry until ``TokenStore.canonicalize_credentials`` moves them."""
    return digest(pepper, "otp-credential", _scope(otp_type, algorithm, period), _decoded(secret_b32))


def otp_digest(pepper: bytes, credential: str, counter: int) -> bytes:
    """Identity of one OTP use: a credential's time step (TOTP) or counter (HOTP).

    ``credential`` is the hex of the credential's ``secret_fingerprint``.
    """
    return digest(pepper, "otp", credential, str(counter))


def receipt_request_digest(pepper: bytes, vm_id: str, request_id: str) -> bytes:
    """Identity of a caller's request on a VM (``receipt_request``, ``receipt_unanswered``)."""
    return digest(pepper, "receipt-request", vm_id, request_id)


def nonce_digest(pepper: bytes, scope: str, nonce: bytes) -> bytes:
    return digest(pepper, "nonce", scope, nonce)


def api_token_digest(pepper: bytes, token: str) -> bytes:
    return digest(pepper, "api-token", "", token)
