"""The serving worker's chain checks in a child process (``services/chain_reader.py``):
the child finds what the worker's own loop finds, runs at a lower CPU priority, is
replaced when it dies, never lets a check be skipped, and dies with its parent."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from replayguard.core import checkpoints as cps
from replayguard.core.chain import GENESIS
from replayguard.core.checkpoints import Checkpoint
from replayguard.core.ledger_check import Finding, Problem
from replayguard.keys import Keys
from replayguard.services import chain_reader
from replayguard.services.chain_reader import (
    CHILD_NICE,
    PINS_PER_STRETCH,
    ChainProcess,
    ChainResult,
    ChildFailed,
    Pins,
    check_here,
)
from replayguard.services.ledger import LedgerService
from tests.integration.tcp_proxy import proxied
from tests.ledger_rows import append_nonces
from tests.waiting import blocked_by, until


@pytest_asyncio.fixture
async def ledger_db(fresh_database: Callable[[], Any]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database of its own holding 300 chained entries, and a connection to it."""
    dsn = await fresh_database()
    conn = await asyncpg.connect(dsn)
    await append_nonces(conn, 1, 300)
    yield dsn, conn
    await conn.close()


@pytest_asyncio.fixture
async def chain(ledger_db: tuple[str, asyncpg.Connection]) -> AsyncIterator[ChainProcess]:
    process = ChainProcess(ledger_db[0], 30_000)
    yield process
    process.close()


@pytest_asyncio.fixture
async def pool(ledger_db: tuple[str, asyncpg.Connection]) -> AsyncIterator[asyncpg.Pool]:
    """A pool over the test's database, as a worker's LedgerService has."""
    made = await asyncpg.create_pool(ledger_db[0], min_size=1, max_size=3)
    assert made is not None
    yield made
    await made.close()


@pytest_asyncio.fixture
async def blocker(ledger_db: tuple[str, asyncpg.Connection]) -> AsyncIterator[asyncpg.Connection]:
    """Another session, to hold the ledger locked while a check waits on it."""
    conn = await asyncpg.connect(ledger_db[0])
    yield conn
    await conn.close()


async def _lock_ledger(blocker: asyncpg.Connection) -> None:
    """Every read of the ledger waits until ``_unlock_ledger``."""
    await blocker.execute("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE")


async def _unlock_ledger(blocker: asyncpg.Connection) -> None:
    await blocker.execute("ROLLBACK")


async def _head(conn: asyncpg.Connection) -> tuple[int, bytes]:
    head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
    return head["seq"], bytes(head["hash"])


async def _tamper(conn: asyncpg.Connection, statement: str) -> None:
    await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_append_only")
    await conn.execute(statement)
    await conn.execute("ALTER TABLE ledger ENABLE TRIGGER ledger_append_only")


KEYS = Keys(*(bytes([n]) * 32 for n in range(1, 5)))


def _service(pool: asyncpg.Pool, chain: ChainProcess | None) -> LedgerService:
    return LedgerService(pool, KEYS, chain=chain, serving=True)


async def test_the_check_runs_in_a_child_process_at_a_lower_priority(
        ledger_db: tuple[str, asyncpg.Connection], chain: ChainProcess) -> None:
    """The child checks every entry over a connection of its own, niced by CHILD_NICE."""
    _dsn, conn = ledger_db
    result = await chain.check(0, GENESIS, *await _head(conn))
    assert (result.checked, result.finding) == (300, None)
    [pid] = chain.pids()
    assert pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + CHILD_NICE)
    names = await conn.fetch("SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")
    assert f"replayguard-{pid}" in {r["application_name"] for r in names}


