"""Rollback windows at their edges, through the ledger: both ends are inclusive (CONTRACT §5).

A use at exactly the restored state's time T, or exactly at the revert's time R, is at
risk; a use one microsecond outside [T, R] is not. The SQL predicate decides this, so it
is checked through the API, with exact microsecond times.
"""

from __future__ import annotations

import pytest

from replayguard.core.timefmt import rfc3339_us
from tests.api.test_rollback_attack import alice, event, login
from tests.conftest import Api, uid

S = 1_000_000


@pytest.mark.parametrize(("case", "t_offset_us", "r_offset_us", "reason"), [
    ("use exactly at T", 0, 5 * S, "replay_after_rollback"),
    ("use exactly at R", -10 * S, 0, "replay_after_rollback"),
    ("use 1 µs before T", 1, 5 * S, "reused"),
    ("use 1 µs after R", -10 * S, -1, "reused"),
])
async def test_window_ends_are_inclusive(api: Api, case: str, t_offset_us: int, r_offset_us: int,
                                         reason: str) -> None:
    """A replay of a use at T or at R is replay_after_rollback; one just outside [T, R] is plain reused."""
    vm_id = uid("web")
    principal, totp = await alice(api)
    used_at_us = int(api.clock.now * S)
    code = totp.at(api.clock.now)
    first = await login(api, vm_id, principal, code)
    assert first["decision"] == "accept"
    api.clock.advance(6)
    await event(api, vm_id, "snapshot.reverted", snapshot_id=uid("snap"),
                snapshot_created_at=rfc3339_us(used_at_us + t_offset_us),
                occurred_at=rfc3339_us(used_at_us + r_offset_us))
    replay = await login(api, vm_id, principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", reason), case
