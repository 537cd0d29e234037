"""Key files: created once, atomically, by whichever of several processes starting at once wins; a
rotation's files settled by what the database is bound to."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from replayguard.errors import ConfigError
from replayguard.keys import (
    key_paths,
    load_keys,
    pending_path,
    promote_pending,
    release,
    retired_path,
    rotation_lock,
    settle_files,
    write_pending,
)
from replayguard.settings import Secret, Settings

STARTERS = 8


def _load(data_dir: str, start: multiprocessing.synchronize.Barrier,
          out: multiprocessing.Queue[tuple[str, ...]]) -> None:
    start.wait()
    try:
        keys = load_keys(Settings(data_dir=Path(data_dir), database_url=Secret("postgresql://unused/x")))
        out.put(("ok", keys.pepper.hex(), keys.signing.hex()))
    except Exception as exc:  # noqa: BLE001 - the parent reports what each starter saw
        out.put(("error", repr(exc), ""))


def test_processes_starting_at_once_on_a_new_data_dir_share_one_set_of_keys(tmp_path: Path) -> None:
    """Eight processes load keys from one fresh data dir at the same moment: none fails (the keys
    dir made by one is used by the others) and all read the same pepper and signing key."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        data_dir = tmp_path / f"data{attempt}"
        start, out = ctx.Barrier(STARTERS), ctx.Queue()
        procs = [ctx.Process(target=_load, args=(str(data_dir), start, out)) for _ in range(STARTERS)]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
        assert [r for r in results if r[0] != "ok"] == []
        assert len({r[1:] for r in results}) == 1
        assert oct((data_dir / "keys").stat().st_mode & 0o777) == "0o700"


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=Secret("postgresql://unused/x"))


def test_settling_a_killed_rotation_goes_by_what_the_database_is_bound_to(tmp_path: Path) -> None:
    """A ``.next`` key the database is bound to is promoted (the old key retired, mode
    0600, in a 0700 ``retired/``), and promoting again changes nothing; one the database
    is not bound to, while it is bound to the current key, is removed; one whose database
    is bound to neither is left for the key binding to refuse."""
    settings = _settings(tmp_path)
    old = load_keys(settings)
    path = key_paths(settings)["secret"]
    new = write_pending(settings, "secret")
    assert settle_files(settings, lambda name, key: False) == [] and pending_path(path).exists()
    assert settle_files(settings, lambda name, key: key == new) == ["secret"]
    assert load_keys(settings).secret == new and not pending_path(path).exists()
    retired = retired_path(settings, "secret", old.secret)
    assert bytes.fromhex(retired.read_text()) == old.secret
    assert (oct(retired.stat().st_mode & 0o777), oct(retired.parent.stat().st_mode & 0o777)) == ("0o600", "0o700")
    assert promote_pending(settings, "secret", old.secret) == retired and load_keys(settings).secret == new
    write_pending(settings, "receipt")
    assert settle_files(settings, lambda name, key: key in (new, old.receipt)) == []
    assert not pending_path(key_paths(settings)["receipt"]).exists() and load_keys(settings).receipt == old.receipt


def test_a_second_rotation_lock_on_the_same_keys_is_refused(tmp_path: Path) -> None:
    """The rotation lock is exclusive: taken twice (two rotations at once), the second is a
    ConfigError saying a rotation is running; released, it can be taken again."""
    settings = _settings(tmp_path)
    load_keys(settings)
    held = rotation_lock(settings)
    try:
        with pytest.raises(ConfigError, match="a key rotation is running on"):
            rotation_lock(settings)
    finally:
        release(held)
    release(rotation_lock(settings))


def test_the_retired_key_is_durable_before_the_new_key_takes_its_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Promoting a ``.next`` key makes ``retired/`` itself durable in the keys' directory
    (its entry there, not only the file inside it) before renaming the new key into place:
    a power loss between the two must not keep the rename and lose the only copy of the
    old key."""
    import replayguard.keys as keys_module
    from replayguard.durable import fsync_dir as real_fsync_dir

    settings = _settings(tmp_path)
    old = load_keys(settings)
    write_pending(settings, "receipt")
    keys_dir = key_paths(settings)["receipt"].parent
    events: list[str] = []
    real_replace = os.replace

    def fsync_dir(directory: Path) -> None:
        events.append(f"fsync {directory.name}")
        real_fsync_dir(directory)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(keys_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "replace", replace)  # the os module replayguard.keys renames with
    promote_pending(settings, "receipt", old.receipt)
    assert "rename receipt.key" in events
    assert f"fsync {keys_dir.name}" in events[:events.index("rename receipt.key")], events
