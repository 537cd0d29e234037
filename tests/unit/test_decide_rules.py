"""The pure rules of the decision service: nonce expiry and retention, the Redis shortcut, code matching."""

from __future__ import annotations

from datetime import UTC, datetime

import pyotp
import pytest

from replayguard.core.validation import NonceRequest
from replayguard.services.decide import (
    DecisionConfig,
    clock_guard_scope,
    match_code,
    nonce_expired,
    nonce_expiry_us,
)
from replayguard.services.tokens import OtpToken

NOW = 1_790_000_000.0
CONFIG = DecisionConfig(drift_steps=1, hotp_look_ahead=10, use_retention_s=86400, nonce_max_ttl_s=7 * 86400)
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def nonce(ttl_s: int = 300, issued_at: float | None = None) -> NonceRequest:
    issued = None if issued_at is None else datetime.fromtimestamp(issued_at, UTC)
    return NonceRequest("web-01", "login", b"n", ttl_s, issued, None)


@pytest.mark.parametrize(("issued_at", "ttl_s", "expired"), [
    (None, 1, False),  # no issued_at: nothing to expire by
    (NOW - 300, 300, False),  # exactly at its ttl: still valid
    (NOW - 301, 300, True),
    (NOW + 3600, 300, False),  # issued in the future (guest clock ahead): not expired
])
def test_nonce_expired(issued_at: float | None, ttl_s: int, expired: bool) -> None:
    """A nonce is expired only when its issued_at plus its ttl lies before now."""
    assert nonce_expired(nonce(ttl_s, issued_at), NOW) is expired


@pytest.mark.parametrize("ttl_s", [1, 300, 7 * 86400, 30 * 86400])
def test_nonce_without_issued_at_is_kept_for_the_longest_ttl(ttl_s: int) -> None:
    """Without issued_at nothing else can refuse the nonce later, so it is kept for at least
    nonce_max_ttl_s (and at least its own ttl)."""
    expiry = nonce_expiry_us(nonce(ttl_s), NOW, CONFIG.nonce_max_ttl_s)
    assert expiry >= int((NOW + max(ttl_s, CONFIG.nonce_max_ttl_s)) * 1e6)


@pytest.mark.parametrize("issued_at", [NOW - 100, NOW, NOW + 500])
def test_nonce_with_issued_at_is_kept_until_it_is_expired(issued_at: float) -> None:
    """With issued_at the use is kept at least until the nonce would be refused as expired anyway."""
    req = nonce(300, issued_at)
    expiry_s = nonce_expiry_us(req, NOW, CONFIG.nonce_max_ttl_s) / 1e6
    assert expiry_s > max(issued_at, NOW) + 300
    assert nonce_expired(req, expiry_s)  # once forgotten, the expiry check refuses it


def test_clock_guard_scope_is_per_deployment() -> None:
    """Instances sharing a pepper share a clock guard; another pepper names another one."""
    assert clock_guard_scope(b"a" * 32) == clock_guard_scope(b"a" * 32)
    assert clock_guard_scope(b"a" * 32) != clock_guard_scope(b"b" * 32)
    assert len(clock_guard_scope(b"a" * 32)) == 32


def _token(token_id: str, kind: str, secret: str = SECRET, last_counter: int = 0) -> OtpToken:
    return OtpToken(token_id, "alice", kind, secret, 6, 30, "SHA1", last_counter, token_id.encode().hex())


def test_match_code_finds_the_token_and_step_a_totp_code_belongs_to() -> None:
    """A TOTP code matches its token at its time step; the other token is skipped."""
    other = _token("tok_other", "totp", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
    mine = _token("tok_mine", "totp")
    code = pyotp.TOTP(SECRET).at(NOW)
    match = match_code([other, mine], code, NOW, CONFIG)
    assert match.token == mine and match.counters == (int(NOW // 30),)


def test_match_code_hotp_looks_ahead_from_the_last_counter() -> None:
    """An HOTP code matches at its counter within the look-ahead window around the last counter, and
    not beyond it (counters behind are matched so that the ledger can name them reused)."""
    token = _token("tok_h", "hotp", last_counter=20)
    hotp = pyotp.HOTP(SECRET)
    assert match_code([token], hotp.at(30), NOW, CONFIG).counters == (30,)
    assert match_code([token], hotp.at(15), NOW, CONFIG).counters == (15,)
    assert match_code([token], hotp.at(31), NOW, CONFIG).counters == ()


def test_match_code_without_a_match_names_the_first_token_or_none() -> None:
    """A code no token accepts matches no step, naming the principal's first token (or none at all)."""
    first, second = _token("tok_1", "totp"), _token("tok_2", "hotp")
    wrong = "000000" if pyotp.TOTP(SECRET).at(NOW) != "000000" else "111111"
    assert match_code([first, second], wrong, NOW, CONFIG).token == first
    assert match_code([first, second], wrong, NOW, CONFIG).counters == ()
    assert match_code([], wrong, NOW, CONFIG).token is None


def test_match_code_uses_each_tokens_own_period_digits_and_algorithm() -> None:
    """A token enrolled with 60 s, 8 digits and SHA256 is checked with those, not the defaults."""
    token = OtpToken("tok_x", "alice", "totp", SECRET, 8, 60, "SHA256", 0, "aa")
    code = pyotp.TOTP(SECRET, digits=8, digest="sha256", interval=60).at(NOW)
    assert match_code([token], code, NOW, CONFIG).counters == (int(NOW // 60),)
    hotp = OtpToken("tok_y", "alice", "hotp", SECRET, 8, 30, "SHA512", 0, "bb")
    assert match_code([hotp], pyotp.HOTP(SECRET, digits=8, digest="sha512").at(3), NOW, CONFIG).counters == (3,)


def test_match_code_uses_the_configured_drift_and_look_ahead() -> None:
    """The drift window and the HOTP look-ahead come from the configuration."""
    wide = DecisionConfig(drift_steps=3, hotp_look_ahead=25, use_retention_s=86400, nonce_max_ttl_s=86400)
    totp, hotp = _token("tok_t", "totp"), _token("tok_h", "hotp", last_counter=0)
    far_code = pyotp.TOTP(SECRET).at(NOW + 90)
    assert match_code([totp], far_code, NOW, CONFIG).counters == ()
    assert match_code([totp], far_code, NOW, wide).counters == (int(NOW // 30) + 3,)
    assert match_code([hotp], pyotp.HOTP(SECRET).at(20), NOW, CONFIG).counters == ()
    assert match_code([hotp], pyotp.HOTP(SECRET).at(20), NOW, wide).counters == (20,)


def test_clock_guard_scope_is_a_stable_name() -> None:
    """The scope is a fixed function of the pepper, so instances of different versions sharing keys agree."""
    import hashlib

    pepper = bytes(range(32))
    assert clock_guard_scope(pepper) == hashlib.sha256(b"replayguard-clock-guard\x00" + pepper).hexdigest()[:32]
