"""Latency over time, and what ran in the background meanwhile (bench/run.py's stall report).

``decisions.lua`` writes one line per answer (completion time in ms since the epoch, latency
in µs, the answer's reason; each request carries an ``X-Request-Id`` the service echoes).
``Marks`` samples, once a second while wrk runs (``--marks-every``), the service's
background duties (``/metrics``: ``replayguard_background_*``: leader duties, the
continuity check, the cyclic garbage collector per generation), its transactions of
decisions that took ``SLOW_LEDGER_S`` or more (``replayguard_ledger_call_duration_seconds``)
and PostgreSQL (``pg_stat_activity``: autovacuum workers and what they vacuum, the
checkpointer's wait event, backends of the benchmark's database waiting on a lock;
``pg_stat_bgwriter`` or, from PostgreSQL 17, ``pg_stat_checkpointer``: checkpoints
finished). A probe commits a one-row insert into the benchmark's database every
``PROBE_S`` and marks any commit that took ``PROBE_SLOW_MS`` or more: when the server's
commits (its WAL flush, the host's disk) stall, the probe stalls with them, so a stalled
second with such a mark was the server's or the host's, whatever background work ran in
it too.

``seconds`` turns the latencies into one row per second with exact percentiles, and
``stalls`` keeps the seconds whose p99 or max is far above the run's, each with the marks
of that second; ``by_reason`` gives the exact percentiles of each kind of answer (accepts,
replays refused, wrong codes, lockouts).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg

from replayguard.pg.appender import _DECIDE

SAMPLE_S = 1.0  # seconds between two scrapes of /metrics (--marks-every); each is work on the service's loop
PG_SAMPLE_S = 0.25
PROBE_S = 0.05  # between two commits of the probe (about 20 a second: a few percent of the commits at c=1)
PROBE_SLOW_MS = 20.0
# No second is a stall for answers under this: the performance issue's c=1 target lets one
# answer in a thousand take up to 20 ms (p99.9), about one a second at c=1. Lower, the durable
# floor (bench/run.py) stalls too: with 5 ms, 4-6 of its 29 seconds at c=1.
STALL_FLOOR_MS = 20.0
_PROBE_TABLE = "CREATE TABLE IF NOT EXISTS bench_commit_probe (at double precision NOT NULL)"
_PROBE = "INSERT INTO bench_commit_probe VALUES ($1)"
T = TypeVar("T", int, float)
_METRIC = re.compile(r'^replayguard_background_(seconds_total|runs_total)\{task="([^"]+)",worker="(\d+)"\} (\S+)$')
# A duty's last finished run: when it started and how long it took (set together as it ends).
_LAST_RUN = re.compile(
    r'^replayguard_background_last_(start_timestamp|duration)_seconds\{task="([^"]+)",worker="(\d+)"\} (\S+)$')
# The answers the tail report ("tail_during") takes as a phase's tail: those slower than this quantile.
TAIL_Q = 0.99
# All answers at most this many, evenly picked, stand for all of them beside the tail.
TAIL_BASE_MAX = 100_000
# The group commit's transactions, timed by the worker (replayguard_ledger_call_duration_seconds):
# a second in which one took SLOW_LEDGER_S or more is marked with how many, and how slow.
_LEDGER_BUCKET = re.compile(r'^replayguard_ledger_call_duration_seconds_bucket\{le="([^"]+)"\} (\S+)$')
SLOW_LEDGER_S = 0.025

# A decision call (the appender's `rg_decide`) still running after this long is marked
# with what its backend waits on at that moment (or "on CPU"): a wait the one-row probe
# does not share (a data page's I/O, a buffer another process writes) shows there.
SLOW_CALL_MS = 100
_DECIDE_CALL = _DECIDE.partition("(")[0] + "("  # the appender's statement up to its arguments
_PG_ACTIVITY = """
SELECT backend_type, datname, wait_event_type, wait_event, left(query, 80) AS query,
       (extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint AS running_ms
FROM pg_stat_activity
WHERE backend_type IN ('autovacuum worker', 'checkpointer')
   OR (datname = $1 AND wait_event_type = 'Lock')
   OR (datname = $1 AND state = 'active' AND starts_with(query, $2)
       AND clock_timestamp() - query_start >= make_interval(secs => $3 / 1000.0))
"""
# Checkpoints finished and the buffers they wrote: pg_stat_bgwriter's until PostgreSQL 17,
# pg_stat_checkpointer's since (18 counts the checkpoints done apart from those skipped).
_PG_CHECKPOINTS = {
    15: "SELECT checkpoints_timed + checkpoints_req AS n, buffers_checkpoint FROM pg_stat_bgwriter",
    17: "SELECT num_timed + num_requested AS n, buffers_written AS buffers_checkpoint FROM pg_stat_checkpointer",
    18: "SELECT num_done AS n, buffers_written AS buffers_checkpoint FROM pg_stat_checkpointer",
}


# The WAL's records, bytes and flushes: from PostgreSQL 18 the flushes are in pg_stat_io.
_PG_WAL = {
    15: "SELECT wal_records, wal_bytes::bigint AS wal_bytes, wal_sync FROM pg_stat_wal",
    18: "SELECT wal_records, wal_bytes::bigint AS wal_bytes,"
        " (SELECT coalesce(sum(fsyncs), 0)::bigint FROM pg_stat_io WHERE object = 'wal') AS wal_sync"
        " FROM pg_stat_wal",
}


def for_version(queries: dict[int, str], major: int) -> str:
    """The query of ``queries`` (keyed by the first major version it is for) for a server of
    this major version; 15, the oldest the benchmark runs, for anything older."""
    return queries[max([15, *(v for v in queries if v <= major)])]


def checkpoints_query(major: int) -> str:
    """The checkpoint counters' query for a server of this major version."""
    return for_version(_PG_CHECKPOINTS, major)


def wal_query(major: int) -> str:
    """The WAL counters' query (``wal_records``, ``wal_bytes``, ``wal_sync``) for this major version."""
    return for_version(_PG_WAL, major)


_CHECKPOINTER_BUSY = {"CheckpointWriteDelay", "DataFileSync", "DataFileFlush", "DataFileWrite",
                      "ControlFileSyncUpdate", "ControlFileWrite"}


class Marks:
    """Samples background work in a thread of its own between ``start`` and ``stop``."""

    def __init__(self, metrics_urls: list[str], token: str, dsn: str, every_s: float = SAMPLE_S) -> None:
        self.urls, self.token, self.dsn, self.every_s = metrics_urls, token, dsn, every_s
        self.dbname = dsn.rpartition("/")[2]
        self.marks: list[tuple[float, str]] = []  # (unix time, label)
        self.errors: list[str] = []
        self.scrapes = 0  # of /metrics, answered and read
        # Each duty's run a scrape saw (its last finished one): (task, worker, start) -> seconds.
        self.runs: dict[tuple[str, str, float], float] = {}
        self._ledger_last: dict[str, dict[float, float]] = {}  # worker pid ("" unknown) -> its last buckets
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Marks:
        self._thread.start()
        return self

    async def _probe(self) -> None:
        """Commits a one-row insert every PROBE_S on a connection of its own; marks the slow ones."""
        try:
            conn = await asyncpg.connect(self.dsn)
            await conn.execute(_PROBE_TABLE)
        except (OSError, asyncpg.PostgresError) as exc:
            self.errors.append(f"commit probe: {exc}")
            return
        try:
            while not self._stop.is_set():
                started = time.time()
                await conn.execute(_PROBE, started)
                ended = time.time()
                took_ms = (ended - started) * 1000
                if took_ms >= PROBE_SLOW_MS:
                    # Filed under the second it returned, beside the answers that waited with it.
                    self.marks.append((ended, f"pg slow commit: {took_ms:.0f} ms (a one-row probe)"))
                await asyncio.sleep(PROBE_S)
        except (OSError, asyncpg.PostgresError) as exc:
            self.errors.append(f"commit probe: {exc}")
        finally:
            await conn.close()

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.marks

    async def _run(self) -> None:
        last: dict[tuple[str, str], tuple[float, float]] = {}  # (worker, task) -> (runs, seconds)
        checkpoints: tuple[int, int] | None = None
        next_pg = 0.0
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            conn = await asyncpg.connect(self.dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            self.errors.append(f"postgres: {exc}")
            conn = None
        # A new connection per scrape: the workers of --workers N share the port
        # (SO_REUSEPORT), and a kept-alive connection would always reach the same one.
        connector = aiohttp.TCPConnector(force_close=True)
        probe = asyncio.create_task(self._probe())
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            while not self._stop.is_set():
                now = time.time()
                for url in self.urls:
                    try:
                        async with session.get(url + "/metrics") as resp:
                            text = await resp.text()
                    except aiohttp.ClientError as exc:
                        self.errors.append(f"metrics: {exc}")
                        continue
                    self._service(now, text, last)
                if conn is not None and now >= next_pg:
                    next_pg = now + PG_SAMPLE_S
                    checkpoints = await self._postgres(now, conn, checkpoints)
                await asyncio.sleep(self.every_s)
        await probe
        if conn is not None:
            await conn.close()

    def duty_runs(self) -> list[tuple[str, float, float]]:
        """(task, start, end) in Unix seconds of every run of a background duty the scrapes saw:
        the last finished run of each duty at each scrape, so a duty that ran twice between two
        scrapes shows once."""
        return sorted((task, start, start + seconds) for (task, _, start), seconds in self.runs.items())

    def _service(self, now: float, text: str, last: dict[tuple[str, str], tuple[float, float]]) -> None:
        values: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        buckets: dict[float, float] = {}
        last_runs: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for line in text.splitlines():
            m = _METRIC.match(line)
            if m:
                values[(m.group(2), m.group(3))][m.group(1)] = float(m.group(4))
            elif (b := _LEDGER_BUCKET.match(line)) is not None:
                buckets[float(b.group(1))] = float(b.group(2))
            elif (r := _LAST_RUN.match(line)) is not None:
                last_runs[(r.group(2), r.group(3))][r.group(1)] = float(r.group(4))
        for (task, worker), run in last_runs.items():
            if "start_timestamp" in run and "duration" in run:
                self.runs[(task, worker, run["start_timestamp"])] = run["duration"]
        workers = {w for _, w in values}
        if buckets:
            # The scrape's worker, named by its background counters; with --workers N the
            # buckets are every worker's summed (metrics_shared), kept under "".
            worker = next(iter(workers)) if len(workers) == 1 else ""
            previous = self._ledger_last.get(worker)
            self._ledger_last[worker] = buckets
            label = slow_ledger_calls(previous, buckets)
            if label:
                several = len(self._ledger_last) > 1 or len(self.urls) > 1
                who = f"pid {worker} " if worker and several else ""
                self.marks.append((now - self.every_s / 2, who + label))
        self.scrapes += 1
        for (task, worker), v in values.items():
            runs, seconds = v.get("runs_total", 0.0), v.get("seconds_total", 0.0)
            before = last.get((worker, task))
            last[(worker, task)] = (runs, seconds)
            if before is None or runs == before[0]:
                continue
            # With several workers a scrape has the other workers' counts as they last shared
            # them (once a second), so a mark may hold runs of more than one sample.
            spent_ms = (seconds - before[1]) * 1000
            who = f"pid {worker} " if len(workers) > 1 or len(self.urls) > 1 else ""
            self.marks.append((now - self.every_s / 2, f"{who}{task} x{int(runs - before[0])} {spent_ms:.1f} ms"))

    async def _postgres(self, now: float, conn: asyncpg.Connection,
                        checkpoints: tuple[int, int] | None) -> tuple[int, int] | None:
        try:
            for row in await conn.fetch(_PG_ACTIVITY, self.dbname, _DECIDE_CALL, SLOW_CALL_MS):
                if ((row["query"] or "").startswith(_DECIDE_CALL) and row["running_ms"] is not None
                        and row["running_ms"] >= SLOW_CALL_MS):
                    waits = f"{row['wait_event_type']} {row['wait_event']}" if row["wait_event"] else "on CPU"
                    self.marks.append((now, f"pg slow decision call: {row['running_ms']} ms in, {waits}"))
                elif row["backend_type"] == "autovacuum worker" and row["query"]:
                    mine = "" if row["datname"] == self.dbname else " (other db)"
                    self.marks.append((now, f"pg autovacuum{mine}: {row['query'].removeprefix('autovacuum: ')}"))
                elif row["backend_type"] == "checkpointer" and row["wait_event"] in _CHECKPOINTER_BUSY:
                    self.marks.append((now, f"pg checkpointer {row['wait_event']}"))
                elif row["wait_event_type"] == "Lock":
                    self.marks.append((now, f"pg lock wait {row['wait_event']}: {row['query']}"))
            done = await conn.fetchrow(checkpoints_query(conn.get_server_version().major))
        except (OSError, asyncpg.PostgresError) as exc:
            self.errors.append(f"postgres: {exc}")
            return checkpoints
        if checkpoints is not None and done["n"] != checkpoints[0]:
            self.marks.append((now, f"pg checkpoint finished ({done['buffers_checkpoint'] - checkpoints[1]} buffers)"))
        return int(done["n"]), int(done["buffers_checkpoint"])


def slow_ledger_calls(before: dict[float, float] | None, now: dict[float, float]) -> str | None:
    """The mark for the ledger transactions of ``SLOW_LEDGER_S`` or more between two scrapes of
    one worker's cumulative buckets (upper bound in seconds: count), or None when there were none."""
    if before is None:
        return None
    delta = {le: now[le] - before.get(le, 0.0) for le in now}
    total = delta.get(math.inf, 0.0)
    under = max((n for le, n in delta.items() if le <= SLOW_LEDGER_S), default=0.0)
    slow = total - under
    if slow <= 0:
        return None
    # The smallest bound that holds them all: the slowest took no longer than that.
    bound = min(le for le, n in delta.items() if n >= total)
    top = max((le for le in delta if not math.isinf(le)), default=0.0)
    slowest = f"the slowest over {top:g} s" if math.isinf(bound) else f"the slowest under {bound * 1000:g} ms"
    return f"ledger calls over {SLOW_LEDGER_S * 1000:g} ms: {int(slow)} of {int(total)}, {slowest}"


Sample = tuple[int, int, str]  # completion ms since the epoch, latency µs, the answer's reason


def read_latencies(paths: list[Path]) -> list[Sample]:
    """(completion ms, latency µs, reason) of every answer, from the per-thread files."""
    out = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            t, lat, reason = [*line.split(" "), "", ""][:3]
            if lat:
                out.append((int(float(t)), int(float(lat)), reason or "?"))
    return out


def percentile(ordered: list[T], q: float) -> T:
    """The exact ``q`` quantile of an already sorted list (the element at rank ``q * n``)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def seconds(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per wall-clock second: answers, p50, p99, max (ms)."""
    by_s: dict[int, list[int]] = defaultdict(list)
    for t_ms, latency, _ in samples:
        by_s[t_ms // 1000].append(latency)
    rows = []
    for s in sorted(by_s):
        lat = sorted(by_s[s])
        rows.append({"t": s, "n": len(lat), "p50_ms": percentile(lat, 0.5) / 1000,
                     "p99_ms": percentile(lat, 0.99) / 1000, "max_ms": lat[-1] / 1000})
    return rows


def overall(samples: list[Sample]) -> dict[str, float]:
    """Exact percentiles, max and mean over every answer of the run (ms)."""
    return _percentiles([s[1] for s in samples])


def by_reason(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Exact percentiles per kind of answer (``ok``, ``reused``, ``invalid``, ``locked_out`` …), largest first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for _, lat, reason in samples:
        groups[reason].append(lat)
    return {r: _percentiles(lat) for r, lat in sorted(groups.items(), key=lambda kv: -len(kv[1]))}


def _percentiles(latencies: list[int]) -> dict[str, float]:
    if not latencies:
        return {}
    lat = sorted(latencies)
    return {"n": len(lat), **{f"p{q}_ms": percentile(lat, float(q) / 100) / 1000 for q in ("50", "95", "99", "99.9")},
            "max_ms": lat[-1] / 1000, "mean_ms": sum(lat) / len(lat) / 1000}


def _share(spans: list[tuple[float, float]], intervals: list[tuple[float, float]]) -> float:
    """The share of ``spans`` that meet any of ``intervals`` (sorted, not overlapping)."""
    if not spans:
        return 0.0
    starts = [lo for lo, _ in intervals]
    met = 0
    for lo, hi in spans:
        i = bisect.bisect_right(starts, hi) - 1
        met += i >= 0 and intervals[i][1] >= lo
    return met / len(spans)


def _span(sample: Sample) -> tuple[float, float]:
    """An answer's time from its send to its answer, in Unix seconds."""
    t_ms, latency_us, _ = sample
    return (t_ms - latency_us / 1000) / 1000, t_ms / 1000


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def tail_during(samples: list[Sample], runs: list[tuple[str, float, float]],
                q: float = TAIL_Q) -> dict[str, Any]:
    """How a phase's slowest answers line up with its background duties' runs.

    The tail is every answer slower than the phase's ``q`` quantile. For each duty (and for
    ``any`` of them), the share of the tail in progress during one of its runs (the answer's
    time from its send to its answer meets the run's), beside the same share of all answers
    (at most ``TAIL_BASE_MAX`` of them, evenly picked): a duty whose runs hold up decisions
    has a far larger share of the tail than of all answers. ``runs`` are (task, start, end)
    in Unix seconds (``Marks.duty_runs``)."""
    if not samples or not runs:
        return {}
    cut = percentile(sorted(lat for _, lat, _ in samples), q)
    tail = [_span(sample) for sample in samples if sample[1] > cut]
    base = [_span(sample) for sample in samples[::max(1, math.ceil(len(samples) / TAIL_BASE_MAX))]]
    by_task: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for task, start, end in runs:
        by_task[task].append((start, end))
        by_task["any"].append((start, end))
    duties = {}
    for task, found in by_task.items():
        intervals = _merged(found)
        duties[task] = {"runs": len(found), "tail": round(_share(tail, intervals), 3),
                        "all": round(_share(base, intervals), 3)}
    return {"q": q, "over_ms": cut / 1000, "tail_n": len(tail),
            "duties": dict(sorted(duties.items(), key=lambda kv: (kv[0] != "any", -kv[1]["tail"])))}


def tail_line(tail: dict[str, Any]) -> str | None:
    """``tail_during``'s figures as one line of the stall report (None without runs or tail)."""
    if not tail or not tail["tail_n"]:
        return None
    return (f"    slowest {100 - tail['q'] * 100:g} % (over {tail['over_ms']:.2f} ms, n={tail['tail_n']}) in progress"
            " during a run of, against all answers: "
            + ", ".join(f"{task} {v['tail']:.0%}/{v['all']:.0%}" for task, v in tail["duties"].items()))


def judged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The whole seconds of a phase: its rows less the partial first and last (wrk starting
    and stopping), the seconds the stall rule and the long run's trend judge."""
    return rows[1:-1]


def stalls(rows: list[dict[str, Any]], marks: list[tuple[float, str]], factor: float = 5.0,
           floor_ms: float = STALL_FLOOR_MS) -> tuple[float, list[dict[str, Any]]]:
    """The seconds whose p99 or max exceeds ``factor`` times the median second's p99 (and
    ``floor_ms``), each with the background marks sampled in it; the first and last
    seconds (partial, wrk starting and stopping) are left out (``judged``)."""
    inner = judged(rows)
    if not inner:
        return 0.0, []
    p99s = sorted(r["p99_ms"] for r in inner)
    threshold = max(factor * p99s[len(p99s) // 2], floor_ms)
    by_s: dict[int, list[str]] = defaultdict(list)
    for t, label in marks:
        by_s[int(t)].append(label)
    out = []
    for r in inner:
        if r["max_ms"] > threshold or r["p99_ms"] > threshold:
            out.append({**r, "marks": sorted(set(by_s.get(r["t"], [])))})
    return threshold, out


def _unprefixed(label: str) -> str:
    """A mark's label without the worker it came from (``pid 123 ``), as its kind reads."""
    return re.sub(r"^pid \d+ ", "", label)


def marks_by_kind(marks: list[tuple[float, str]]) -> dict[str, int]:
    """How many seconds had each kind of mark (its label up to the count or colon)."""
    kinds: dict[str, set[int]] = defaultdict(set)
    for t, label in marks:
        kinds[re.split(r" x\d|:| \(", _unprefixed(label))[0]].add(int(t))
    return {k: len(v) for k, v in sorted(kinds.items())}


def stall_evidence(found: list[dict[str, Any]]) -> dict[str, int]:
    """The stalled seconds by the strongest evidence among their marks: the one-row probe's
    commit was slow too (the server's WAL flush or the host's disk), else the service timed
    a slow transaction of decisions (the decision's own transaction: a lock, a page, a core
    its backend waited for), else neither (the worker's loop or a core it waited for)."""
    out = {"server commits": 0, "ledger transactions": 0, "neither": 0}
    for r in found:
        labels = [_unprefixed(label) for label in r["marks"]]
        if any(label.startswith("pg slow commit") for label in labels):
            out["server commits"] += 1
        elif any(label.startswith("ledger calls over") for label in labels):
            out["ledger transactions"] += 1
        else:
            out["neither"] += 1
    return out


def report(tag: str, rows: list[dict[str, Any]], marks: list[tuple[float, str]], run: dict[str, float],
           reasons: dict[str, dict[str, float]] | None = None, tail: dict[str, Any] | None = None) -> str:
    threshold, found = stalls(rows, marks)
    if not rows:
        return f"  {tag}: no latency samples"
    start = rows[0]["t"]
    head = (f"  {tag}: {run.get('n', 0)} answers, p50 {run.get('p50_ms')} p99 {run.get('p99_ms')} "
            f"p99.9 {run.get('p99.9_ms')} max {run.get('max_ms')} mean {run.get('mean_ms', 0):.3f} ms; "
            f"stall = a second with p99 or max "
            f"> {threshold:.1f} ms: {len(found)} of {len(judged(rows))}")
    lines = [head, "    seconds with background work: " + (", ".join(
        f"{k} {n}" for k, n in marks_by_kind(marks).items()) or "none")]
    if reasons:
        lines.append("    by answer: " + "; ".join(
            f"{r} n={v['n']} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} max {v['max_ms']:.1f} ms"
            for r, v in reasons.items()))
    if (line := tail_line(tail or {})) is not None:
        lines.append(line)
    for r in found:
        lines.append(f"    +{r['t'] - start:>3}s n={r['n']:<6} p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} "
                     f"max {r['max_ms']:.1f} ms  | " + ("; ".join(r["marks"]) or "no background work seen"))
    if found:
        lines.append("    stalls with a slow server commit / slow ledger transactions only / neither: "
                     + " / ".join(str(n) for n in stall_evidence(found).values()))
    return "\n".join(lines)
