"""The decision service's own rules: the clock guard's scope, and the matching window taken
from its configuration (the matching and the nonce rules themselves are the core's:
test_otp_match.py, test_nonce_rules.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pyotp

from replayguard.core.otp import OtpToken
from replayguard.services.decide import DecisionConfig, DecisionService, clock_guard_scope

NOW = 1_790_000_000.0
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def test_clock_guard_scope_is_per_deployment() -> None:
    """Instances sharing a pepper share a clock guard; another pepper names another one."""
    assert clock_guard_scope(b"a" * 32) == clock_guard_scope(b"a" * 32)
    assert clock_guard_scope(b"a" * 32) != clock_guard_scope(b"b" * 32)
    assert len(clock_guard_scope(b"a" * 32)) == 32


def test_clock_guard_scope_is_the_known_answer() -> None:
    """The scope names rows already in clock_guard: an upgrade that derived it otherwise
    would start the host clock guard afresh, forgetting the highest TOTP time accepted."""
    assert clock_guard_scope(b"p" * 32) == "874d33575d7fa75197e0d9fb12d7139c"


def _service(drift_steps: int, look_ahead: int) -> DecisionService:
    config = DecisionConfig(drift_steps=drift_steps, hotp_look_ahead=look_ahead, use_retention_s=86400,
                            nonce_max_ttl_s=86400)
    return DecisionService(appender=cast(Any, None), tokens=cast(Any, None),
                           keys=cast(Any, SimpleNamespace(pepper=b"p" * 32)), config=config, clock=lambda: NOW)


def test_the_service_matches_with_its_configured_drift_and_look_ahead() -> None:
    """The drift window and the HOTP look-ahead the service matches with come from its configuration."""
    totp = OtpToken("tok_t", "alice", "totp", SECRET, 6, 30, "SHA1", 0, "aa")
    hotp = OtpToken("tok_h", "alice", "hotp", SECRET, 6, 30, "SHA1", 0, "bb")
    far_code, hotp_20 = pyotp.TOTP(SECRET).at(NOW + 90), pyotp.HOTP(SECRET).at(20)
    narrow, wide = _service(1, 10), _service(3, 25)
    assert narrow._match_code([totp], far_code, NOW).counters == ()
    assert wide._match_code([totp], far_code, NOW).counters == (int(NOW // 30) + 3,)
    assert narrow._match_code([hotp], hotp_20, NOW).counters == ()
    assert wide._match_code([hotp], hotp_20, NOW).counters == (20,)
