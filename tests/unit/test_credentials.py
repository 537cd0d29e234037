"""Keyed digests: the one form a credential is stored and compared in."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from replayguard.core.credentials import api_token_digest, digest, nonce_digest, otp_digest

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
