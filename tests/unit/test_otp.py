"""The pure OTP core against the RFC test vectors, and its window rules."""

from __future__ import annotations

import base64
import csv
from collections.abc import Callable
from pathlib import Path

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replayguard.core import otp

VECTORS = Path(__file__).resolve().parent.parent / "data" / "vectors"
SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}


def _rows(name: str) -> list[list[str]]:
    with (VECTORS / name).open() as handle:
        return list(csv.reader(line for line in handle if not line.startswith("#")))


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode()


HOTP_VECTORS = [(int(c), v) for c, v in _rows("rfc4226_appendix_d.csv")]
TOTP_VECTORS = [(int(t), int(s, 16), v, m) for t, s, v, m in _rows("rfc6238_appendix_b.csv")]


@pytest.mark.parametrize(("counter", "expected"), HOTP_VECTORS)
def test_hotp_matches_rfc4226_appendix_d(counter: int, expected: str) -> None:
    """Every HOTP value of RFC 4226 Appendix D is reproduced."""
    assert otp.hotp_code(_b32(SEEDS["SHA1"]), counter) == expected


@pytest.mark.parametrize(("unix_time", "step", "expected", "mode"), TOTP_VECTORS)
def test_totp_matches_rfc6238_appendix_b(unix_time: int, step: int, expected: str, mode: str) -> None:
    """Every TOTP value of RFC 6238 Appendix B matches at exactly its own time step."""
    assert otp.totp_step(unix_time) == step
    found = otp.totp_matches(_b32(SEEDS[mode]), expected, now_s=unix_time, drift=0, digits=8, algorithm=mode)
    assert found == [step]


@pytest.mark.parametrize(("offset", "drift", "matches"), [
    (0, 1, True), (30, 1, True), (-30, 1, True), (60, 1, False), (-60, 1, False),
    (60, 2, True), (-90, 2, False), (29, 0, True), (30, 0, False),
])
def test_totp_drift_window(offset: int, drift: int, matches: bool) -> None:
    """A code is valid within ±drift steps of the service's clock and not beyond."""
    secret = _b32(SEEDS["SHA1"])
    issued_at = 1_111_111_080  # the start of a step
    code = otp.hotp_code(secret, otp.totp_step(issued_at))
    found = otp.totp_matches(secret, code, now_s=issued_at + offset, drift=drift)
    assert (otp.totp_step(issued_at) in found) is matches


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "12 456", "１２３４５６", "-12345"])  # noqa: RUF001 - fullwidth digits on purpose
def test_malformed_codes_match_nothing(code: str) -> None:
    """Codes of the wrong length or with non-ASCII-digit characters never match."""
    assert otp.totp_matches(_b32(SEEDS["SHA1"]), code, now_s=59) == []


def test_hotp_look_ahead_and_behind() -> None:
    """HOTP finds counters up to look_ahead past the last one, and behind it (to name reuse)."""
    secret = _b32(SEEDS["SHA1"])
    assert otp.hotp_matches(secret, "520489", last_counter=4, look_ahead=5) == [9]
    assert otp.hotp_matches(secret, "520489", last_counter=3, look_ahead=5) == []
    assert otp.hotp_matches(secret, "287082", last_counter=4, look_ahead=5) == [1]
    assert otp.hotp_matches(secret, "755224", last_counter=-1, look_ahead=3) == [0]


@settings(max_examples=300, deadline=None)
@given(secret=st.binary(min_size=16, max_size=64), counter=st.integers(0, 2**63 - 1),
       digits=st.integers(6, 10), algorithm=st.sampled_from(sorted(otp.ALGORITHMS)))
def test_codes_are_pyotps_codes(secret: bytes, counter: int, digits: int, algorithm: str) -> None:
    """The one-shot HMAC path gives exactly what pyotp's HOTP gives."""
    b32 = _b32(secret)
    reference = pyotp.HOTP(b32, digits=digits, digest=otp.ALGORITHMS[algorithm])
    assert otp.hotp_code(b32, counter, digits=digits, algorithm=algorithm) == reference.at(counter)


@settings(max_examples=200, deadline=None)
@given(windows=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 300)), min_size=1, max_size=12),
       code=st.sampled_from(["755224", "520489", "287082", "000000"]))
def test_kept_code_windows_match_what_each_counter_computes(windows: list[tuple[int, int]], code: str) -> None:
    """Whatever sequence of counter windows is asked for (forward, back, overlapping, apart,
    wider than what is kept), the matches are those of computing every counter afresh."""
    secret = _b32(SEEDS["SHA1"])
    for low, span in windows:
        expected = [c for c in range(low, low + span) if otp.hotp_code(secret, c) == code]
        assert otp._matching(secret, code, range(low, low + span), 6, "SHA1") == expected


def test_hotp_code_windows_are_kept_bounded() -> None:
    """A secret's kept window never holds more than ``_WINDOW`` values, however far its
    counter moves."""
    secret = _b32(SEEDS["SHA256"])
    for last in range(0, 2_000, 7):
        otp.hotp_matches(secret, "123456", last_counter=last, algorithm="SHA256")
        otp.hotp_replayed(secret, "123456", last_counter=last, algorithm="SHA256")
        assert len(otp._hotp(secret, 6, "SHA256")._values) <= otp._WINDOW


def _outcome(call: Callable[[], bytes]) -> bytes | type[BaseException]:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)


_B32_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567abz=0189 -\u0131\u00df\u017f"


@pytest.mark.parametrize("text", [
    "", "=", "========", "JBSWY3DP", "jbswy3dp", "JBSWY3DPEHPK3PXP", "MZXW6===", "MZXW6YQ=", "MZXQ====",
    "MY======", "MZXW6YTB", "MZXW6YTBOI======", "M=======", "MZX=====", "MZXW6Y==", "MZ=XW6YQ", "MZXW6YQ",
    "MZXW 6YQ", "MZXW6YQ1", "MZXW6YQ8", "\u0131ZXW6YQ=", "MZXW6Y\u017f=", "MZXW6YQ=\n", "MZXW6YQ=MZXW6YQ=",
])
def test_secret_decoding_is_the_standard_librarys(text: str) -> None:
    """``otp.b32decode`` returns what ``base64.b32decode(..., casefold=True)`` returns and raises
    what it raises: padding of every length, lower case, a digit outside the alphabet, '='
    inside, and non-ASCII letters whose upper case is ASCII."""
    assert _outcome(lambda: otp.b32decode(text)) == _outcome(lambda: base64.b32decode(text, casefold=True))


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(alphabet=_B32_CHARS, max_size=40),
                      st.binary(max_size=40).map(lambda raw: base64.b32encode(raw).decode()),
                      st.binary(max_size=40).map(lambda raw: base64.b32encode(raw).decode().lower().rstrip("="))),
       digits=st.integers(4, 11))
def test_secret_keys_are_pyotps(text: str, digits: int) -> None:
    """``otp.secret_key`` is pyotp's decoded secret, or the same exception pyotp raises
    (wrong digits, bad base32, fewer than 112 bits), for any text."""
    assert _outcome(lambda: otp.secret_key(text, digits)) == _outcome(
        lambda: pyotp.HOTP(text, digits=digits).byte_secret())
    assert _outcome(lambda: otp.b32decode(text)) == _outcome(lambda: base64.b32decode(text, casefold=True))
