"""Key files: created once, atomically, by whichever of several processes starting at once wins."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from replayguard.keys import load_keys
from replayguard.settings import Secret, Settings

STARTERS = 8


def _load(data_dir: str, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
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
