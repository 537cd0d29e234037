#!/usr/bin/env python3
"""The service's instructions per decision, counted by valgrind's callgrind.

Wall-clock CPU a decision moves with the host's hour; the instructions the service's process
executes do not. This starts ``python -m replayguard serve`` (one worker, its own database
migrated and an admin token made as bench/run.py makes them) under ``valgrind
--tool=callgrind --instr-atstart=no``, so start-up and enrollment run uninstrumented, turns
instrumentation on once (``callgrind_control -i on``), and then:

1. counts ``--idle`` seconds with no request (``callgrind_control -z``, then ``-d``): what
   the service's background duties execute in a second, whose share of a decision grows
   with the run's wall time under valgrind (the ``net`` column takes it out);
2. for each kind of decision asked for, drives ``--warmup`` decisions of that kind
   uncounted (caches, token lists, code paths warmed), zeroes the counts, drives
   ``--decisions`` decisions at ``--concurrency`` with a small asyncio client in this
   process (native, not counted; in rounds of one request a connection, so that the
   batches stay near the concurrency) and dumps the counts.

Unless ``--leader``, a process of this script holds the leader's lock (``alertfeed``), so
the service never leads and its leader's duties (about three quarters of its idle work)
do not run beside the decisions.

It prints, per kind, the instructions a decision (total and net of the idle rate), the
mean batch (decisions a ``rg_decide`` call, from ``/metrics``) and, with ``--top K``, the K
functions of the largest inclusive cost a decision (``callgrind_annotate --inclusive=yes``).
With ``--candidate DIR`` it measures another checkout the same way (its own ``.venv``'s
Python when it has one) and prints the ratio candidate / this checkout per kind, of the
instructions a decision as counted (the idle correction moves with the host's load more
than the count does).

Only user-space instructions of the service's own process are counted: not the kernel's
work for its system calls, nor PostgreSQL's, nor the chain check's child (exec'd, so it
runs natively). The kinds: ``nonce`` (fresh nonces), ``totp`` (fresh TOTP codes, one per
enrolled principal), ``replay`` (nonces consumed during the warm-up, presented again),
``invalid`` (wrong codes, below the lockout threshold), ``locked`` (wrong codes for
principals already locked out).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pyotp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from own_server import free_port
from run import create_database, drop_database, leader_lock, post_all, sql_differences, wait_ready

REPO = Path(__file__).resolve().parent.parent
KINDS = ("nonce", "totp", "replay", "invalid", "locked")
EXPECTED = {"nonce": "ok", "totp": "ok", "replay": "reused", "invalid": "invalid", "locked": "locked_out"}
PERIOD = 30
VMS = 16
INVALID_PRINCIPALS = 64
LOCKED_PRINCIPALS = 8
Body = bytes | Callable[[], bytes]  # a request's body, or what makes it when it is sent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/service_cpu.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kind", default="nonce,invalid", help=f"comma-separated kinds of decision: {', '.join(KINDS)}")
    p.add_argument("--decisions", type=int, default=2000, help="decisions counted per kind")
    p.add_argument("--warmup", type=int, default=500, help="decisions per kind before counting")
    p.add_argument("--concurrency", type=int, default=64, help="client connections, each one request at a time")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle counting (0: no idle correction)")
    p.add_argument("--top", type=int, default=25, help="functions by inclusive cost to list per kind (0: none)")
    p.add_argument("--candidate", type=Path, help="another checkout to measure the same way, for a ratio")
    p.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="a database on the server where the benchmark may CREATE and DROP its own")
    p.add_argument("--log-level", default="info", help="service log level (the shipped default is info)")
    p.add_argument("--leader", action="store_true",
                   help="let the service lead (its leader's duties each second: checkpoints, the chain sweep, "
                        "the state check); by default this script holds the leader's lock, so it follows")
    p.add_argument("--keep", type=Path, help="keep the callgrind files and service logs in this directory")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown or not args.kinds:
        p.error(f"unknown kind {unknown}: choose from {', '.join(KINDS)}")
    if args.decisions < 1 or args.warmup < 0 or args.concurrency < 1:
        p.error("--decisions and --concurrency must be positive, --warmup not negative")
    return args


# --- the client --------------------------------------------------------------------------------

@dataclass
class Requests:
    """Builds each kind's request bodies; what one kind consumes (codes, nonces) is not reused."""

    run_id: str
    secrets_: dict[str, str] = field(default_factory=dict)  # fresh-code principals, each used once
    invalid: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    consumed: list[tuple[str, str]] = field(default_factory=list)  # (vm, nonce) accepted, for replays
    _fresh: Iterator[str] | None = None
    _count: int = 0

    def principals(self, fresh: int) -> None:
        self.secrets_ = {f"{self.run_id}-p{k}": _new_secret() for k in range(fresh)}
        self.invalid = [f"{self.run_id}-x{k}" for k in range(INVALID_PRINCIPALS)]
        self.locked = [f"{self.run_id}-l{k}" for k in range(LOCKED_PRINCIPALS)]
        for name in self.invalid + self.locked:
            self.secrets_.setdefault(name, _new_secret())
        self._fresh = iter([n for n in self.secrets_ if "-p" in n[len(self.run_id):]])

    def enrollments(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"/v1/principals/{name}/tokens", {"type": "totp", "secret": secret, "period": PERIOD})
                for name, secret in self.secrets_.items()]

    def wrong(self, name: str) -> str:
        step = int(time.time() // PERIOD)
        valid = {pyotp.TOTP(self.secrets_[name]).generate_otp(s) for s in range(step - 3, step + 5)}
        return next(f"{k:06d}" for k in range(1_000_000) if f"{k:06d}" not in valid)

    def make(self, kind: str, n: int) -> list[tuple[str, Body]]:
        out: list[tuple[str, Body]] = []
        for _ in range(n):
            self._count += 1
            vm = f"{self.run_id}v{self._count % VMS}"
            if kind in ("nonce", "replay") and not (kind == "replay" and self.consumed):
                nonce = f"{self.run_id}-{self._count}"
                self.consumed.append((vm, nonce))
                out.append(("/v1/nonces/consume", _nonce(vm, nonce)))
            elif kind == "replay":
                vm, nonce = self.consumed[self._count % len(self.consumed)]
                out.append(("/v1/nonces/consume", _nonce(vm, nonce)))
            elif kind == "totp":  # the code of the step it is sent in: a run may outlast a step
                assert self._fresh is not None, "principals() ran"
                name = next(self._fresh)
                out.append(("/v1/otp/verify", functools.partial(_fresh_otp, vm, name, self.secrets_[name])))
            else:
                names = self.invalid if kind == "invalid" else self.locked
                name = names[self._count % len(names)]
                out.append(("/v1/otp/verify", _otp(vm, name, self.wrong(name))))
        return out


def _new_secret() -> str:
    return base64.b32encode(os.urandom(20)).decode()


def _fresh_otp(vm: str, principal: str, secret: str) -> bytes:
    return _otp(vm, principal, pyotp.TOTP(secret).now())


def _nonce(vm: str, nonce: str) -> bytes:
    return json.dumps({"vm_id": vm, "scope": "bench", "nonce": nonce, "ttl_s": 300}).encode()


def _otp(vm: str, principal: str, code: str) -> bytes:
    return json.dumps({"vm_id": vm, "principal": principal, "otp": code, "context": {"service": "sshd"}}).encode()


_REASON = re.compile(rb'"reason":\s*"([a-z_]+)"')


async def drive(port: int, token: str, requests: Sequence[tuple[str, Body]], concurrency: int) -> Counter[str]:
    """Sends every request over ``concurrency`` kept-alive connections in rounds: one request
    on each connection, written together, then every answer awaited before the next round.
    So the service reads a round's requests together and the batches stay about the
    concurrency, however slow the service runs under valgrind (answered one by one, its
    batches would follow its speed of the moment). Counts the answers by reason (or
    ``status_N`` when there is none)."""
    reasons: Counter[str] = Counter()
    if not requests:
        return reasons
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(min(concurrency, len(requests)))]

    async def one(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str, made: Body) -> None:
        reader, writer = stream
        body = made if isinstance(made, bytes) else made()
        writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), token.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        answer = await reader.readexactly(int(length.group(1))) if length else b""
        found = _REASON.search(answer)
        reasons[found.group(1).decode() if found else f"status_{status}"] += 1

    try:
        for start in range(0, len(requests), len(streams)):
            round_ = requests[start:start + len(streams)]
            await asyncio.gather(*(one(stream, *request) for stream, request in zip(streams, round_, strict=False)))
    finally:
        for _, writer in streams:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    return reasons


