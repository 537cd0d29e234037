"""The database restored in place under running services (a backup put back, a lagging
standby promoted behind the same URL): what the running process notices by itself."""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pyotp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.pg import schema
from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, cli_env, run_cli
from tests.integration.db_restore import restore, scratch_dbs, settled, snapshot
from tests.waiting import blocked_by, until

__all__ = ["scratch_dbs"]  # a fixture
QUIET = {"checkpoint_every": 1000, "checkpoint_interval_s": 3600}  # no checkpoint to compare with
# A checkpoint waits for the chain check of a child process at a lower CPU priority, which a
# busy machine (another test run beside this one) can hold back for tens of seconds.
CHECKPOINT_WAIT_S = 90


async def nonce(api: Api, value: str, **extra: Any) -> tuple[int, Any]:
    return await api.post("/v1/nonces/consume", {"vm_id": "vm-1", "scope": "s", "nonce": value, **extra})


async def copied_before_a_nonce(api: Api, dsn: str, scratch_dbs: list[str]) -> tuple[str, str]:
    """Three nonces accepted, a copy of the database taken (the backup), then one more nonce
    accepted that the copy lacks: returns the copy's DSN and that nonce."""
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    scratch_dbs.append(copy := await snapshot(dsn))
    await until(lambda: ready(api), "the service to be ready again", timeout=15)
    lost = secrets.token_hex(8)
    status, body = await settled(lambda: nonce(api, lost))
    assert (status, body["decision"]) == (200, "accept"), body
    return copy, lost


async def ready(api: Api) -> bool:
    return (await api.client.get("/readyz")).status == 200


async def plant(dsn: str, *checkpoints: cps.Checkpoint) -> None:
    """What someone with database rights does: rows written into ``checkpoints`` directly."""
    conn = await asyncpg.connect(dsn)
    try:
        for cp in checkpoints:
            await conn.execute("INSERT INTO checkpoints VALUES ($1, $2, $3, $4, $5)",
                               cp.seq, cp.hash, cp.ts_us, cp.key_id, cp.signature)
    finally:
        await conn.close()


async def head_of(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT seq FROM ledger_head"))
    finally:
        await conn.close()


def sunk_checkpoints(path: Path) -> list[int]:
    """The seqs of the checkpoint records a file sink holds."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    return [record["seq"] for record in map(orjson.loads, lines) if record.get("type") == "checkpoint"]


async def after_next_check(api: Api) -> None:
    """Returns once this instance's guard finished a periodic check that started after the
    call (one already running when it was called may have read the database before)."""
    background, called = api.runtime.continuity.background, time.time()
    await until(lambda: background.last_start.get("continuity", 0.0) >= called, "the next continuity check",
                timeout=10)


async def test_a_replay_in_flight_with_the_decision_that_reveals_the_restore_is_refused(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Nonce N accepted, then the database restored to a copy from just before it. Two
    decisions in flight together, an unrelated nonce and then N: the first commits at the
    floor and is refused 503 ledger_rollback; N commits right after it, past the floor it
    was admitted with, and is refused too, since the process already knew."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **QUIET)
    copy, lost = await copied_before_a_nonce(api, dsn, scratch_dbs)
    await after_next_check(api)
    # The decisions, not a periodic check, are to find the restore: a check run before the
    # first reaches the appender (at most CHECK_S = 2 s after the last) would refuse it
    # before it waits on the head lock. The check is held until both are in flight.
    async with api.runtime.continuity._lock:
        await restore(dsn, copy, scratch_dbs)
        holder, monitor = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute("SELECT seq FROM ledger_head WHERE id FOR UPDATE")  # the head lock, held a moment
                first = asyncio.create_task(settled(lambda: nonce(api, secrets.token_hex(8))))
                await blocked_by(monitor, holder.get_server_pid())
                replay = asyncio.create_task(nonce(api, lost))
                await until(lambda: len(api.runtime.appender._queue) > 0, "the replay queued behind the first")
        finally:
            await holder.close()
            await monitor.close()
    (s1, b1), (s2, b2) = await asyncio.gather(first, replay)
    assert (s1, b1["error"]["code"]) == (503, "ledger_rollback"), b1
    assert s2 == 503 and b2.get("error", {}).get("code") == "ledger_rollback", b2  # not an accept of N
    assert not await ready(api)


def witness_seq(path: Path) -> int:
    try:
        return int(orjson.loads(path.read_bytes())["checkpoint"]["seq"])
    except (OSError, ValueError, KeyError):
        return 0


async def test_a_checkpoint_row_not_ours_past_the_head_does_not_stop_the_witnesses(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """Someone with database rights inserts a checkpoint row of another key at seq 10^12. The
    service still signs a checkpoint every 5 entries and its file witness follows (it stopped
    at the row: the next checkpoint looked not due), so a restore of a copy from before nonce N
    is refused at the restart and N is not accepted again."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **settings)
    for _ in range(6):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: witness_seq(witness) >= 1, "the witness to hold a checkpoint", timeout=CHECKPOINT_WAIT_S)
    await plant(dsn, cps.sign(Ed25519PrivateKey.generate(), 10**12, secrets.token_bytes(32), api.runtime.now_us()))
    scratch_dbs.append(copy := await snapshot(dsn))
    copy_head = await head_of(copy)
    lost = secrets.token_hex(8)
    assert (await settled(lambda: nonce(api, lost)))[1]["decision"] == "accept"
    for _ in range(12):
        assert (await settled(lambda: nonce(api, secrets.token_hex(8))))[1]["decision"] == "accept"
    await until(lambda: witness_seq(witness) > copy_head, "the witness to pass the copy's head",
                timeout=CHECKPOINT_WAIT_S)
    await api.client.close()
    await restore(dsn, copy, scratch_dbs)

    restarted = await api_factory(database_url=Secret(dsn), **settings)
    status, body = await settled(lambda: nonce(restarted, lost))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body