TAMPERINGS = {
    "modified": ("UPDATE ledger SET reason = 'reused' WHERE seq = 120", 120, Problem.MODIFIED),
    "deleted": ("DELETE FROM ledger WHERE seq = 77", 77, Problem.MISSING),
    "swapped": ("UPDATE ledger SET seq = -1 WHERE seq = 50; UPDATE ledger SET seq = 50 WHERE seq = 51;"
                " UPDATE ledger SET seq = 51 WHERE seq = -1", 50, Problem.MODIFIED),
    "head_ahead": ("UPDATE ledger_head SET seq = 305", 301, Problem.HEAD_MISMATCH),
    "tail_cut": ("DELETE FROM ledger WHERE seq > 290", 291, Problem.HEAD_MISMATCH),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
async def test_the_child_finds_what_the_event_loop_finds(
        name: str, ledger_db: tuple[str, asyncpg.Connection], chain: ChainProcess) -> None:
    """Differential: the same tampering gives the same finding in the child, in short
    stretches on the loop, and in full batches (the CLI's way)."""
    _dsn, conn = ledger_db
    statement, seq, problem = TAMPERINGS[name]
    await _tamper(conn, statement)
    head = await _head(conn)
    results = [await chain.check(0, GENESIS, *head),
               await check_here(conn, 0, GENESIS, *head, serving=True),
               await check_here(conn, 0, GENESIS, *head, serving=False)]
    assert results[0] == results[1] == results[2]
    assert results[0].finding is not None
    assert (results[0].finding.seq, results[0].finding.problem) == (seq, problem)


async def _insert(conn: asyncpg.Connection, *checkpoints: Checkpoint) -> None:
    for cp in checkpoints:
        await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5)",
                           cp.seq, cp.hash, cp.ts_us, cp.key_id, cp.signature)


def _signed(key: Ed25519PrivateKey, seq: int, digest: bytes) -> Checkpoint:
    return cps.sign(key, seq, digest, 1_800_000_000_000_000 + seq)


PINS = Pins(cps.key_id(KEYS.signing_key().public_key()), KEYS.signing_key().public_key())


async def test_checkpoints_are_read_beside_the_rows_in_the_child_and_on_the_loop(
        ledger_db: tuple[str, asyncpg.Connection], chain: ChainProcess) -> None:
    """Differential: the child, short stretches on the loop and full batches read the
    service's checkpoints range by range beside the rows (one at the loop's batch edge,
    250) and give the same result. Agreeing ones pin the chain; one that disagrees under a
    signature that does not hold is set aside as forged; another key's is not read; a
    genuine one over a hash its entry no longer has (the chain was rewritten after it was
    signed) is found at that entry."""
    _dsn, conn = ledger_db
    head = await _head(conn)
    hashes = {seq: bytes(digest) for seq, digest in await conn.fetch("SELECT seq, hash FROM ledger")}
    ours = KEYS.signing_key()
    forged = dataclasses.replace(_signed(ours, 100, b"\1" * 32), signature=bytes(64))
    await _insert(conn, *(_signed(ours, seq, hashes[seq]) for seq in (10, 120, 250)), forged,
                  _signed(Ed25519PrivateKey.generate(), 60, b"\2" * 32))

    async def every_way() -> ChainResult:
        results = [await chain.check(0, GENESIS, *head, PINS),
                   await check_here(conn, 0, GENESIS, *head, PINS, serving=True),
                   await check_here(conn, 0, GENESIS, *head, PINS, serving=False)]
        assert results[0] == results[1] == results[2]
        return results[0]

    assert await every_way() == ChainResult(300, None, pinned=3, forged=1, first_forged=100)
    await _insert(conn, _signed(ours, 200, b"\3" * 32))
    rewritten = await every_way()
    assert rewritten.finding is not None and rewritten.finding.problem is Problem.CHECKPOINT_MISMATCH
    assert (rewritten.finding.seq, rewritten.checked, rewritten.pinned, rewritten.forged) == (200, 199, 2, 1)
    assert (await chain.check(0, GENESIS, *head)).pinned == 0  # without pins, no checkpoint is read


