"""Witnesses that are out of reach, lie or belong to someone else, over real PostgreSQL and
real witness files (CONTRACT §10, SECURITY.md "The host's memory going back in time"):
what a witness holds is read before anything is written over it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replayguard.core import checkpoints as cps
from replayguard.core import continuity
from replayguard.core.checkpoints import Checkpoint
from replayguard.core.continuity import Admission
from replayguard.services.witness import FileWitness, Record, WitnessUnreachable
from replayguard.settings import Secret
from tests.integration.db_restore import restore, scratch_dbs, settled, snapshot
from tests.integration.test_ledger_continuity import alerts_of, backups, cut_tail
from tests.integration.test_ledger_continuity_guard import _accept_rollback, _backup_behind_the_witness, _witnessed
from tests.integration.test_restore_in_place import after_next_check, nonce, ready
from tests.integration.test_witness_http import held, put
from tests.waiting import until

__all__ = ["backups", "scratch_dbs"]  # fixtures


async def test_a_witness_not_read_since_a_start_on_a_restored_database_is_not_written(
        backups: Callable[[str], Awaitable[str]], fresh_database: Callable[[], Any],
        api_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file witness holds checkpoint S past a backup's head. The service starts on the
    restored backup while the witness does not answer reads (a hung volume, a GET that
    times out): it is unreachable, not required, so decisions go on and carry the chain
    past S, and a checkpoint past S is signed and pushed. That push must not reach the
    witness, whose S no check has compared with the ledger: taken there (a higher seq),
    it would replace S and the restore would never be found. Once the witness answers
    again, the next check reads S and decisions stop (503 ``ledger_rollback``)."""
    witness = tmp_path / "w" / "witness.json"
    witness.parent.mkdir()
    settings = {"checkpoint_every": 5, "witnesses": (f"file:{witness}",)}
    backup, head, _lost = await _backup_behind_the_witness(backups, fresh_database, api_factory, settings, witness)
    held = _witnessed(witness)

    hung = [True]
    real_read = FileWitness.read

    async def read(self: FileWitness) -> Record | None:
        if hung[0]:
            raise WitnessUnreachable(f"{self.name}: no answer")
        return await real_read(self)

    monkeypatch.setattr(FileWitness, "read", read)
    restored = await api_factory(database_url=Secret(backup), **settings)
    guard = restored.runtime.continuity
    pushed: list[tuple[int, dict[str, str]]] = []
    real_push = guard.exchange.push

    async def push(cp: Checkpoint) -> dict[str, str]:
        answers = await real_push(cp)
        pushed.append((cp.seq, answers))
        return answers

    monkeypatch.setattr(guard.exchange, "push", push)
    for _ in range(held["seq"] - head + 6):
        assert (await nonce(restored, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: any(seq > held["seq"] for seq, _ in pushed), "a checkpoint past S to be pushed", timeout=60)
    assert _witnessed(witness) == held, pushed
    hung[0] = False
    await after_next_check(restored)
    status, body = await settled(lambda: nonce(restored, secrets.token_hex(8)))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body


async def _checkpointed(dsn: str, seq: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM checkpoints WHERE seq >= $1)", seq))
    finally:
        await conn.close()


async def test_a_recovery_recorded_elsewhere_does_not_wipe_what_a_running_service_knows(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """A recovery drill: a copy of the database is cut short and recovered with the
    deployment's keys (a genuine ``ledger_recovery`` entry, its statement signed). The
    service, without witnesses, goes on deciding on the real database; then the drill copy
    is put in its place (a restore from the wrong backup, or someone with database rights
    replaying the genuine recovery). That recovery answers nothing this process found: the
    entries it committed after the copy are gone, so decisions stop (503
    ``ledger_rollback``) at its next check, as they do for a restore with no recovery."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), checkpoint_every=5)
    # Fourteen entries: wherever among them the leader signs a checkpoint (the clock stands
    # still, so only the count makes one due), one at 10 or later follows (with twelve, one
    # at entry 8 or 9 left the next one not due).
    for _ in range(14):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await until(lambda: _checkpointed(dsn, 10), "a checkpoint at entry 10 or later", timeout=60)
    scratch_dbs.append(drill := await snapshot(dsn))
    await cut_tail(drill, 5)  # its checkpoints past entry 5 stay: the drill's rollback to recover from
    done = _accept_rollback(drill, tmp_path / "data", "recovery drill on a copy")
    assert done["serving"] is True, done
    await until(lambda: ready(api), "the service ready again after the copy", timeout=15)
    for _ in range(5):
        assert (await settled(lambda: nonce(api, secrets.token_hex(8))))[1]["decision"] == "accept"

    await restore(dsn, drill, scratch_dbs)
    await after_next_check(api)
    await after_next_check(api)
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", body


async def test_a_witness_refuses_a_checkpoint_of_the_chain_its_recovery_gave_up(
        api_factory: Callable[..., Any], fresh_database: Callable[[], Any], tmp_path: Path) -> None:
    """A deployment's witness (another deployment's endpoint) held checkpoint 1000; a
    recovery gave it up, continuing the chain from entry 800, and the witness moved on to
    the new chain's checkpoints 850, then 860 (offered without the statement: the witness
    keeps it). Whoever holds a witness token (and the old chain's checkpoints: they went to
    the sinks) offers checkpoint 1000 again: its seq is higher, but the recovery the
    witness holds gave it up. It is refused (409, ``ledger_tamper`` on the witness), and
    the witness keeps 860: once it held 1000 again, that recovery would cover it, and the
    deployment's checkpoints of a restored chain would be taken over it."""
    b = await api_factory(database_url=Secret(await fresh_database()), data_dir=tmp_path / "b")
    key = Ed25519PrivateKey.generate()
    a_id, pem = cps.key_id(key.public_key()), cps.public_key_pem(key.public_key())

    def offer(cp: Checkpoint, recovery: continuity.Statement | None = None) -> dict[str, Any]:
        return Record(a_id, pem, cp, recovery).to_json()

    t = 1_790_000_000_000_000
    abandoned = cps.sign(key, 1000, secrets.token_bytes(32), t)
    assert (await put(b, a_id, offer(abandoned)))[1]["admission"] == "accept"
    statement = continuity.sign_statement(key, 801, secrets.token_bytes(32), t + 10, 1000, abandoned.hash)
    status, body = await put(b, a_id, offer(cps.sign(key, 801, secrets.token_bytes(32), t + 10), statement))
    assert (status, body["admission"]) == (200, "recovery"), body
    newer = cps.sign(key, 850, secrets.token_bytes(32), t + 20)
    assert (await put(b, a_id, offer(newer, statement)))[1]["admission"] == "accept"
    newest = cps.sign(key, 860, secrets.token_bytes(32), t + 30)  # offered without the statement
    assert (await put(b, a_id, offer(newest)))[1]["admission"] == "accept"

    for recovery in (None, statement):
        status, body = await put(b, a_id, offer(abandoned, recovery))
        assert status == 409 and body["error"]["code"] == "conflict", body
    record = await held(b, a_id)
    assert record is not None and record["checkpoint"]["seq"] == 860, record
    assert record["recovery"] == continuity.statement_json(statement), record
    assert await alerts_of(b, "ledger_tamper")