async def test_checkpoint_rows_not_ours_do_not_reach_the_sinks_nor_hold_them_back(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Rows planted in ``checkpoints``: one of another key far past the head, one named as
    ours whose signature does not verify. Neither is handed to the sinks, and the service's
    own checkpoints after them still are (the planted row past the head moved the sinks'
    position beyond every checkpoint to come)."""
    target = tmp_path / "sink" / "records.jsonl"
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), checkpoint_every=3, sinks=(f"file:{target}",))
    for _ in range(4):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: sunk_checkpoints(target), "a checkpoint in the file sink", timeout=CHECKPOINT_WAIT_S)
    head = await head_of(dsn)
    foreign = cps.sign(Ed25519PrivateKey.generate(), 10**12, secrets.token_bytes(32), api.runtime.now_us())
    ours = api.runtime.continuity.deployment_id  # the key id of the service's checkpoints
    await plant(dsn, foreign, cps.Checkpoint(head + 1, secrets.token_bytes(32), foreign.ts_us, ours, bytes(64)))
    for _ in range(8):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: max(sunk_checkpoints(target)) > head + 3,
                "a checkpoint signed after the planted rows in the sink", timeout=CHECKPOINT_WAIT_S)
    assert 10**12 not in sunk_checkpoints(target) and head + 1 not in sunk_checkpoints(target)


async def test_a_checkpoint_row_not_ours_before_the_first_start_does_not_hold_the_sinks_back(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A checkpoint row of another key far past the head, planted before the service first
    started: the sinks' position starts at the head's checkpoints, not past the row, so the
    service's own checkpoints reach them."""
    target = tmp_path / "sink" / "records.jsonl"
    dsn = await fresh_database()
    await schema.migrate_dsn(dsn)
    await plant(dsn, cps.sign(Ed25519PrivateKey.generate(), 10**12, secrets.token_bytes(32), int(time.time() * 1e6)))
    api = await api_factory(database_url=Secret(dsn), checkpoint_every=3, sinks=(f"file:{target}",))
    for _ in range(4):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: sunk_checkpoints(target), "a checkpoint of the service in the file sink",
                timeout=CHECKPOINT_WAIT_S)
    assert 10**12 not in sunk_checkpoints(target)


@pytest.mark.parametrize("offset_s", [0, -600, 600],
                         ids=["service_stopped_at_start", "service_10min_behind", "service_10min_ahead"])
