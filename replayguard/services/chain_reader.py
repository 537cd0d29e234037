"""Reading the ledger's rows in ``seq`` order and checking their chain, here or in a child.

Reading and re-hashing an entry costs about 2.5 µs of the reader's CPU (asyncpg's decoding
included; ``ChainChecker.feed_fields`` hashes the records' fields without building a row
object for each). A serving worker checks the entries since the last checkpoint about
once a second before it signs the next one: at 10,000 decisions a second that is a few
per cent of a core, taken from the decisions on the same event loop. So a
serving worker hands the check to ``ChainProcess``: one child process, started on first
use, that reads the rows over a connection of its own at a lower CPU priority
(``CHILD_NICE``) and answers with what it found; the worker only waits. The child dies
with its parent. When the child cannot answer (it was killed, it cannot start, it cannot
reach the database), the worker checks on its own loop, in short stretches, so a broken
child never skips a check; the next check starts a new child. The CLI checks in process
(``check_here``).

A whole-ledger verification also compares the chain with the signed checkpoints of the
service's key (``Pins``). The reader fetches them range by range beside the rows, so
neither process holds them all, and verifies a signature only where a checkpoint
disagrees with the chain (``core/ledger_check.py``): a quiet deployment signs about one
checkpoint per entry, and an Ed25519 verification costs about 40 times the re-hashing of
an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..core import checkpoints as cps
from ..core.ledger_check import ChainChecker, Finding, Problem
from ..pg.session import client_timeout_s, connect_timeout_s, session_settings

# Rows per read where nothing else waits on the loop (the child, the CLI). A read's records
# are the reader's largest allocation: the child's RSS peaked at 49 MB with 10,000 rows a
# read and 41.8 MB with 2,000, for the same CPU per row (13,000 rows, alternated).
BATCH = 2_000
# In a serving worker's own loop a read decodes SERVING_BATCH rows in one go, and
# YIELD_EVERY rows are converted and hashed in one go: each stretch stays under half a
# millisecond of CPU (bench/loop_blocks.py measures it).
SERVING_BATCH = 250
YIELD_EVERY = 50
# Signature verifications (Ed25519, about 90-120 µs each) between two turns of a serving
# loop: a stretch of the chain check also ends after this many checkpoints, since each
# that disagrees costs one, and LedgerService verifies those past the head this many at
# a time.
PINS_PER_STRETCH = 4
CHILD_NICE = 10  # the child yields the CPU to decisions (the worker and PostgreSQL)
_PR_SET_PDEATHSIG = 1
# The columns in the order ChainChecker.feed_fields takes them.
_ROWS = (
    "SELECT seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload::text AS payload_text,"
    " prev_hash, hash FROM ledger WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
)
_CHECKPOINTS = ("SELECT seq, hash, ts_us, key_id, signature FROM checkpoints"
                " WHERE key_id = ANY($1::text[]) AND seq > $2 AND seq <= $3")
Progress = Callable[[int, int], None]  # (rows checked so far, rows to check)


@dataclass(frozen=True, slots=True)
class ChainResult:
    checked: int
    finding: Finding | None
    pinned: int = 0  # checkpoints the chain agreed with
    forged: int = 0  # checkpoints that disagreed without a valid signature (set aside)
    first_forged: int | None = None


@dataclass(frozen=True, slots=True)
class RetiredPin:
    """A signing key a rotation retired, and the last entry it signed checkpoints of."""

    key_id: str
    public_key: Ed25519PublicKey
    last_seq: int


@dataclass(frozen=True, slots=True)
class Pins:
    """Whose checkpoints pin the chain: the service's key, and the keys it was handed over
    from, each for its own span of entries (``core/handover.py``; public, so they may go
    to the child). A checkpoint of a retired key past its span pins nothing
    (``LedgerService.verify`` flags a genuine one)."""

    key_id: str
    public_key: Ed25519PublicKey
    retired: tuple[RetiredPin, ...] = ()

    def key_ids(self) -> list[str]:
        return [self.key_id, *(pin.key_id for pin in self.retired)]

    def spans(self, record: asyncpg.Record) -> bool:
        """Whether the checkpoint's key is the one that signs its entry's checkpoints."""
        seq: int = record["seq"]
        first = 0
        for pin in self.retired:
            if record["key_id"] == pin.key_id:
                return first <= seq <= pin.last_seq
            first = pin.last_seq + 1
        return bool(record["key_id"] == self.key_id) and seq >= first

    def genuine(self, record: asyncpg.Record) -> bool:
        public = next((p.public_key for p in self.retired if p.key_id == record["key_id"]), self.public_key)
        return cps.verify(public, cps.from_row(record))

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key_pem": cps.public_key_pem(self.public_key),
                "retired": [{"key_id": p.key_id, "public_key_pem": cps.public_key_pem(p.public_key),
                             "last_seq": p.last_seq} for p in self.retired]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pins:
        retired = tuple(RetiredPin(p["key_id"], cps.load_public_key(p["public_key_pem"].encode()), p["last_seq"])
                        for p in data.get("retired", ()))
        return cls(data["key_id"], cps.load_public_key(data["public_key_pem"].encode()), retired)


class ChildFailed(Exception):
    """The child could not check (no database, a query failed); the worker checks itself."""


async def _stream(conn: asyncpg.Connection, after: int, upto: int,
                  batch: int) -> AsyncIterator[list[asyncpg.Record]]:
    """Records ``after < seq <= upto`` in batches: each batch is one indexed range scan."""
    while after < upto:
        records = await conn.fetch(_ROWS, after, upto, batch)
        if not records:
            return
        yield records
        after = records[-1]["seq"]


async def _pin(conn: asyncpg.Connection, checker: ChainChecker, pins: Pins, after: int, upto: int) -> None:
    """Gives ``checker`` the checkpoints of entries ``after < seq <= upto`` (one indexed range)."""
    found = {record["seq"]: record for record in await conn.fetch(_CHECKPOINTS, pins.key_ids(), after, upto)
             if pins.spans(record)}
    checker.checkpoints = {seq: bytes(record["hash"]) for seq, record in found.items()}
    checker.genuine = lambda seq: pins.genuine(found[seq])


async def check_range(conn: asyncpg.Connection, checker: ChainChecker, upto: int,
                      progress: Progress | None = None, *, batch: int = BATCH,
                      yield_every: int | None = None, pins: Pins | None = None) -> None:
    """Feeds ``checker`` the rows up to ``upto`` (with ``pins``, and the checkpoints among
    them); with ``yield_every``, lets the event loop run other work between stretches of
    that many rows and at most ``PINS_PER_STRETCH`` checkpoints."""
    total = upto - checker.start_seq
    after = checker.start_seq
    async for records in _stream(conn, checker.start_seq, upto, batch):
        if pins is not None:
            await _pin(conn, checker, pins, after, records[-1]["seq"])
        after = records[-1]["seq"]
        if yield_every is None:
            if checker.feed_fields(records) is not None:
                return
        else:
            for stretch in stretches(records, yield_every, checker.checkpoints):
                if checker.feed_fields(stretch) is not None:
                    return
                await asyncio.sleep(0)
        if progress is not None:
            progress(checker.checked, total)


def stretches(records: list[asyncpg.Record], rows: int, checkpoints: Mapping[int, bytes],
              pins: int = PINS_PER_STRETCH) -> Iterator[list[asyncpg.Record]]:
    """``records`` cut into runs of at most ``rows`` rows, each ending after its ``pins``-th
    row with a checkpoint."""
    start = pinned = 0
    for n, record in enumerate(records, 1):
        pinned += record["seq"] in checkpoints
        if n - start == rows or pinned == pins:
            yield records[start:n]
            start, pinned = n, 0
    if start < len(records):
        yield records[start:]


async def check_here(conn: asyncpg.Connection, start_seq: int, start_hash: bytes, head_seq: int,
                     head_hash: bytes, pins: Pins | None = None, *,
                     serving: bool = True, progress: Progress | None = None) -> ChainResult:
    """The chain from ``start_seq`` to the head (and, with ``pins``, against the
    checkpoints up to the head), checked on this event loop (``serving``: in short
    stretches, beside decisions)."""
    checker = ChainChecker(start_seq, start_hash)
    if serving:
        await check_range(conn, checker, head_seq, progress, batch=SERVING_BATCH, yield_every=YIELD_EVERY, pins=pins)
    else:
        await check_range(conn, checker, head_seq, progress, pins=pins)
    finding = checker.finding or checker.finish(head_seq, head_hash)
    return ChainResult(checker.checked, finding, checker.pinned, checker.forged, checker.first_forged)


class ChainProcess:
    """One child process checking ranges of the chain for this worker (see the module).

    The child is ``python -c`` running ``child_main``: a configuration line, then one JSON
    request line per check on its stdin, one JSON answer line per check on its stdout.
    A pipe and a line each way, and no ``multiprocessing``: that would add a resource
    tracker process, and its spawn would re-import the service's entry script."""

    def __init__(self, dsn: str, statement_timeout_ms: int) -> None:
        self._config: dict[str, Any] = {"dsn": dsn, "statement_timeout_ms": statement_timeout_ms}
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one check at a time over the pipe
        self._apart = asyncio.Lock()  # one child at a time for check_apart

    async def check(self, start_seq: int, start_hash: bytes, head_seq: int, head_hash: bytes,
                    pins: Pins | None = None) -> ChainResult:
        """Raises ``ChildFailed`` when the child cannot answer; the next call starts a new
        child when this one died."""
        request = {"start_seq": start_seq, "start_hash": start_hash.hex(), "head_seq": head_seq,
                   "head_hash": head_hash.hex(), "pins": None if pins is None else pins.to_json()}
        async with self._lock:
            try:
                answer = await self._ask(request)
            except BaseException:
                # Dead, or cancelled with an answer still owed: the pipe is out of step.
                self.close()
                raise
        try:
            if "error" in answer:
                raise ChildFailed(str(answer["error"]))
            return _result(answer)
        except (KeyError, TypeError, ValueError) as exc:
            raise ChildFailed(f"the chain check process answered something else: {type(exc).__name__}") from None

    async def check_apart(self, start_seq: int, start_hash: bytes, head_seq: int, head_hash: bytes,
                          pins: Pins | None = None) -> ChainResult:
        """``check`` in a child of its own, stopped after it: a long check (an analyst's
        verification of the whole ledger) never delays the checkpoint checks made through
        ``check``. One such child at a time; a second waits for the first."""
        async with self._apart:
            child = ChainProcess(self._config["dsn"], self._config["statement_timeout_ms"])
            try:
                return await child.check(start_seq, start_hash, head_seq, head_hash, pins)
            finally:
                child.close()

    async def _ask(self, request: dict[str, object]) -> dict[str, Any]:
        proc = self._proc if self._proc is not None and self._proc.returncode is None else await self._start()
        assert proc.stdin is not None and proc.stdout is not None  # noqa: S101 - both are pipes (_start)
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        except (OSError, ValueError) as exc:
            raise ChildFailed(f"the chain check process stopped: {type(exc).__name__}") from None
        if not line:
            raise ChildFailed("the chain check process stopped")
        try:
            answer = json.loads(line)
        except ValueError:
            raise ChildFailed("the chain check process answered something else") from None
        if not isinstance(answer, dict):
            raise ChildFailed("the chain check process answered something else")
        return answer

    async def _start(self) -> asyncio.subprocess.Process:
        self.close()
        package_root = str(Path(__file__).resolve().parents[2])  # this copy of replayguard, not another
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, limit=_ANSWER_LIMIT)
        except OSError as exc:
            raise ChildFailed(f"the chain check process did not start: {exc}") from None
        self._proc = proc
        assert proc.stdin is not None  # noqa: S101 - a pipe
        proc.stdin.write(json.dumps({**self._config, "parent": os.getpid()}).encode() + b"\n")
        return proc

    def pids(self) -> list[int]:
        """The child's pid while it runs (for tests and the bench)."""
        proc = self._proc
        return [proc.pid] if proc is not None and proc.returncode is None else []

    def close(self) -> None:
        """Stops the child (a check under way is abandoned); the next check starts another."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            _reap(proc)


def _reap(proc: asyncio.subprocess.Process) -> None:
    """Collects the killed child's exit in the background (no zombie is left)."""
    with contextlib.suppress(RuntimeError):  # no loop running: the child is reaped at exit
        task = asyncio.get_running_loop().create_task(proc.wait())
        _REAPING.add(task)
        task.add_done_callback(_REAPING.discard)