# --- the service under callgrind -------------------------------------------------------------------

@dataclass
class Checkout:
    path: Path

    @property
    def python(self) -> str:
        own = self.path / ".venv" / "bin" / "python"
        return str(own) if own.exists() and self.path != REPO else sys.executable

    def served_sql(self) -> Path:
        """Where ``replayguard.migrations`` comes from for this checkout's ``python -m
        replayguard``: the editable install of the environment its Python belongs to."""
        found = subprocess.run([self.python, "-c", "import replayguard.migrations as m; print(list(m.__path__)[0])"],
                               capture_output=True, text=True, cwd=self.path, check=True).stdout.strip()
        return Path(found)

    def cli(self, *args: str, env: dict[str, str]) -> str:
        done = subprocess.run([self.python, "-m", "replayguard", *args], capture_output=True, text=True,
                              env=env, cwd=self.path, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"replayguard {args[0]} failed: {done.stderr.strip()}")
        return done.stdout.strip()


class Callgrind:
    """One ``replayguard serve`` under callgrind, instrumentation off until asked."""

    def __init__(self, checkout: Checkout, dsn: str, data_dir: Path, env: dict[str, str], out: Path,
                 log_level: str) -> None:
        self.port = free_port()
        self.out = out
        self.log = (out / "service.log").open("wb")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no",
               f"--callgrind-out-file={out / 'callgrind.out'}", checkout.python, "-m", "replayguard", "serve",
               "--host", "127.0.0.1", "--port", str(self.port), "--database-url", dsn,
               "--data-dir", str(data_dir), "--workers", "1", "--log-level", log_level]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=checkout.path)
        self.dumps = 0

    def control(self, *args: str) -> None:
        done = subprocess.run(["callgrind_control", *args, str(self.proc.pid)], capture_output=True,
                              text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {done.stdout} {done.stderr}")

    def instrument(self) -> None:
        """Turns instrumentation on, once, for the rest of the run: toggling it off and on
        again between dumps leaves some blocks' counts in the next dump."""
        self.control("-i", "on")

    @contextmanager
    def counting(self) -> Iterator[dict[str, Any]]:
        """Counts what runs inside (the counts zeroed first, dumped at the end); yields a
        dict given the dump's path and the seconds counted at the end."""
        found: dict[str, Any] = {}
        self.control("-z")
        started = time.monotonic()
        yield found
        found["seconds"] = time.monotonic() - started
        self.control("-d")
        self.dumps += 1
        found["path"] = self.out / f"callgrind.out.{self.dumps}"
        deadline = time.monotonic() + 60
        while not found["path"].exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def instructions(path: Path) -> int:
    """The total ``Ir`` of one callgrind dump (its ``totals``: the sum of its cost lines;
    its ``summary`` should agree)."""
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            found[line.split(":")[0]] = int(line.split()[1])
    if "totals" not in found:
        raise RuntimeError(f"{path}: no totals line")
    if abs(found.get("summary", found["totals"]) - found["totals"]) > found["totals"] / 100:
        print(f"service_cpu: {path.name}: summary {found['summary']:,} against totals {found['totals']:,}",
              file=sys.stderr)
    return found["totals"]


_ANNOTATED = re.compile(r"^\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)$")


def _short(name: str) -> str:
    """``file:function`` without the build directories or the object file."""
    name = re.sub(r"\s+\[[^\]]*\]$", "", name.strip())
    where, _, function = name.rpartition(":")
    return f"{Path(where).name}:{function}" if where and where != "???" else name


def top_functions(path: Path, k: int, *, inclusive: bool) -> list[tuple[int, str]]:
    """The ``k`` functions of the largest inclusive (or own) ``Ir`` in a dump, as (Ir, name).

    Functions whose inclusive count exceeds the dump's total (callgrind's cycles through the
    event loop's recursion) are left out."""
    if k <= 0:
        return []
    done = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                           "--threshold=100", str(path)], capture_output=True, text=True, timeout=300, check=False)
    total = instructions(path)
    rows: dict[str, int] = {}
    for line in done.stdout.splitlines():
        m = _ANNOTATED.match(line)
        if m and "PROGRAM TOTALS" not in line:
            ir, name = int(m.group(1).replace(",", "")), _short(m.group(3))
            if ir <= total:
                rows[name] = rows.get(name, 0) + ir if not inclusive else max(rows.get(name, 0), ir)
    return sorted(((ir, name) for name, ir in rows.items()), reverse=True)[:k]