async def test_signatures_are_verified_only_where_a_checkpoint_disagrees(
        ledger_db: tuple[str, asyncpg.Connection], pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet deployment signs about one checkpoint per entry, and a signature costs
    about 40 times an entry's re-hashing. 300 checkpoints that agree with the chain pin it
    with no signature verified. One altered so that it disagrees costs one verification,
    is set aside and logged, and the rest still pin. Past the head, a forged checkpoint is
    set aside (one verification) and a genuine one means the tail was cut off."""
    _dsn, conn = ledger_db
    ours = KEYS.signing_key()
    await _insert(conn, *(_signed(ours, seq, bytes(digest))
                          for seq, digest in await conn.fetch("SELECT seq, hash FROM ledger ORDER BY seq")))
    verified: list[int] = []
    real_verify = cps.verify

    def counting(public: Any, cp: Checkpoint) -> bool:
        verified.append(cp.seq)
        return real_verify(public, cp)

    monkeypatch.setattr(cps, "verify", counting)
    ledger = _service(pool, None)
    report = await ledger.verify()
    assert (report.ok, report.checked, report.checkpoints, verified) == (True, 300, 300, [])

    await conn.execute("UPDATE checkpoints SET hash = sha256(hash) WHERE seq = 150")
    with capture_logs() as logs:
        report = await ledger.verify()
    assert (report.ok, report.checkpoints, verified) == (True, 299, [150])
    assert {"event": "checkpoint_signature_invalid", "count": 1, "first_seq": 150,
            "log_level": "error"} in logs

    await _insert(conn, dataclasses.replace(_signed(ours, 400, b"\4" * 32), signature=bytes(64)))
    assert (await ledger.verify()).ok is True
    await _insert(conn, _signed(ours, 401, b"\5" * 32))
    report = await ledger.verify()
    assert report.finding is not None and report.finding.problem is Problem.MISSING_TAIL
    assert report.finding.seq == 301


async def test_forged_checkpoints_cut_the_loops_stretches(
        ledger_db: tuple[str, asyncpg.Connection], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a serving loop (the fallback when the child cannot answer), every checkpoint
    that disagrees costs a signature verification: with 300 forged ones, one per entry, a
    probe task counts the verifications made between two of its turns, and never sees
    more than PINS_PER_STRETCH; all 300 are verified and set aside."""
    _dsn, conn = ledger_db
    head = await _head(conn)
    await _insert(conn, *(dataclasses.replace(_signed(KEYS.signing_key(), seq, b"\6" * 32), signature=bytes(64))
                          for seq in range(1, 301)))
    since_turn, most, total = 0, 0, 0
    real_verify = cps.verify

    def counting(public: Any, cp: Checkpoint) -> bool:
        nonlocal since_turn, total
        since_turn, total = since_turn + 1, total + 1
        return real_verify(public, cp)

    monkeypatch.setattr(cps, "verify", counting)
    done = False

    async def probe() -> None:
        nonlocal since_turn, most
        while not done:
            most, since_turn = max(most, since_turn), 0
            await asyncio.sleep(0)

    spin = asyncio.create_task(probe())
    await asyncio.sleep(0)
    try:
        result = await check_here(conn, 0, GENESIS, *head, PINS, serving=True)
    finally:
        done = True
        await spin
    assert result == ChainResult(300, None, pinned=0, forged=300, first_forged=1)
    assert (total, most) == (300, PINS_PER_STRETCH)


async def test_checkpoints_past_the_head_are_verified_in_short_stretches_beside_decisions(
        ledger_db: tuple[str, asyncpg.Connection], pool: asyncpg.Pool) -> None:
    """Checkpoints past the head are none or one in a sound ledger, but whoever can write
    to the database can add any number, each costing a signature verification (about
    90 µs). A serving worker's loop gets a turn after every PINS_PER_STRETCH of them, and
    every one still counts: a forged one among them is left out."""
    _dsn, conn = ledger_db
    key = KEYS.signing_key()
    await _insert(conn, *(_signed(key, seq, bytes([seq % 256]) * 32) for seq in range(301, 601)))
    await conn.execute("UPDATE checkpoints SET ts_us = ts_us + 1 WHERE seq = 450")  # no longer what was signed
    records = await conn.fetch("SELECT * FROM checkpoints ORDER BY seq")
    ledger = _service(pool, None)
    turns = 0
    done = False

    async def probe() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    spin = asyncio.create_task(probe())
    await asyncio.sleep(0)
    turns = 0
    try:
        signed = await ledger._signed_checkpoints(records)
    finally:
        done = True
        await spin
    assert [cp.seq for cp in signed] == [seq for seq in range(301, 601) if seq != 450]
    assert turns >= 300 // PINS_PER_STRETCH - 1


async def test_a_child_killed_mid_check_skips_no_check_and_is_replaced(
        ledger_db: tuple[str, asyncpg.Connection], chain: ChainProcess, pool: asyncpg.Pool,
        blocker: asyncpg.Connection) -> None:
    """With its child killed during a check, the worker checks on its own loop (and still
    finds a tampered entry); the next check has a new child, and a child killed between
    checks is replaced before the check."""
    _dsn, conn = ledger_db
    ledger = _service(pool, chain)
    first = await ledger.checkpoint_if_due(1_800_000_000_000_000, 1, 10**12)
    assert isinstance(first, Checkpoint) and first.seq == 300
    await append_nonces(conn, 301, 340)
    await _tamper(conn, "UPDATE ledger SET subject = 'other' WHERE seq = 321")
    await _lock_ledger(blocker)
    with capture_logs() as logs:
        task = asyncio.create_task(ledger.checkpoint_if_due(1_800_000_001_000_000, 1, 10**12))
        await blocked_by(conn, blocker.get_server_pid(), timeout=60)  # the child's read waits
        [old] = chain.pids()
        os.kill(old, signal.SIGKILL)
        await until(lambda: not chain.pids(), "the worker to notice its child died")
        await _unlock_ledger(blocker)
        found = await asyncio.wait_for(task, 60)
    assert found == Finding(321, Problem.MODIFIED, "entry 321 no longer matches its hash: it was modified")
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["chain_check_in_process"]
    assert await conn.fetchval("SELECT max(seq) FROM checkpoints") == 300  # nothing signed over it
    assert await ledger.checkpoint_if_due(1_800_000_002_000_000, 1, 10**12) == found
    [new] = chain.pids()
    assert new != old
    os.kill(new, signal.SIGKILL)
    await until(lambda: not chain.pids(), "the worker to notice its child died")
    with capture_logs() as logs:
        assert await ledger.checkpoint_if_due(1_800_000_003_000_000, 1, 10**12) == found
    assert not [e for e in logs if e["log_level"] == "warning"]
    assert chain.pids() and chain.pids() != [new]


async def test_a_child_without_the_database_leaves_the_check_to_the_worker(
        ledger_db: tuple[str, asyncpg.Connection], pool: asyncpg.Pool) -> None:
    """A child that cannot connect raises ChildFailed, and the checkpoint is still
    checked (on the worker's loop) and signed."""
    _dsn, conn = ledger_db
    broken = ChainProcess("postgresql://postgres@127.0.0.1:1/nowhere", 30_000)
    try:
        with pytest.raises(ChildFailed, match=r"ConnectionRefused|OSError|connect"):
            await broken.check(0, GENESIS, *await _head(conn))
        signed = await _service(pool, broken).checkpoint_if_due(1_800_000_000_000_000, 1, 10**12)
        assert isinstance(signed, Checkpoint) and signed.seq == 300
    finally:
        broken.close()


async def test_no_transaction_stays_open_while_the_child_checks(
        ledger_db: tuple[str, asyncpg.Connection], chain: ChainProcess, pool: asyncpg.Pool,
        blocker: asyncpg.Connection) -> None:
    """While the child waits on the ledger, the worker's connection holds the checkpoint
    lock in its session but no transaction (a long check cannot be cut off by
    idle_in_transaction_session_timeout)."""
    _dsn, conn = ledger_db
    ledger = _service(pool, chain)
    await _lock_ledger(blocker)
    task = asyncio.create_task(ledger.checkpoint_if_due(1_800_000_000_000_000, 1, 10**12))

    async def lock_holder_state() -> str | None:
        state: str | None = await conn.fetchval(
            "SELECT a.state FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()")
        return state

    await blocked_by(conn, blocker.get_server_pid(), timeout=60)  # the child's read waits
    assert await lock_holder_state() == "idle"
    await _unlock_ledger(blocker)
    signed = await asyncio.wait_for(task, 60)
    assert isinstance(signed, Checkpoint) and signed.seq == 300
    assert await lock_holder_state() is None  # released after signing


_PARENT = textwrap.dedent("""
    import asyncio, sys, time
    from replayguard.core.chain import GENESIS
    from replayguard.services.chain_reader import ChainProcess

    async def main():
        chain = ChainProcess(sys.argv[1], 30_000)
        await chain.check(0, GENESIS, 0, GENESIS)
        print(chain.pids()[0], flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        asyncio.run(main())
""")


async def test_the_child_dies_with_its_parent(ledger_db: tuple[str, asyncpg.Connection], tmp_path: Any) -> None:
    """A worker killed with SIGKILL leaves no chain check process behind."""
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), ledger_db[0]], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), 60)
        child = int(line)
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        await until(lambda: not _alive(child), "the child to exit with its parent")
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def _alive(pid: int) -> bool:
    """Alive and not a zombie (a dead child of a dead parent is reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_half_open_connection_fails_the_childs_check_instead_of_hanging(
        ledger_db: tuple[str, asyncpg.Connection]) -> None:
    """The child's connection stops answering without closing: its read times out on the
    client, and the check fails (the worker then checks itself) rather than waiting on TCP."""
    dsn, conn = ledger_db
    async with proxied(dsn) as (proxy, through_proxy):
        chain = ChainProcess(through_proxy, 1000)
        try:
            head = await _head(conn)
            assert (await chain.check(0, GENESIS, *head)).finding is None
            assert proxy.freeze() == 1
            with pytest.raises(ChildFailed, match="TimeoutError"):
                await asyncio.wait_for(chain.check(0, GENESIS, *head), 30)
        finally:
            chain.close()


async def test_a_whole_ledger_verification_never_holds_up_the_checkpoint_checks(
        ledger_db: tuple[str, asyncpg.Connection], chain: ChainProcess, pool: asyncpg.Pool,
        blocker: asyncpg.Connection) -> None:
    """An analyst's verification runs in a child of its own: while it waits, the
    checkpoint child answers; after it, its child is gone and the checkpoint child stays."""
    _dsn, conn = ledger_db
    ledger = _service(pool, chain)
    assert isinstance(await ledger.checkpoint_if_due(1_800_000_000_000_000, 1, 10**12), Checkpoint)
    [checkpoint_child] = chain.pids()
    await _lock_ledger(blocker)
    verifying = asyncio.create_task(ledger.verify())
    waiting = await blocked_by(conn, blocker.get_server_pid(), timeout=60)
    assert (await asyncio.wait_for(chain.check(0, GENESIS, 0, GENESIS), 30)).checked == 0
    assert chain.pids() == [checkpoint_child]
    names = await conn.fetch("SELECT application_name FROM pg_stat_activity WHERE pid = ANY($1)", waiting)
    assert f"replayguard-{checkpoint_child}" not in {r["application_name"] for r in names}
    await _unlock_ledger(blocker)
    report = await asyncio.wait_for(verifying, 60)
    assert report.ok and report.checked == 300
    assert chain.pids() == [checkpoint_child]


@pytest.mark.parametrize("answer", ["not json", "[1]", '{"checked": "x"}', '{"error": null, "x": 1}'])
async def test_a_child_that_answers_something_else_leaves_the_check_to_the_worker(
        answer: str, ledger_db: tuple[str, asyncpg.Connection], pool: asyncpg.Pool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever comes back over the pipe that is not an answer is ChildFailed, never an
    exception that would end the leader's duties, and the checkpoint is still checked and
    signed on the worker's loop."""
    dsn, conn = ledger_db
    monkeypatch.setattr(chain_reader, "_CHILD", f"import sys\nfor _ in sys.stdin: print({answer!r}, flush=True)")
    liar = ChainProcess(dsn, 30_000)
    try:
        with pytest.raises(ChildFailed):
            await liar.check(0, GENESIS, *await _head(conn))
        signed = await _service(pool, liar).checkpoint_if_due(1_800_000_000_000_000, 1, 10**12)
        assert isinstance(signed, Checkpoint) and signed.seq == 300
    finally:
        liar.close()


