"""RFC 4226 (HOTP) and RFC 6238 (TOTP) matching, with the time or counter as a parameter.

These functions only say which token, and which time steps or counters of it, a presented
code matches (``match_code``); whether that step may still be used (the high-water mark)
is decided atomically by the ledger. Comparisons are constant-time.
"""

from __future__ import annotations

import array
import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyotp

from .mac import KeyedMac
from .nonces import EXPIRY_GRACE_S

ALGORITHMS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}


# Base32's alphabet (RFC 4648 §6) as the digits of ``int(text, 32)``.
_B32_AS_DIGITS = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789abcdefghijklmnopqrstuv")
_B32_TEXT = re.compile(r"[A-Z2-7]+")
_B32_KEPT = {0: 5, 1: 4, 3: 3, 4: 2, 6: 1}  # padding characters: the last quantum's bytes


def b32decode(text: str) -> bytes:
    """``base64.b32decode(text, casefold=True)``, byte for byte and error for error.

    The standard library's decoder is Python, about 49,000 instructions for a 32-character
    secret, and a token's secret is decoded each time its keyed HOTP is made. Well-formed
    text (ASCII, whole 8-character quanta, then a padding RFC 4648 allows) is read here as
    one base-32 integer; anything else is the standard library's to decode or refuse.
    """
    upper = text.upper()
    data = upper.rstrip("=")
    pad = len(upper) - len(data)
    if (not text.isascii() or len(upper) % 8 or pad not in _B32_KEPT or not data
            or _B32_TEXT.fullmatch(data) is None):
        return base64.b32decode(text, casefold=True)
    size = len(upper) // 8 * 5
    raw = (int(data.translate(_B32_AS_DIGITS), 32) << (5 * pad)).to_bytes(size, "big")
    return raw[:size - 5 + _B32_KEPT[pad]]


def secret_key(secret_b32: str, digits: int) -> bytes:
    """The HMAC key of an OTP secret, refused as pyotp refuses it: what
    ``pyotp.HOTP(secret_b32, digits=digits).byte_secret()`` returns, or the ``ValueError``
    (``binascii.Error`` included) its constructor raises."""
    if not 6 <= digits <= 10:
        raise ValueError("digits must be between 6 and 10")
    key = b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    if len(key) * 8 < pyotp.OTP.min_secret_length_bits:
        raise ValueError(f"Secrets must be at least {pyotp.OTP.min_secret_length_bits} bits after decoding")
    return key


class _KeyedHOTP:
    """RFC 4226 §5.3 over a key decoded and padded once (``mac.KeyedMac``).

    The secret is checked and decoded as pyotp does (``secret_key``). pyotp's ``at``
    builds an ``hmac.HMAC`` object per code, which is most of the cost of checking a
    TOTP code through pyotp (three codes per check). The tests hold this to pyotp's own
    codes as well as to the RFC vectors.

    ``codes`` keeps the values of the last window of counters it was asked for (at most
    ``_WINDOW`` of them, packed, 8 bytes each): a counter's value never changes, and an HOTP
    check asks for nearly the same ~120 counters each time (``hotp_matches`` and
    ``hotp_replayed``), a TOTP check for the same three steps for 30 s. The values are
    derived from the secret this object holds already.
    """

    __slots__ = ("_base", "_digits", "_mac", "_modulus", "_values")

    def __init__(self, secret_b32: str, digits: int, algorithm: str) -> None:
        ALGORITHMS[algorithm]  # an unknown algorithm raises KeyError first, as it always has
        self._mac = KeyedMac(secret_key(secret_b32, digits), algorithm.lower())
        self._digits = digits
        self._modulus = 10 ** digits
        self._base = 0
        self._values = array.array("Q")

    def value(self, counter: int) -> int:
        """The code of ``counter`` as an integer (``at`` without the leading zeros)."""
        mac = self._mac.digest(counter.to_bytes(8, "big"))
        offset = mac[-1] & 0x0F
        code: int = (int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFF_FFFF) % self._modulus
        return code

    def at(self, counter: int) -> str:
        return str(self.value(counter)).zfill(self._digits)

    def codes(self, low: int, high: int) -> array.array[int]:
        """The values of counters ``low`` to ``high - 1``, computed only where not kept."""
        if high - low > _WINDOW:
            return array.array("Q", map(self.value, range(low, high)))
        base, values = self._base, self._values
        end = base + len(values)
        if not values or low < base or low > end:
            values = array.array("Q", map(self.value, range(low, high)))
            base = low
        elif high > end:
            values.extend(map(self.value, range(end, high)))
            if len(values) > _WINDOW:
                drop = min(len(values) - _WINDOW, low - base)
                del values[:drop]
                base += drop
        self._base, self._values = base, values
        return values[low - base:high - base]


# The most counters ``_KeyedHOTP.codes`` keeps per secret: an HOTP check's ~120 counters
# (``HOTP_REPLAY_BEHIND`` behind to ``look_ahead`` ahead, at the default look-ahead) and
# the counter's progress since. A larger window is computed each time.
_WINDOW = 256


@functools.lru_cache(maxsize=4096)  # the token cache's working set; secrets live there already
def _hotp(secret_b32: str, digits: int, algorithm: str) -> _KeyedHOTP:
    return _KeyedHOTP(secret_b32, digits, algorithm)


def hotp_code(secret_b32: str, counter: int, *, digits: int = 6, algorithm: str = "SHA1") -> str:
    """The HOTP value of ``counter`` (RFC 4226 §5.3)."""
    return _hotp(secret_b32, digits, algorithm).at(counter)


