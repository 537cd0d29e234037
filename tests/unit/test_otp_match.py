"""``core.otp.match_code``: which token, and which steps or counters of it, a presented code matches.

One table, one row a case (arq's ``test_cron.py`` style): the principal's tokens, the code
(named by the secret and the step or counter it is computed at), the drift and look-ahead,
and the expected token id and counters. Codes come from pyotp, not from the code under test.
"""

from __future__ import annotations

import pyotp
import pytest

from replayguard.core.otp import HOTP_REPLAY_BEHIND, OtpToken, match_code, use_expiry_us

NOW = 1_790_000_000.0
STEP = int(NOW // 30)
A = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
B = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"


def token(token_id: str, kind: str, secret: str = A, *, last_counter: int = 0, digits: int = 6,
          period: int = 30, algorithm: str = "SHA1") -> OtpToken:
    return OtpToken(token_id, "alice", kind, secret, digits, period, algorithm, last_counter,
                    token_id.encode().hex())


def code(secret: str, counter: int, digits: int = 6, digest: str = "sha1") -> str:
    """The RFC 4226 value of ``counter`` (a TOTP code is the value of its time step)."""
    return pyotp.HOTP(secret, digits=digits, digest=digest).at(counter)


TOTP_A = token("totp_a", "totp")
TOTP_B = token("totp_b", "totp", B)
HOTP_A = token("hotp_a", "hotp", last_counter=20)
HOTP_FRESH = token("hotp_fresh", "hotp", B, last_counter=0)
TOTP_60 = token("totp_60", "totp", period=60)
HOTP_8 = token("hotp_8", "hotp", digits=8, algorithm="SHA512", last_counter=2)
TOTP_8 = token("totp_8", "totp", digits=8, period=60, algorithm="SHA256")

# tokens, code, drift_steps, look_ahead -> token id, counters
CASES = [
    pytest.param([TOTP_A], code(A, STEP), 1, 10, "totp_a", (STEP,), id="totp: the current step"),
    pytest.param([TOTP_A], code(A, STEP - 1), 1, 10, "totp_a", (STEP - 1,), id="totp: one step behind, drift 1"),
    pytest.param([TOTP_A], code(A, STEP + 1), 1, 10, "totp_a", (STEP + 1,), id="totp: one step ahead, drift 1"),
    pytest.param([TOTP_A], code(A, STEP - 2), 1, 10, "totp_a", (), id="totp: two behind, drift 1: no match"),
    pytest.param([TOTP_A], code(A, STEP + 2), 1, 10, "totp_a", (), id="totp: two ahead, drift 1: no match"),
    pytest.param([TOTP_A], code(A, STEP - 2), 2, 10, "totp_a", (STEP - 2,), id="totp: two behind, drift 2"),
    pytest.param([TOTP_A], code(A, STEP + 3), 3, 10, "totp_a", (STEP + 3,), id="totp: three ahead, drift 3"),
    pytest.param([TOTP_A], code(A, STEP + 1), 0, 10, "totp_a", (), id="totp: drift 0 takes the current step only"),
    pytest.param([TOTP_60], code(A, int(NOW // 60)), 1, 10, "totp_60", (int(NOW // 60),),
                 id="totp: the token's own period"),
    pytest.param([TOTP_60], code(A, STEP), 1, 10, "totp_60", (), id="totp: a 30 s step's code, 60 s token"),
    pytest.param([TOTP_A], code(A, STEP)[:5], 1, 10, "totp_a", (), id="too few digits"),
    pytest.param([TOTP_A], code(A, STEP) + "0", 1, 10, "totp_a", (), id="too many digits"),
    pytest.param([TOTP_A], code(A, STEP)[:5] + "x", 1, 10, "totp_a", (), id="not all digits"),
    pytest.param([TOTP_A], "١٢٣٤٥٦", 1, 10, "totp_a", (), id="non-ASCII digits"),
    pytest.param([TOTP_A], "", 1, 10, "totp_a", (), id="empty code"),
    pytest.param([HOTP_A], code(A, 21), 1, 10, "hotp_a", (21,), id="hotp: the next counter"),
    pytest.param([HOTP_A], code(A, 30), 1, 10, "hotp_a", (30,), id="hotp: look-ahead's last counter"),
    pytest.param([HOTP_A], code(A, 31), 1, 10, "hotp_a", (), id="hotp: past the look-ahead: no match"),
    pytest.param([HOTP_A], code(A, 31), 1, 11, "hotp_a", (31,), id="hotp: a wider look-ahead"),
    pytest.param([HOTP_A], code(A, 20), 1, 10, "hotp_a", (20,), id="hotp: the last counter (a replay)"),
    pytest.param([HOTP_A], code(A, 11), 1, 10, "hotp_a", (11,), id="hotp: look-ahead behind, its first counter"),
    pytest.param([HOTP_A], code(A, 10), 1, 10, "hotp_a", (10,),
                 id="hotp: further behind: matched for a replay only (test_hotp_replay_only)"),
    pytest.param([HOTP_FRESH], code(B, 0), 1, 10, "hotp_fresh", (0,), id="hotp: counter 0 of a new token"),
    pytest.param([HOTP_8], code(A, 3, 8, "sha512"), 1, 10, "hotp_8", (3,),
                 id="hotp: the token's own digits and algorithm"),
    pytest.param([HOTP_8], code(A, 3)[:6], 1, 10, "hotp_8", (), id="hotp: a 6-digit code, 8-digit token"),
    pytest.param([TOTP_8], code(A, int(NOW // 60), 8, "sha256"), 1, 10, "totp_8", (int(NOW // 60),),
                 id="totp: 60 s, 8 digits, SHA256"),
    pytest.param([TOTP_8], code(A, int(NOW // 60), 8), 1, 10, "totp_8", (), id="totp: SHA1's code, SHA256 token"),
    pytest.param([TOTP_A, TOTP_B], code(B, STEP), 1, 10, "totp_b", (STEP,), id="two tokens: the second's code"),
    pytest.param([TOTP_B, HOTP_A], code(A, 25), 1, 10, "hotp_a", (25,), id="totp then hotp: the hotp's code"),
    pytest.param([TOTP_A, TOTP_B], "000000", 1, 10, "totp_a", (), id="two tokens, no match: the first named"),
    pytest.param([], code(A, STEP), 1, 10, None, (), id="no tokens: none named"),
]


@pytest.mark.parametrize(("tokens", "presented", "drift_steps", "look_ahead", "token_id", "counters"), CASES)
def test_match_code(tokens: list[OtpToken], presented: str, drift_steps: int, look_ahead: int,
                    token_id: str | None, counters: tuple[int, ...]) -> None:
    """A code matches the token and the steps or counters the table row names, and nothing else."""
    match = match_code(tokens, presented, now_s=NOW, drift_steps=drift_steps, look_ahead=look_ahead)
    assert (match.token.id if match.token else None, match.counters) == (token_id, counters)


@pytest.mark.parametrize(("tok", "counters", "retention_s", "drift_steps", "expected_us"), [
    pytest.param(TOTP_A, (STEP,), 604800, 1, int(NOW * 1e6) + 604800 * 1_000_000, id="totp: long retention rules"),
    pytest.param(TOTP_A, (STEP,), 30, 1, ((STEP + 2) * 30 + 60) * 1_000_000, id="totp: kept while accepted"),
    pytest.param(TOTP_A, (STEP - 1, STEP + 1), 30, 1, ((STEP + 3) * 30 + 60) * 1_000_000,
                 id="totp: the latest step matched"),
    pytest.param(TOTP_60, (int(NOW // 60),), 1, 0, ((int(NOW // 60) + 1) * 60 + 60) * 1_000_000,
                 id="totp: the token's period, no drift"),
    pytest.param(HOTP_A, (21,), 30, 1, int(NOW * 1e6) + 30 * 1_000_000, id="hotp: the retention"),
])
def test_use_expiry(tok: OtpToken, counters: tuple[int, ...], retention_s: int, drift_steps: int,
                    expected_us: int) -> None:
    """An OTP use's row is kept for the retention, and a TOTP one never less than until its
    code stops being accepted (the end of its latest matched step plus the drift) and a minute."""
    assert use_expiry_us(tok, counters, now_us=int(NOW * 1e6), retention_s=retention_s,
                         drift_steps=drift_steps) == expected_us


FAR = token("hotp_far", "hotp", last_counter=HOTP_REPLAY_BEHIND + 50)


@pytest.mark.parametrize(("tokens", "counter", "counters", "replay_only"), [
    pytest.param([FAR], FAR.last_counter - 9, (FAR.last_counter - 9,), False, id="within the look-ahead behind"),
    pytest.param([FAR], FAR.last_counter - 10, (FAR.last_counter - 10,), True, id="just past the look-ahead"),
    pytest.param([FAR], 51, (51,), True, id="HOTP_REPLAY_BEHIND behind: the last looked at"),
    pytest.param([FAR], 50, (), False, id="further: no match"),
    pytest.param([TOTP_A, FAR], FAR.last_counter - 20, (FAR.last_counter - 20,), True, id="after a TOTP token"),
])
def test_hotp_replay_only(tokens: list[OtpToken], counter: int, counters: tuple[int, ...], replay_only: bool) -> None:
    """An HOTP code that matches nothing within the look-ahead is looked for up to
    HOTP_REPLAY_BEHIND counters behind the token's counter, as a replay-only match (never
    accepted: rg_decide names it a replay when its use is recorded, else invalid)."""
    match = match_code(tokens, code(A, counter), now_s=NOW, drift_steps=1, look_ahead=10)
    assert (match.counters, match.replay_only) == (counters, replay_only)
