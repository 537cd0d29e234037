"""A database that went back under a running service, losing only entries the process
wrote other than through its decisions (a hypervisor event)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from replayguard.settings import Secret
from tests.integration.db_restore import restore, scratch_dbs, settled, snapshot
from tests.integration.test_ledger_continuity_guard import hypervisor_event
from tests.integration.test_restore_in_place import QUIET, after_next_check, nonce, ready
from tests.waiting import until

__all__ = ["scratch_dbs"]


async def test_a_restore_that_loses_only_a_hypervisor_event_is_noticed(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """A hypervisor event this process ledgered (answered 202) after its last check, then
    the database back to a copy from just before it (a standby a moment behind promoted
    behind the same URL): the next decision, numbered at the lost event's seq, is refused
    ``ledger_rollback`` (the event's entry is remembered like a batch's), so the event and
    the window it opened are not lost unnoticed."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), **QUIET)
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await after_next_check(api)
    guard = api.runtime.continuity
    # The event and the failover fall between two periodic checks (CHECK_S = 2 s apart):
    # the check is held for the moment they take.
    async with guard._lock:
        scratch_dbs.append(copy := await snapshot(dsn))
        await until(lambda: ready(api), "the service to be ready again", timeout=15)
        status, body = await settled(lambda: hypervisor_event(api))
        assert status == 202, body
        await restore(dsn, copy, scratch_dbs)
    await after_next_check(api)
    await after_next_check(api)
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", (status, body)