_REAPING: set[asyncio.Task[int]] = set()
_ANSWER_LIMIT = 1 << 20
_CHILD = "from replayguard.services.chain_reader import child_main; child_main()"


def _result(answer: dict[str, Any]) -> ChainResult:
    finding = answer["finding"]
    return ChainResult(answer["checked"], None if finding is None else
                       Finding(finding["seq"], Problem(finding["problem"]), finding["message"]),
                       answer["pinned"], answer["forged"], answer["first_forged"])


def _answer(result: ChainResult) -> dict[str, object]:
    finding = result.finding
    return {"checked": result.checked, "finding": None if finding is None else
            {"seq": finding.seq, "problem": finding.problem.value, "message": finding.message},
            "pinned": result.pinned, "forged": result.forged, "first_forged": result.first_forged}


# --- in the child ---------------------------------------------------------------------


@dataclass
class _Child:
    dsn: str
    statement_timeout_ms: int
    conn: asyncpg.Connection | None = None

    async def check(self, request: dict[str, Any]) -> ChainResult:
        try:
            if self.conn is None or self.conn.is_closed():
                # Timed out on the client too, so a half-open connection fails the check
                # instead of holding the leader's duties.
                self.conn = await asyncpg.connect(self.dsn, command_timeout=client_timeout_s(self.statement_timeout_ms),
                                                  timeout=connect_timeout_s(self.statement_timeout_ms),
                                                  server_settings=session_settings(self.statement_timeout_ms))
            pins = None if request["pins"] is None else Pins.from_json(request["pins"])
            return await check_here(self.conn, request["start_seq"], bytes.fromhex(request["start_hash"]),
                                    request["head_seq"], bytes.fromhex(request["head_hash"]), pins,
                                    serving=False)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self.conn is not None:
                self.conn.terminate()
                self.conn = None
            raise ChildFailed(f"{type(exc).__name__}: {exc}") from None


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent exits, however it exits (Linux); elsewhere the child exits
    when its stdin closes, after the check under way."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def child_main() -> None:
    """The child's loop: answers each request line until its stdin closes."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to the service's stderr, not into the answers
    config = json.loads(sys.stdin.readline() or "null")
    if config is None:
        return
    _die_with_parent(config["parent"])
    os.nice(CHILD_NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    child = _Child(config["dsn"], config["statement_timeout_ms"])
    loop = asyncio.new_event_loop()
    for line in sys.stdin:
        try:
            answer = _answer(loop.run_until_complete(child.check(json.loads(line))))
        except ChildFailed as exc:
            answer = {"error": str(exc)}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
