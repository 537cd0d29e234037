"""bench/otp_match.py runs, and its baseline finds what core.otp finds."""

from __future__ import annotations

import base64

import pytest

from replayguard.core import otp
from tests.bench_scripts import load

bench = load("otp_match")


@pytest.mark.parametrize("kind", ["totp right", "totp wrong", "hotp next", "hotp wrong"])
def test_each_kind_of_check_is_measured(kind: str) -> None:
    """Each kind of check gives throughput, percentiles and a peak for both ways of matching."""
    secrets = [base64.b32encode(i.to_bytes(20, "big")).decode() for i in range(1, 4)]
    for matching in (otp._matching, bench.afresh):
        figures = bench.run(kind, matching, secrets, 4)
        assert figures.checks_per_s > 0
        assert 0 < figures.p50_us <= figures.p99_us
        assert figures.peak_kib > 0


def test_the_baseline_matches_what_core_otp_matches() -> None:
    """The baseline computes the same matches (it differs only in what it keeps)."""
    secret = base64.b32encode(b"12345678901234567890").decode()
    for counter in range(40):
        code = otp.hotp_code(secret, counter)
        window = range(max(0, counter - 15), counter + 5)
        assert bench.afresh(secret, code, window, 6, "SHA1") == otp._matching(secret, code, window, 6, "SHA1")
