"""A database that went back under a running service, losing only entries the process
wrote other than through its decisions (a hypervisor event, an enrolment, a token
deleted, a principal unlocked, an alert acknowledged, a VM cleared)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from replayguard.settings import Secret
from tests.api.test_analysts import reuse_alert
from tests.conftest import Api, uid
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


Act = Callable[[], Awaitable[tuple[int, Any]]]


async def _delete(api: Api, path: str) -> tuple[int, Any]:
    resp = await api.client.delete(path, headers=api.auth("admin"))
    return resp.status, {} if resp.status == 204 else await resp.json()


async def _enrolment(api: Api) -> tuple[Act, int]:
    return lambda: api.post(f"/v1/principals/{uid('user')}/tokens", {"type": "totp"}, role="admin"), 201


async def _token_deletion(api: Api) -> tuple[Act, int]:
    principal = uid("user")
    token_id = (await api.enroll(principal))["token_id"]
    return lambda: _delete(api, f"/v1/principals/{principal}/tokens/{token_id}"), 204


async def _principal_unlock(api: Api) -> tuple[Act, int]:
    principal = uid("user")
    await api.enroll(principal)
    return lambda: api.post(f"/v1/principals/{principal}/unlock", {"note": "x"}, role="admin"), 200


async def _alert_acknowledgement(api: Api) -> tuple[Act, int]:
    alert_id, _ = await reuse_alert(api, uid("vm"), "s")
    return lambda: api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": "seen"}, role="analyst"), 200


async def _vm_clear(api: Api) -> tuple[Act, int]:
    body = {"event_id": uid("evt"), "type": "vm.restored", "vm_id": "vm-2", "occurred_at": api.clock.now}
    status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
    assert status == 202, answer
    return lambda: api.post("/v1/vms/vm-2/clear", {"note": "checked"}, role="admin"), 200


@pytest.mark.parametrize("prepare", [_enrolment, _token_deletion, _principal_unlock, _alert_acknowledgement,
                                     _vm_clear], ids=lambda f: f.__name__.strip("_"))
async def test_a_restore_that_loses_only_an_administrative_entry_is_noticed(
        prepare: Callable[[Api], Awaitable[tuple[Act, int]]], scratch_dbs: list[str],
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """An entry this process ledgered outside decisions and hypervisor events (an
    enrolment, a token deleted, a principal unlocked, an alert acknowledged, a refusing VM
    cleared) after its last check, then the database back to a copy from just before it,
    no witness: the entry is remembered like a batch's, so the next check stops decisions
    and the next decision, numbered at the lost entry's seq, is refused
    ``ledger_rollback`` (the entry is not lost unnoticed, nor its seq taken by another)."""
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), receipt_reaction="refuse", **QUIET)
    act, expected = await prepare(api)
    assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    await after_next_check(api)
    async with api.runtime.continuity._lock:  # the entry and the restore fall between two checks
        scratch_dbs.append(copy := await snapshot(dsn))
        await until(lambda: ready(api), "the service to be ready again", timeout=15)
        status, body = await settled(act)
        assert status == expected, body
        await restore(dsn, copy, scratch_dbs)
    await after_next_check(api)
    await after_next_check(api)
    assert not await ready(api)
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    assert status == 503 and body.get("error", {}).get("code") == "ledger_rollback", (status, body)
