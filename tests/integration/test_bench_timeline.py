"""bench/timeline.py's samplers on a real database and service: the commit probe's commits are
made and the slow ones marked, a decision call still running is marked, and so is a slow ledger
transaction the service's /metrics timed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from replayguard.settings import Secret
from tests.bench_scripts import load
from tests.conftest import uid
from tests.waiting import blocked_by, until


@pytest.mark.parametrize("slow_ms", [0.0, 10_000.0])
async def test_the_commit_probe_marks_the_commits_at_or_above_its_threshold(
    fresh_database: Callable[[], Any], slow_ms: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a threshold of 0 every probe commit is a mark, labelled as its own kind; with one of
    10 s none is. Either way the probe's rows are in the benchmark's database, and a /metrics
    that cannot be reached is an error of the sampler, not of the probe."""
    timeline = load("timeline")
    monkeypatch.setattr(timeline, "PROBE_SLOW_MS", slow_ms)
    dsn = await fresh_database()
    marks = timeline.Marks(["http://127.0.0.1:9"], "token", dsn, every_s=0.05).start()
    conn = await asyncpg.connect(dsn)
    try:
        async def committed() -> bool:
            made = await conn.fetchval("SELECT to_regclass('bench_commit_probe') IS NOT NULL")
            return made and await conn.fetchval("SELECT count(*) FROM bench_commit_probe") >= 3

        await until(committed, "three commits of the probe", timeout=30)
        marked = await asyncio.to_thread(marks.stop)
    finally:
        await conn.close()
    probes = [label for _, label in marked if label.startswith("pg slow commit: ")]
    assert not any(e.startswith("commit probe") for e in marks.errors), marks.errors
    if slow_ms:
        assert probes == []
    else:
        assert len(probes) >= 3 and all(label.endswith(" ms (a one-row probe)") for label in probes)
        assert timeline.marks_by_kind(marked)["pg slow commit"] >= 1


async def test_a_slow_probe_commit_is_filed_under_the_moment_it_returned(
    fresh_database: Callable[[], Any],
) -> None:
    """The answers that waited on a slow commit come back when it returns, and the stall
    report pairs marks with the second they fall in: the probe's mark carries the time its
    commit returned, not the time it began."""
    timeline = load("timeline")
    dsn = await fresh_database()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(timeline._PROBE_TABLE)
        await conn.execute("""
            CREATE FUNCTION slow_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF (SELECT count(*) FROM bench_commit_probe) = 0 THEN PERFORM pg_sleep(1.2); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER slow_once BEFORE INSERT ON bench_commit_probe FOR EACH ROW EXECUTE FUNCTION slow_once();
        """)
        marks = timeline.Marks(["http://127.0.0.1:9"], "token", dsn, every_s=0.05).start()
        await until(lambda: conn.fetchval("SELECT count(*) >= 2 FROM bench_commit_probe"), "two probe commits",
                    timeout=30)
        marked = await asyncio.to_thread(marks.stop)
        began = await conn.fetchval("SELECT min(at) FROM bench_commit_probe")
    finally:
        await conn.close()
    slow = [(t, label) for t, label in marked if label.startswith("pg slow commit: ")
            and int(label.split(": ")[1].split(" ms")[0]) >= 1200]
    assert len(slow) == 1, marked
    assert slow[0][0] >= began + 1.2


async def test_a_decision_call_still_running_is_marked_with_what_its_backend_waits_on(
    fresh_database: Callable[[], Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call of ``rg_decide`` running past SLOW_CALL_MS is marked with its backend's wait
    event (here ``pg_sleep``'s), while a statement that is not a decision call, running as
    long, is not."""
    timeline = load("timeline")
    monkeypatch.setattr(timeline, "PG_SAMPLE_S", 0.05)
    dsn = await fresh_database()
    conn = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP FUNCTION rg_decide(jsonb, integer, bigint, boolean)")
        await conn.execute("CREATE FUNCTION rg_decide(p jsonb, a integer, b bigint, c boolean) RETURNS integer"
                           " LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(1.5)'")
        marks = timeline.Marks(["http://127.0.0.1:9"], "token", dsn, every_s=0.05).start()
        await asyncio.gather(conn.fetch("SELECT * FROM rg_decide('[]', 1, 1, false)"),
                             other.execute("SELECT pg_sleep(1.5)"))
        marked = await asyncio.to_thread(marks.stop)
    finally:
        await conn.close()
        await other.close()
    calls = [label for _, label in marked if label.startswith("pg slow decision call: ")]
    assert not any(e.startswith("postgres") for e in marks.errors), marks.errors
    assert calls and all(label.endswith(" ms in, Timeout PgSleep") for label in calls), calls
    running = [int(label.split(": ")[1].split(" ms")[0]) for label in calls]
    assert min(running) >= timeline.SLOW_CALL_MS and max(running) < 10_000  # milliseconds
    assert timeline.marks_by_kind(marked)["pg slow decision call"] >= 1
    assert not any("pg_sleep(1.5)" in label and "decision" not in label for _, label in marked)


async def test_a_ledger_transaction_held_up_is_marked_from_the_services_metrics(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """A decision whose transaction waits (here on the head row, locked by another session)
    is answered once the lock goes, its transaction timed in /metrics; the sampler marks it
    with how many transactions took 25 ms or more and the bucket of the slowest, and marks
    nothing for the fast decision before it."""
    timeline = load("timeline")
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn))
    url = str(api.client.make_url("")).rstrip("/")
    marks = timeline.Marks([url], api.tokens["analyst"], dsn, every_s=0.05).start()
    holder = await asyncpg.connect(dsn)
    monitor = await asyncpg.connect(dsn)
    try:
        vm = uid("vm")
        status, body = await api.post("/v1/nonces/consume", {"vm_id": vm, "scope": "s", "nonce": uid("fast")})
        assert status == 200 and body["decision"] == "accept"
        scraped = marks.scrapes
        await until(lambda: marks.scrapes >= scraped + 2, "two scrapes after the fast decision", timeout=30)
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM ledger_head WHERE id FOR UPDATE")
            decision = asyncio.ensure_future(
                api.post("/v1/nonces/consume", {"vm_id": vm, "scope": "s", "nonce": uid("held")}))
            await blocked_by(monitor, holder.get_server_pid(), timeout=30)
            await asyncio.sleep(0.1)  # the transaction is waiting: it now takes over 100 ms
        status, body = await decision
        assert status == 200 and body["decision"] == "accept"
        await until(lambda: any("ledger calls" in label for _, label in marks.marks), "the mark", timeout=30)
        marked = await asyncio.to_thread(marks.stop)
    finally:
        await holder.close()
        await monitor.close()
    slow = [label for _, label in marked if "ledger calls" in label]
    assert not any(e.startswith("metrics") for e in marks.errors), marks.errors
    assert len(slow) == 1, marked
    # Held at least 100 ms, so in a bucket from 250 ms up; how far up depends on the machine.
    assert re.fullmatch(r"ledger calls over 25 ms: 1 of 1, the slowest (under (250|500|1000|2500|5000) ms|over 5 s)",
                        slow[0]), slow
