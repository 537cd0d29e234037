"""What matching a presented code costs, per kind of code, beside computing every candidate afresh.

``core.otp`` keeps each secret's last window of codes (``_KeyedHOTP.codes``); the baseline
computes every candidate counter's HMAC on each check (``_KeyedHOTP.value`` per counter, the
same comparisons). Each kind of check runs over ``--secrets`` secrets in turn, as a service
with that many principals would see them:

- ``totp right`` / ``totp wrong``: a TOTP code of now / a wrong one (three steps at drift 1);
- ``hotp next``: the token's next HOTP code, its counter then moved on (one new counter each);
- ``hotp wrong``: a wrong HOTP code (``hotp_matches`` then ``hotp_replayed``: ~110 counters).

Prints checks/s, p50 and p99 per check (µs), the peak memory three rounds allocate
(tracemalloc, measured apart from the timing) and the ratio of the two throughputs.
Run: ``.venv/bin/python bench/otp_match.py``.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from replayguard.core import otp

PERIOD = 30
LOOK_AHEAD = 10


def afresh(secret_b32: str, code: str, counters: range, digits: int, algorithm: str) -> list[int]:
    """The baseline: every candidate's HMAC computed, every candidate compared."""
    generator = otp._hotp(secret_b32, digits, algorithm)
    wanted = int(code).to_bytes(8, "big")
    return [c for c in counters if c >= 0 and hmac.compare_digest(generator.value(c).to_bytes(8, "big"), wanted)]


@dataclass
class Figures:
    checks_per_s: float
    p50_us: float
    p99_us: float
    peak_kib: float


def run(kind: str, matching: Callable[..., list[int]], secrets: list[str], rounds: int) -> Figures:
    """``rounds`` checks of each secret of ``kind``, through ``matching`` (core.otp's or ``afresh``),
    timed; then three rounds again under tracemalloc for the peak (it slows every allocation)."""
    times = checks(kind, matching, secrets, rounds)
    tracemalloc.start()
    checks(kind, matching, secrets, 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    cuts = statistics.quantiles(times, n=100)
    return Figures(len(times) / sum(times), cuts[49] * 1e6, cuts[98] * 1e6, peak / 1024)


def checks(kind: str, matching: Callable[..., list[int]], secrets: list[str], rounds: int) -> list[float]:
    """The seconds each check took."""
    otp._hotp.cache_clear()
    counters = dict.fromkeys(secrets, 1_000)
    now = 1_800_000_000.0
    step = otp.totp_step(now, PERIOD)
    wrong = "000000"
    times: list[float] = []
    for _ in range(rounds):
        for secret in secrets:
            last = counters[secret]
            right = otp.hotp_code(secret, step if kind == "totp right" else last + 1)
            started = time.perf_counter()
            if kind == "totp right":
                matching(secret, right, range(step - 1, step + 2), 6, "SHA1")
            elif kind == "totp wrong":
                matching(secret, wrong, range(step - 1, step + 2), 6, "SHA1")
            elif kind == "hotp next":
                matching(secret, right, range(last - LOOK_AHEAD + 1, last + LOOK_AHEAD + 1), 6, "SHA1")
                counters[secret] = last + 1
            else:
                matching(secret, wrong, range(last - LOOK_AHEAD + 1, last + LOOK_AHEAD + 1), 6, "SHA1")
                matching(secret, wrong, range(last - otp.HOTP_REPLAY_BEHIND + 1, last - LOOK_AHEAD + 1), 6, "SHA1")
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=3_000, help="secrets checked in turn")
    parser.add_argument("--rounds", type=int, default=20, help="checks of each secret per kind")
    args = parser.parse_args()
    secrets = [base64.b32encode(i.to_bytes(20, "big")).decode() for i in range(1, args.secrets + 1)]
    print(f"{args.secrets} secrets x {args.rounds} checks; µs per check, peak KiB allocated over three rounds")
    print(f"{'check':<11} {'kept/s':>9} {'p50':>6} {'p99':>6} {'peak KiB':>9} | {'afresh/s':>9} {'p50':>6} {'p99':>6}"
          f" {'peak KiB':>9} | ratio")
    for kind in ("totp right", "totp wrong", "hotp next", "hotp wrong"):
        kept = run(kind, otp._matching, secrets, args.rounds)
        base = run(kind, afresh, secrets, args.rounds)
        print(f"{kind:<11} {kept.checks_per_s:>9,.0f} {kept.p50_us:>6.1f} {kept.p99_us:>6.1f} {kept.peak_kib:>9,.0f} |"
              f" {base.checks_per_s:>9,.0f} {base.p50_us:>6.1f} {base.p99_us:>6.1f} {base.peak_kib:>9,.0f} |"
              f" {kept.checks_per_s / base.checks_per_s:.2f}")


if __name__ == "__main__":
    main()
