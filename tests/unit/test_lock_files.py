"""Lock files (replayguard.durable.lock_file, locked): exclusive across descriptors, 0600,
and never following a symlink planted where the lock belongs."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from replayguard.core.checkpoints import Checkpoint
from replayguard.durable import lock_file, locked
from replayguard.pg.writeback import Writeback
from replayguard.services.witness import FileWitness, Record, WitnessUnreachable


def test_a_held_lock_refuses_a_second_holder_until_it_is_closed(tmp_path: Path) -> None:
    """The lock is the file's flock: another descriptor cannot take it while the first is open."""
    path = tmp_path / "x.lock"
    fd = lock_file(path)
    try:
        with pytest.raises(BlockingIOError):
            lock_file(path, wait=False)
    finally:
        os.close(fd)
    os.close(lock_file(path, wait=False))


def test_a_lock_file_is_created_private(tmp_path: Path) -> None:
    """A lock file the service creates is readable and writable by its owner only."""
    path = tmp_path / "x.lock"
    os.close(lock_file(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_locked_holds_the_lock_for_the_block_only(tmp_path: Path) -> None:
    """Inside ``locked`` nobody else takes the lock; after it, anyone can."""
    path = tmp_path / "x.lock"
    with locked(path), pytest.raises(BlockingIOError):
        lock_file(path, wait=False)
    os.close(lock_file(path, wait=False))


def test_a_lock_file_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """Whoever can write the directory cannot make the service create or lock a file elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "x.lock").symlink_to(elsewhere)
    with pytest.raises(OSError):
        lock_file(tmp_path / "x.lock")
    assert not elsewhere.exists()


def test_the_write_back_does_not_lead_through_a_planted_lock_symlink(tmp_path: Path) -> None:
    """The embedded data files' write-back treats a symlink at its lock as a lock it cannot take."""
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "pg.writeback.lock").symlink_to(elsewhere)
    writeback = Writeback(tmp_path, tmp_path / "pg.writeback.lock")
    assert not writeback.holds_lock()
    assert not writeback.leading
    assert not elsewhere.exists()


def test_a_file_witness_refuses_a_symlink_at_its_lock(tmp_path: Path) -> None:
    """A ``file:`` witness whose lock path is a planted symlink is unreachable; nothing is
    created at the symlink's target and no checkpoint is written."""
    elsewhere = tmp_path / "elsewhere"
    witness_path = tmp_path / "witness.json"
    (tmp_path / "witness.json.lock").symlink_to(elsewhere)
    record = Record("deployment", "pem", Checkpoint(1, bytes(32), 1, "key", bytes(64)))
    with pytest.raises(WitnessUnreachable):
        asyncio.run(FileWitness(witness_path).put(record))
    assert not elsewhere.exists()
    assert not witness_path.exists()