def totp_step(now_s: float, period: int = 30, t0: int = 0) -> int:
    """The RFC 6238 time step T = floor((now - T0) / X)."""
    return int((now_s - t0) // period)


def _matching(secret_b32: str, code: str, counters: range, digits: int, algorithm: str) -> list[int]:
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return []
    try:
        generator = _hotp(secret_b32, digits, algorithm)
    except (binascii.Error, ValueError):
        # A secret stored before enrolment checked that it decodes: it has no codes, so it
        # matches nothing, and a wrong code still counts towards the principal's lockout.
        return []
    low, high = max(counters.start, 0), max(counters.stop, 0)
    wanted = int(code).to_bytes(8, "big")
    # Every candidate is compared, so the time taken does not say which matched.
    return [c for c, v in zip(range(low, high), generator.codes(low, high), strict=True)
            if hmac.compare_digest(v.to_bytes(8, "big"), wanted)]


def totp_matches(
    secret_b32: str, code: str, *, now_s: float, drift: int = 1, period: int = 30,
    digits: int = 6, algorithm: str = "SHA1",
) -> list[int]:
    """Time steps within ±``drift`` of the service's clock at which ``code`` is valid."""
    step = totp_step(now_s, period)
    return _matching(secret_b32, code, range(step - drift, step + drift + 1), digits, algorithm)


def hotp_matches(
    secret_b32: str, code: str, *, last_counter: int, look_ahead: int = 10,
    digits: int = 6, algorithm: str = "SHA1",
) -> list[int]:
    """Counters that ``code`` matches, from ``look_ahead`` behind to ``look_ahead`` ahead.

    Counters at or behind ``last_counter`` are returned too, so that a replayed code is
    named ``reused`` rather than ``invalid``; the ledger accepts only counters ahead.
    """
    low = max(0, last_counter - look_ahead + 1)
    return _matching(secret_b32, code, range(low, last_counter + look_ahead + 1), digits, algorithm)


# How far behind its token's counter an HOTP code is still looked for, once it matched
# nothing within the look-ahead: a code used there is named a replay (``reused`` or
# ``replay_after_rollback``) when the ledger still records its use, instead of ``invalid``.
HOTP_REPLAY_BEHIND = 100


def hotp_replayed(
    secret_b32: str, code: str, *, last_counter: int, look_ahead: int = 10,
    digits: int = 6, algorithm: str = "SHA1",
) -> list[int]:
    """Counters behind ``hotp_matches``' window, up to ``HOTP_REPLAY_BEHIND`` behind
    ``last_counter``, that ``code`` matches: never accepted (they are at or behind the
    counter), only looked up among recorded uses."""
    low = max(0, last_counter - max(HOTP_REPLAY_BEHIND, look_ahead) + 1)
    high = max(0, last_counter - look_ahead + 1)
    return _matching(secret_b32, code, range(low, high), digits, algorithm)


@dataclass(frozen=True, slots=True)
class OtpToken:
    """An enrolled OTP token as the decision service matches codes against it."""

    id: str
    principal: str
    type: str
    secret_b32: str
    digits: int
    period: int
    algorithm: str
    last_counter: int
    credential: str  # hex of the secret's fingerprint (otp_credentials)


@dataclass(frozen=True, slots=True)
class Match:
    """The token a code matches and its matching steps or counters; no counters is no match,
    and then ``token`` is the principal's first token (None when the principal has none).
    ``replay_only``: the counters are HOTP counters far behind the token's (``hotp_replayed``):
    the code is a replay if a use of one of them is recorded, else invalid."""

    token: OtpToken | None
    counters: tuple[int, ...]
    replay_only: bool = False


def use_expiry_us(token: OtpToken, counters: Sequence[int], *, now_us: int, retention_s: int,
                  drift_steps: int) -> int:
    """When retention may drop the details of an OTP's use (its ``uses`` row): after
    ``retention_s``, and never while the code is still accepted, so that a replay is
    classified (``replay_after_rollback``) for as long as it can be presented. A TOTP code
    of step ``s`` is accepted until step ``s + drift_steps`` ends; the latest step it
    matched bounds the one accepted. A grace (as for nonces) is added after that end."""
    kept = now_us + retention_s * 1_000_000
    if token.type != "totp" or not counters:
        return kept
    accepted_until_us = (max(counters) + drift_steps + 1) * token.period * 1_000_000
    return max(kept, accepted_until_us + EXPIRY_GRACE_S * 1_000_000)


def match_code(tokens: Sequence[OtpToken], code: str, *, now_s: float, drift_steps: int, look_ahead: int) -> Match:
    """Which token (and which steps or counters of it) a presented code matches, first token first.

    TOTP tokens are tried within ±``drift_steps`` of ``now_s``, HOTP tokens ``look_ahead``
    around their last counter (``hotp_matches``), each with its own period, digits and algorithm.
    When none matches, HOTP tokens are tried further behind (``hotp_replayed``, a
    ``replay_only`` match).
    """
    for token in tokens:
        if token.type == "totp":
            found = totp_matches(token.secret_b32, code, now_s=now_s, drift=drift_steps,
                                 period=token.period, digits=token.digits, algorithm=token.algorithm)
        else:
            found = hotp_matches(token.secret_b32, code, last_counter=token.last_counter,
                                 look_ahead=look_ahead, digits=token.digits, algorithm=token.algorithm)
        if found:
            return Match(token, tuple(found))
    for token in tokens:
        if token.type == "hotp":
            found = hotp_replayed(token.secret_b32, code, last_counter=token.last_counter,
                                  look_ahead=look_ahead, digits=token.digits, algorithm=token.algorithm)
            if found:
                return Match(token, tuple(found), replay_only=True)
    return Match(tokens[0] if tokens else None, ())