async def test_a_file_witness_refuses_a_checkpoint_of_the_chain_its_recovery_gave_up(tmp_path: Path) -> None:
    """A file witness applies the same rule: it keeps the recovery statement through later
    checkpoints offered without it, and refuses the given-up chain's higher checkpoint."""
    key = Ed25519PrivateKey.generate()
    a_id, pem = cps.key_id(key.public_key()), cps.public_key_pem(key.public_key())
    witness = FileWitness(tmp_path / "witness.json")
    t = 1_790_000_000_000_000
    abandoned = cps.sign(key, 1000, secrets.token_bytes(32), t)
    statement = continuity.sign_statement(key, 801, secrets.token_bytes(32), t + 10, 1000, abandoned.hash)
    assert await witness.put(Record(a_id, pem, abandoned)) is Admission.ACCEPT
    recovered = cps.sign(key, 801, secrets.token_bytes(32), t + 10)
    assert await witness.put(Record(a_id, pem, recovered, statement)) is Admission.RECOVERY
    newer = cps.sign(key, 850, secrets.token_bytes(32), t + 20)
    assert await witness.put(Record(a_id, pem, newer)) is Admission.ACCEPT
    assert await witness.put(Record(a_id, pem, abandoned)) is Admission.FORKS
    assert await witness.read() == Record(a_id, pem, newer, statement)


async def test_a_file_witness_replaced_by_a_fifo_is_unreachable_without_waiting_on_it(tmp_path: Path) -> None:
    """The witness path is a FIFO (or a device): reading and offering are refused as
    unreachable at once, instead of a thread waiting for a writer at every check."""
    path = tmp_path / "witness.json"
    os.mkfifo(path)
    witness = FileWitness(path)
    key = Ed25519PrivateKey.generate()
    a_id, pem = cps.key_id(key.public_key()), cps.public_key_pem(key.public_key())
    record = Record(a_id, pem, cps.sign(key, 10, secrets.token_bytes(32), 1_790_000_000_000_000))
    try:
        for attempt in (witness.read(), witness.put(record)):
            with pytest.raises(WitnessUnreachable, match="not a regular file"):
                await asyncio.wait_for(attempt, 20)
    finally:  # a thread still blocked on the FIFO (the test failing) is let go by a writer
        with contextlib.suppress(OSError):  # ENXIO: no reader left
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