async def test_a_recovery_and_a_later_restore_whatever_the_two_clocks_say(
        offset_s: int, scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """The service's clock (a test clock, stopped) and the clock of the shell that runs
    ``ledger accept-rollback`` disagree: by the test's duration, or by 10 minutes either
    way. A first restore is recovered from (the statement
    covers every checkpoint it gives up, though they were signed by a clock ahead of it);
    a second restore, behind a checkpoint the new chain signed, is refused and the HOTP code
    accepted after the recovery is not accepted again (the new chain's checkpoints were
    counted as given up by the recovery when the service's clock was behind)."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    clock = FakeClock(time.time() + offset_s)
    dsn = await fresh_database()
    api = await api_factory(clock=clock, database_url=Secret(dsn), **settings)
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    scratch_dbs.append(first := await snapshot(dsn))
    first_head = await head_of(first)
    for _ in range(30):
        assert (await settled(lambda: nonce(api, secrets.token_hex(8))))[1]["decision"] == "accept"
    await until(lambda: witness_seq(witness) >= first_head + 25, "the witness past the first copy",
                timeout=CHECKPOINT_WAIT_S)
    await api.client.close()

    await restore(dsn, first, scratch_dbs)
    api = await api_factory(clock=clock, database_url=Secret(dsn), **settings)
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    assert status == 503 and body["error"]["code"] == "ledger_rollback", body
    env = cli_env(REPLAYGUARD_DATABASE_URL=dsn, REPLAYGUARD_DATA_DIR=str(tmp_path / "data"),
                  REPLAYGUARD_WITNESSES=f"file:{witness}")
    done = run_cli("ledger", "accept-rollback", "--reason", "restored the first copy", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    await until(lambda: ready(api), "decisions served again after the recovery", timeout=30)

    token = await api.enroll("hotp-after-recovery", type="hotp")
    scratch_dbs.append(second := await snapshot(dsn))
    second_head = await head_of(second)
    code = {"vm_id": "vm-1", "principal": "hotp-after-recovery", "otp": pyotp.HOTP(token["secret"]).at(0)}
    status, body = await settled(lambda: api.post("/v1/otp/verify", code))
    assert (status, body["decision"]) == (200, "accept"), body
    for _ in range(8):  # refused (nonces from before the recovery), but each is an entry
        await settled(lambda: nonce(api, secrets.token_hex(8)))
    await until(lambda: witness_seq(witness) > second_head, "the witness past the second copy",
                timeout=CHECKPOINT_WAIT_S)
    await api.client.close()

    await restore(dsn, second, scratch_dbs)
    api = await api_factory(clock=clock, database_url=Secret(dsn), **settings)
    status, body = await settled(lambda: api.post("/v1/otp/verify", code))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body


async def _rollback_answer(api: Api) -> bool:
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    return status == 503 and body.get("error", {}).get("code") == "ledger_rollback"


async def test_a_restore_another_instance_decided_past_stops_every_instance(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """Two instances on one database, no checkpoint due. A accepts nonce N, then the database
    is restored to a copy from just before. B never heard of N and decides on the restored
    database, so its entries take the place of A's (B's own floor is behind them). A's next
    check finds that the entry it committed is no longer the ledger's and writes the finding
    to the database; B reads it at its next check. Both refuse every decision from then on,
    N included, /readyz is 503 on both, and a restarted B still refuses."""
    dsn = await fresh_database()
    a = await api_factory(database_url=Secret(dsn), **QUIET)
    b = await api_factory(database_url=Secret(dsn), **QUIET)
    for _ in range(3):
        assert (await nonce(a, secrets.token_hex(8)))[1]["decision"] == "accept"
    scratch_dbs.append(copy := await snapshot(dsn))
    for instance in (a, b):
        await until(functools.partial(ready, instance), "the instance ready again", timeout=15)
    await after_next_check(b)
    lost = secrets.token_hex(8)
    status, body = await settled(lambda: nonce(a, lost))
    assert (status, body["decision"]) == (200, "accept"), body
    await restore(dsn, copy, scratch_dbs)

    await settled(lambda: nonce(b, secrets.token_hex(8)))  # B decides on the restored ledger
    for instance in (a, b):
        await until(functools.partial(_rollback_answer, instance), "decisions refused", timeout=30)
        assert not await ready(instance)
        status, body = await settled(functools.partial(nonce, instance, lost))
        assert (status, body["error"]["code"]) == (503, "ledger_rollback"), body
    _, alerts = await a.get("/v1/alerts?kind=ledger_rollback")
    assert alerts["items"], alerts
    await b.client.close()
    again = await api_factory(database_url=Secret(dsn), **QUIET)
    assert await _rollback_answer(again)


async def test_a_rollback_only_the_running_process_saw_is_kept_and_can_be_recovered(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """One instance with a file witness that holds nothing past the copy. The database is
    restored to a copy from before nonce N: the next decision is refused (its entry is at or
    below one the process knew committed). The finding is in the database, so a restarted
    service still refuses; ``ledger accept-rollback`` records the recovery from it (it said
    "nothing to recover", the witness agreeing with the ledger), and the service serves
    again, refusing N by the rules after a recovery."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {**QUIET, "witnesses": (f"file:{witness}",)}
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **settings)
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    scratch_dbs.append(copy := await snapshot(dsn))
    lost = secrets.token_hex(8)
    assert (await settled(lambda: nonce(api, lost)))[1]["decision"] == "accept"
    await restore(dsn, copy, scratch_dbs)
    assert await _rollback_answer(api)
    await after_next_check(api)  # the finding is written
    await api.client.close()

    api = await api_factory(database_url=Secret(dsn), **settings)
    assert await _rollback_answer(api)
    env = cli_env(REPLAYGUARD_DATABASE_URL=dsn, REPLAYGUARD_DATA_DIR=str(tmp_path / "data"),
                  REPLAYGUARD_WITNESSES=f"file:{witness}")
    done = run_cli("ledger", "accept-rollback", "--reason", "restored a copy", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert orjson.loads(done.stdout)["serving"] is True
    await until(lambda: ready(api), "decisions served again after the recovery", timeout=30)
    status, body = await settled(lambda: nonce(api, lost))
    assert (status, body["decision"], body["reason"]) == (200, "reject", "reused"), body
