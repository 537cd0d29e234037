"""Keyed digests: the one form a credential is stored and compared in."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest

from replayguard.core.credentials import (
    api_token_digest,
    digest,
    hmac_key,
    nonce_digest,
    otp_digest,
    secret_fingerprint,
)

PEPPER = bytes(range(32))


def test_digest_is_hmac_sha256_of_kind_scope_value_nul_separated() -> None:
    """The digest is HMAC-SHA256 under the pepper of 'kind NUL scope NUL value' (a stored format)."""
    expected = hmac.new(PEPPER, b"nonce\x00login\x00n-1", hashlib.sha256).digest()
    assert digest(PEPPER, "nonce", "login", b"n-1") == expected
    assert digest(PEPPER, "nonce", "login", "n-1") == expected  # str and its UTF-8 bytes agree


def test_each_helper_names_its_kind_and_scope() -> None:
    """OTP, nonce and API-token digests are digests of their own kind, scope and value."""
    assert otp_digest(PEPPER, "tok_1", 57) == digest(PEPPER, "otp", "tok_1", "57")
    assert nonce_digest(PEPPER, "login", b"n") == digest(PEPPER, "nonce", "login", b"n")
    assert api_token_digest(PEPPER, "rgt_x") == digest(PEPPER, "api-token", "", "rgt_x")


@pytest.mark.parametrize(("a", "b"), [
    (("nonce", "s", b"v"), ("otp", "s", b"v")),  # kind
    (("nonce", "s1", b"v"), ("nonce", "s2", b"v")),  # scope
    (("nonce", "s", b"v1"), ("nonce", "s", b"v2")),  # value
    (("nonce", "ab", b"c"), ("nonce", "a", b"bc")),  # where scope ends (scopes never hold a NUL)
])
def test_different_credentials_never_share_a_digest(a: tuple[str, str, bytes], b: tuple[str, str, bytes]) -> None:
    """Changing the kind, the scope, the value or the split between them changes the digest."""
    assert digest(PEPPER, *a) != digest(PEPPER, *b)


def test_the_pepper_keys_every_digest() -> None:
    """Another pepper gives other digests: a stolen table cannot be matched without the key."""
    other = bytes(32)
    assert otp_digest(PEPPER, "tok_1", 1) != otp_digest(other, "tok_1", 1)
    assert nonce_digest(PEPPER, "s", b"n") != nonce_digest(other, "s", b"n")
    assert api_token_digest(PEPPER, "t") != api_token_digest(other, "t")


def test_otp_digest_names_the_step_and_the_token() -> None:
    """Two steps of one token, and one step of two tokens, are different uses."""
    assert otp_digest(PEPPER, "tok_1", 1) != otp_digest(PEPPER, "tok_1", 2)
    assert otp_digest(PEPPER, "tok_1", 1) != otp_digest(PEPPER, "tok_2", 1)


SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def test_secret_fingerprint_is_the_known_answer() -> None:
    """The fingerprint keys otp_credentials' high-water marks: derived otherwise after an
    upgrade, a secret enrolled again would start from no accepted step, and its used codes
    would pass again. It is HMAC-SHA256 of ("otp-credential", "<type>:<ALG>:<period>", secret)."""
    expected = hmac.digest(PEPPER, b"otp-credential\x00totp:SHA1:30\x00" + base64.b32decode(SECRET), "sha256")
    assert secret_fingerprint(PEPPER, "totp", "SHA1", 30, SECRET) == expected
    assert expected.hex() == "f60a1b7536cde17e8e4f1168b7e003c11279d03b525a977fe4e364f2445e69d0"
    hotp = hmac.digest(PEPPER, b"otp-credential\x00hotp:SHA1:0\x00" + base64.b32decode(SECRET), "sha256")
    assert secret_fingerprint(PEPPER, "hotp", "SHA1", 30, SECRET) == hotp  # an HOTP scope's period is 0


@pytest.mark.parametrize(("a", "b", "same"), [
    (("totp", "SHA1", 30, SECRET), ("totp", "sha1", 30, SECRET.lower()), True),  # case
    (("totp", "SHA1", 30, SECRET), ("totp", "SHA1", 30, " ".join(SECRET[i:i + 4] for i in range(0, 32, 4))), True),
    (("totp", "SHA1", 30, "JBSWY3DPEHPK3PXP"), ("totp", "SHA1", 30, "JBSWY3DPEHPK3PXP===="), True),  # padding
    (("hotp", "SHA1", 30, SECRET), ("hotp", "SHA1", 60, SECRET), True),  # HOTP has no period
    (("totp", "SHA1", 30, SECRET), ("totp", "SHA1", 60, SECRET), False),  # other steps, other counters
    (("totp", "SHA1", 30, SECRET), ("totp", "SHA256", 30, SECRET), False),
    (("totp", "SHA1", 30, SECRET), ("hotp", "SHA1", 30, SECRET), False),
    (("totp", "SHA1", 30, SECRET), ("totp", "SHA1", 30, "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"), False),
])
def test_one_secret_is_one_credential(a: tuple[str, str, int, str], b: tuple[str, str, int, str],
                                      same: bool) -> None:
    """The same secret written otherwise (case, spaces, padding) is one credential, and so
    is an HOTP secret whatever period its row names; another period, algorithm, type or
    secret is another (the number of digits is not an argument: it never separates them)."""
    assert (secret_fingerprint(PEPPER, *a) == secret_fingerprint(PEPPER, *b)) is same


def test_a_secret_base32_cannot_hold_is_fingerprinted_as_its_text() -> None:
    """A length base32 cannot have raises nothing: the text itself is fingerprinted, and it
    differs from every decodable secret's fingerprint under the same scope."""
    odd = secret_fingerprint(PEPPER, "totp", "SHA1", 30, "ABC")
    assert odd == hmac.digest(PEPPER, b"otp-credential\x00totp:SHA1:30\x00ABC", "sha256")


@pytest.mark.parametrize("algorithm", ["SHA1", "SHA256", "SHA512"])
def test_hmac_key_is_the_same_exactly_when_hmac_is(algorithm: str) -> None:
    """Differential against hmac itself: for keys padded with zero bytes, longer than the
    block and their hashes, and unrelated keys, two secrets give the same MAC exactly when
    ``hmac_key`` names one key, and exactly then share a fingerprint."""
    block = {"SHA1": 64, "SHA256": 64, "SHA512": 128}[algorithm]
    name = algorithm.lower()
    base, long = os.urandom(20), os.urandom(block + 7)
    hashed = hashlib.new(name, long).digest()
    keys = [base, base + b"\x00", base + b"\x00" * 12, os.urandom(20), long, hashed, hashed + b"\x00" * 3,
            b"\x00" * 5 + base, os.urandom(block)]
    message = os.urandom(8)
    for a in keys:
        for b in keys:
            same_mac = hmac.new(a, message, name).digest() == hmac.new(b, message, name).digest()
            assert same_mac == (hmac_key(algorithm, a) == hmac_key(algorithm, b)), (a.hex(), b.hex())
            fingerprints = {secret_fingerprint(PEPPER, "hotp", algorithm, 30, base64.b32encode(k).decode())
                            for k in (a, b)}
            assert (len(fingerprints) == 1) == same_mac, (a.hex(), b.hex())