async def metric_sum(port: int, token: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics",
                                                        headers={"Authorization": f"Bearer {token}"}) as answer:
        text = await answer.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def measure(checkout: Checkout, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every kind of ``args.kinds`` on one service under callgrind, on a database of its own."""
    dsn = asyncio.run(create_database(args.pg_admin_url, "cpu"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLAYGUARD_")}
    per_invalid = -(-(args.warmup + args.decisions) // INVALID_PRINCIPALS) if "invalid" in args.kinds else 0
    threshold = per_invalid + 5
    env["REPLAYGUARD_LOCKOUT_THRESHOLD"] = str(threshold)
    data_dir = work / "data"
    service: Callgrind | None = None
    result: dict[str, Any] = {"checkout": str(checkout.path), "kinds": {}}
    stack = ExitStack()
    try:
        checkout.cli("migrate", "--database-url", dsn, "--data-dir", str(data_dir), env=env)
        token = checkout.cli("token", "create", "--role", "admin", "--name", "bench", "--database-url", dsn,
                             "--data-dir", str(data_dir), env=env)
        if not args.leader:
            stack.enter_context(leader_lock(dsn))
        service = Callgrind(checkout, dsn, data_dir, env, work, args.log_level)
        asyncio.run(wait_ready(f"http://127.0.0.1:{service.port}", service.proc, timeout=600))
        requests = Requests(secrets.token_hex(3))
        fresh = (args.warmup + args.decisions) if "totp" in args.kinds else 0
        requests.principals(fresh)
        statuses = asyncio.run(post_all(f"http://127.0.0.1:{service.port}", token, requests.enrollments()))
        if set(statuses) != {201}:
            raise RuntimeError(f"enrollment answered {dict(statuses)}")
        if "locked" in args.kinds:  # each locked principal: threshold wrong codes, uncounted
            asyncio.run(drive(service.port, token, [
                ("/v1/otp/verify", _otp(f"{requests.run_id}v0", name, requests.wrong(name)))
                for name in requests.locked for _ in range(threshold)], args.concurrency))
        service.instrument()
        if args.idle > 0:
            with service.counting() as idle:
                time.sleep(args.idle)
            result["idle_per_s"] = instructions(idle["path"]) / idle["seconds"]
        for kind in args.kinds:
            if kind == "replay" and not requests.consumed:
                asyncio.run(drive(service.port, token, requests.make("nonce", max(args.warmup, 100)), args.concurrency))
            asyncio.run(drive(service.port, token, requests.make(kind, args.warmup), args.concurrency))
            todo = requests.make(kind, args.decisions)
            calls_before = asyncio.run(metric_sum(service.port, token, "replayguard_ledger_batch_size_count"))
            items_before = asyncio.run(metric_sum(service.port, token, "replayguard_ledger_batch_size_sum"))
            with service.counting() as counted:
                reasons = asyncio.run(drive(service.port, token, todo, args.concurrency))
            calls = asyncio.run(metric_sum(service.port, token, "replayguard_ledger_batch_size_count")) - calls_before
            items = asyncio.run(metric_sum(service.port, token, "replayguard_ledger_batch_size_sum")) - items_before
            total = instructions(counted["path"])
            idle_part = result.get("idle_per_s", 0.0) * counted["seconds"]
            result["kinds"][kind] = {
                "decisions": args.decisions, "reasons": dict(reasons), "seconds": round(counted["seconds"], 2),
                "instructions": total, "per_decision": total / args.decisions,
                "net_per_decision": (total - idle_part) / args.decisions,
                "mean_batch": items / calls if calls else None,
                "top": [(ir / args.decisions, name)
                        for ir, name in top_functions(counted["path"], args.top, inclusive=True)],
                "top_self": [(ir / args.decisions, name)
                             for ir, name in top_functions(counted["path"], args.top, inclusive=False)],
            }
    finally:
        if service is not None:
            service.stop()
        stack.close()
        asyncio.run(drop_database(args.pg_admin_url, dsn))
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{result['checkout']}: concurrency {args.concurrency}, {args.decisions} decisions a kind"
          + (f", idle {result['idle_per_s'] / 1e6:.2f} M instructions/s" if "idle_per_s" in result else ""))
    print("| kind | answers | instructions a decision | net of idle | mean batch | seconds |")
    print("|---|---|---|---|---|---|")
    for kind, r in result["kinds"].items():
        answers = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items()))
        batch = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        print(f"| {kind} | {answers} | {r['per_decision']:,.0f} | {r['net_per_decision']:,.0f} | {batch} "
              f"| {r['seconds']} |")
    for kind, r in result["kinds"].items():
        for key, what in (("top", "inclusive"), ("top_self", "own")):
            if r[key]:
                print(f"\n{kind}: functions by {what} instructions a decision")
                for ir, name in r[key]:
                    print(f"{ir:>12,.0f}  {name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("service_cpu: valgrind is not installed (scripts/system-deps installs it)", file=sys.stderr)
        return 2
    checkouts = [Checkout(REPO), *([Checkout(args.candidate.resolve())] if args.candidate else [])]
    for checkout in checkouts:
        differ = sql_differences(checkout.path / "migrations", checkout.served_sql())
        if differ:  # its Python would run against another checkout's SQL
            print(f"service_cpu: {checkout.path} would be served the SQL of {checkout.served_sql()}"
                  f" ({', '.join(differ[:5])} differ): give it an environment of its own (make install-test)",
                  file=sys.stderr)
            return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="rg-service-cpu-") as tmp:
        for n, checkout in enumerate(checkouts):
            work = (args.keep / f"checkout-{n}") if args.keep else Path(tmp) / f"checkout-{n}"
            work.mkdir(parents=True, exist_ok=True)
            results.append(measure(checkout, args, work))
            report(results[-1], args)
    ok = all(set(r["reasons"]) == {EXPECTED[kind]} for res in results for kind, r in res["kinds"].items())
    if len(results) == 2:
        print("\n| kind | this checkout | candidate | candidate / this |")
        print("|---|---|---|---|")
        for kind in args.kinds:
            a, b = results[0]["kinds"][kind]["per_decision"], results[1]["kinds"][kind]["per_decision"]
            print(f"| {kind} | {a:,.0f} | {b:,.0f} | {b / a:.3f} |")
    if not ok:
        print("\nsome answers were not the kind's expected reason: the figures measure something else",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