def _forged(kind: str, seq: int, key_id: str) -> Checkpoint:
    """A checkpoint row naming ``key_id`` over a hash entry ``seq`` does not have, with a
    garbage signature or one of another key."""
    if kind == "garbage":
        return Checkpoint(seq, os.urandom(32), 1_800_000_000_500_000, key_id, os.urandom(64))
    return dataclasses.replace(cps.sign(Ed25519PrivateKey.generate(), seq, os.urandom(32), 1_800_000_000_500_000),
                               key_id=key_id)


@pytest.mark.parametrize("kind", ["garbage", "another_key"])
@pytest.mark.parametrize("where", [310, 305, 320], ids=["at_head", "below_head", "past_head"])
async def test_a_forged_checkpoint_row_costs_the_checkpointer_one_log_line_and_no_rehash_per_tick(
        kind: str, where: int, ledger_db: tuple[str, asyncpg.Connection], pool: asyncpg.Pool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone writing to the database puts a forged checkpoint row naming our key at the
    head, below it (the newest at or below the head) or past it, over a sound chain whose
    entry 300 holds a genuine checkpoint. Over six ticks of the checkpointer the row is
    logged once and its signature verified once, and the checkpointer re-hashes no entry
    the genuine checkpoint covers: only those after it, once (none while the row holds the
    head's place, where nothing can be signed); the next entry is signed as usual."""
    _dsn, conn = ledger_db
    ledger = _service(pool, None)
    genuine = await ledger.checkpoint_if_due(1_800_000_000_000_000, 1, 10**12)
    assert isinstance(genuine, Checkpoint) and genuine.seq == 300
    await append_nonces(conn, 301, 310)
    row = _forged(kind, where, ledger.key_id)
    await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5)", *dataclasses.astuple(row))
    rehashed: list[tuple[int, int]] = []
    check_chain = ledger._check_chain

    async def counted(*args: Any, **kwargs: Any) -> ChainResult:
        result = await check_chain(*args, **kwargs)
        rehashed.append((args[1], result.checked))  # (the entry it continued from, entries re-hashed)
        return result

    verified: list[int] = []
    verify = cps.verify

    def counted_verify(public_key: Any, cp: Checkpoint) -> bool:
        verified.append(cp.seq)
        return verify(public_key, cp)

    monkeypatch.setattr(ledger, "_check_chain", counted)
    monkeypatch.setattr(cps, "verify", counted_verify)
    with capture_logs() as logs:
        results = [await ledger.checkpoint_if_due(1_800_000_001_000_000 + n, 1, 10**12) for n in range(6)]
    invalid = [e for e in logs if e["event"] == "checkpoint_signature_invalid"]
    assert [e["seq"] for e in invalid] == [where] and verified.count(where) == 1, (invalid, verified)
    assert not [e for e in logs if e["event"] == "checkpoint_seq_taken"]
    if where == 310:
        assert rehashed == [] and results == [None] * 6
    else:
        assert rehashed == [(300, 10)] and [getattr(r, "seq", None) for r in results] == [310] + [None] * 5
    for line in logs:
        assert row.signature.hex() not in repr(line) and row.hash.hex() not in repr(line)
    await append_nonces(conn, 311, 311)
    signed = await ledger.checkpoint_if_due(1_800_000_002_000_000, 1, 10**12)
    assert isinstance(signed, Checkpoint) and signed.seq == 311
    assert rehashed[-1] == ((300, 11) if where == 310 else (310, 1))  # from the newest genuine checkpoint
