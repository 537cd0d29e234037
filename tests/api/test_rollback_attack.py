"""The seed article's attack end to end through the HTTP API, and the flows that must still pass.

Note a TOTP code inside the VM, revert the VM to a snapshot from before the login, replay
the code: the ledger on the host refuses it and names it, with or without a hypervisor
event. Steps of the fake clock stay under 30 s between a code and its replay, so the code
is always within the default ±1 step drift.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.services.retention import purge_expired
from replayguard.settings import Secret
from tests.conftest import REDIS_URL, Api, FakeClock, uid


async def login(api: Api, vm_id: str, principal: str, code: str, receipt: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_id": vm_id, "principal": principal, "otp": code}
    if receipt is not None:
        body["receipt"] = receipt
    status, answer = await api.post("/v1/otp/verify", body)
    assert status == 200, answer
    return dict(answer)


async def event(api: Api, vm_id: str, kind: str, **fields: Any) -> str:
    body = {"event_id": uid("evt"), "type": kind, "vm_id": vm_id, "occurred_at": api.clock.now, **fields}
    status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
    assert status == 202 and answer["duplicate"] is False, answer
    return str(body["event_id"])


async def alert(api: Api, alert_id: str | int) -> dict[str, Any]:
    async with api.runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM alerts WHERE id = $1", int(alert_id))
        entries = await conn.fetch("SELECT seq FROM alert_entries WHERE alert_id = $1 ORDER BY seq", int(alert_id))
    assert row is not None
    return {**dict(row.items()), "entries": [r["seq"] for r in entries]}


async def event_seq(api: Api, event_id: str) -> int:
    async with api.runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT seq FROM hypervisor_events WHERE event_id = $1", event_id))


async def alice(api: Api) -> tuple[str, pyotp.TOTP]:
    principal = uid("alice")
    token = await api.enroll(principal)
    return principal, pyotp.TOTP(token["secret"])


async def test_seed_attack_with_revert_event(api: Api) -> None:
    """Snapshot, login, revert, replay: the replay is replay_after_rollback with a critical alert."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "snapshot.created", snapshot_id="pre-patch", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    first = await login(api, vm_id, principal, code)
    assert (first["decision"], first["reason"]) == ("accept", "ok")
    api.clock.advance(5)
    revert = await event(api, vm_id, "snapshot.reverted", snapshot_id="pre-patch")
    api.clock.advance(5)
    replay = await login(api, vm_id, principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback")
    raised = await alert(api, replay["alert_id"])
    assert (raised["kind"], raised["severity"], raised["principal"]) == ("replay_after_rollback", "critical", principal)
    assert first["seq"] in raised["entries"], "the at-risk use is listed"
    assert await event_seq(api, revert) in raised["entries"], "the revert event is listed"
    assert raised["details"]["first_seq"] == first["seq"]


async def test_replay_on_another_vm_is_also_replay_after_rollback(api: Api) -> None:
    """A credential first used inside a window is replay_after_rollback wherever it is presented again."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    assert (await login(api, vm_id, principal, code))["decision"] == "accept"
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1")
    assert (await login(api, uid("web-02"), principal, code))["reason"] == "replay_after_rollback"


async def test_silent_revert_caught_by_receipt(api: Api) -> None:
    """No event at all: the stale receipt flags rollback_detected and the replay is replay_after_rollback."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    status, warmup = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "boot", "nonce": uid("n")})
    assert status == 200 and warmup["decision"] == "accept"
    snapshot_receipt = warmup["receipt"]  # what the guest's disk holds when the snapshot is taken
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    first = await login(api, vm_id, principal, code, snapshot_receipt)
    assert (first["decision"], first["flags"]) == ("accept", [])
    api.clock.advance(5)
    replay = await login(api, vm_id, principal, code, snapshot_receipt)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback")
    assert replay["flags"] == ["rollback_detected"]
    async with api.runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT kind, severity FROM alerts WHERE vm_id = $1", vm_id)
        kinds = {r["kind"]: r["severity"] for r in rows}
    assert kinds == {"rollback_detected": "critical", "replay_after_rollback": "critical"}


async def test_clone_presenting_parent_receipt(api: Api) -> None:
    """A clone presenting its parent's receipt is flagged clone_detected, and its replay named."""
    parent, clone = uid("web-01"), uid("web-01-clone")
    principal, totp = await alice(api)
    _, warmup = await api.post("/v1/nonces/consume", {"vm_id": parent, "scope": "boot", "nonce": uid("n")})
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    assert (await login(api, parent, principal, code, warmup["receipt"]))["decision"] == "accept"
    api.clock.advance(5)
    replay = await login(api, clone, principal, code, warmup["receipt"])
    assert replay["flags"] == ["clone_detected"]
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback")


async def test_clone_event_then_replay_in_the_clone(api: Api) -> None:
    """After a vm.cloned event, the parent's use replayed in the clone is replay_after_rollback."""
    parent, clone = uid("web-01"), uid("web-01-clone")
    principal, totp = await alice(api)
    await event(api, parent, "snapshot.created", snapshot_id="gold", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    assert (await login(api, parent, principal, code))["decision"] == "accept"
    await event(api, clone, "vm.cloned", source_vm_id=parent, snapshot_id="gold")
    assert (await login(api, clone, principal, code))["reason"] == "replay_after_rollback"


async def test_the_replay_alert_lists_every_use_the_window_put_at_risk(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """CONTRACT §5: a credential first used inside a window and presented again raises a
    critical alert that lists the at-risk uses: the replay_after_rollback alert raised by the
    replay itself carries every use the window covers (here bob's login and a nonce on the
    same VM) as `at_risk_uses`, as the one a late event reclassifies does."""
    api: Api = await api_factory(FakeClock(), database_url=Secret(await fresh_database()))
    (alice_id, alice_totp), (bob_id, bob_totp) = await alice(api), await alice(api)
    vm_id = uid("web-01")
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=api.clock.now)
    api.clock.advance(2)
    code = alice_totp.at(api.clock.now)
    first = await login(api, vm_id, alice_id, code)
    bob_use = await login(api, vm_id, bob_id, bob_totp.at(api.clock.now))
    status, nonce_use = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "s", "nonce": uid("n")})
    assert status == 200 and first["decision"] == bob_use["decision"] == nonce_use["decision"] == "accept"
    api.clock.advance(2)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=api.clock.now - 4)
    replay = await login(api, vm_id, alice_id, code)
    assert replay["reason"] == "replay_after_rollback", replay
    status, raised = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200 and raised["kind"] == "replay_after_rollback", raised
    at_risk = {u["seq"] for u in raised["details"]["at_risk_uses"]}
    assert at_risk == {first["seq"], bob_use["seq"], nonce_use["seq"]}, raised


async def test_an_hotp_code_replayed_after_a_revert_is_named_even_when_the_counter_moved_on(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """HOTP with hotp_look_ahead = 3: a code used on a VM inside a rollback window, replayed
    after the user logged in three more times (its counter now behind the look-ahead), is
    `replay_after_rollback` (CONTRACT §4: presented before, first use inside the window),
    and, being a replay, does not count towards the user's lockout."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()), hotp_look_ahead=3,
                                 lockout_threshold=5)
    principal = uid("alice")
    hotp = pyotp.HOTP((await api.enroll(principal, type="hotp"))["secret"])
    vm_id = uid("web-01")
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=clock.now)
    clock.advance(5)
    first = hotp.at(0)
    assert (await login(api, vm_id, principal, first))["decision"] == "accept"
    for counter in (1, 2, 3):  # three more logins elsewhere
        clock.advance(5)
        assert (await login(api, uid("other"), principal, hotp.at(counter)))["decision"] == "accept"
    clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=clock.now - 25)
    replay = await login(api, vm_id, principal, first)
    async with api.runtime.pool.acquire() as conn:
        fails = await conn.fetchval("SELECT coalesce(max(fail_count), 0) FROM principals WHERE name = $1", principal)
    assert (replay["decision"], replay["reason"], fails) == ("reject", "replay_after_rollback", 0), (replay, fails)
    assert replay.get("alert_id") is not None


@pytest.mark.parametrize("purged", [False, True], ids=["kept", "purged"])
async def test_late_event_reclassifies_the_alert(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any], purged: bool,
) -> None:
    """A revert reported after the replay turns its reuse alert into a critical
    replay_after_rollback, the first use listed as at risk; also when retention purged the
    code's `uses` row between the replay and the event (nonce_max_ttl_s = 30, the clock past
    the code's drift window): its first use is then read from the ledger."""
    api: Api = await api_factory(FakeClock(), database_url=Secret(await fresh_database()),
                                 **({"nonce_max_ttl_s": 30} if purged else {}))
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    snapshot_at = api.clock.now
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    first = await login(api, vm_id, principal, code)
    api.clock.advance(5)
    reverted_at = api.clock.now
    api.clock.advance(5)
    replay = await login(api, vm_id, principal, code)
    assert replay["reason"] == "reused"
    before = await alert(api, replay["alert_id"])
    assert (before["kind"], before["severity"]) == ("reuse", "warning")
    api.clock.advance(600 if purged else 60)
    if purged:
        while await purge_expired(api.runtime.pool, api.runtime.now_us(), limit=1000) > 0:
            pass
        async with api.runtime.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM uses WHERE subject = $1", principal) == 0
    await event(api, vm_id, "snapshot.reverted", snapshot_id="pre", snapshot_created_at=snapshot_at,
                occurred_at=reverted_at)
    after = await alert(api, replay["alert_id"])
    assert (after["kind"], after["severity"], after["count"]) == ("replay_after_rollback", "critical", 1)
    assert [(h["change"], h["kind"]) for h in after["history"]] == [
        ("raised", "reuse"), ("reclassified", "replay_after_rollback")]
    assert [u["seq"] for u in after["details"]["at_risk_uses"]] == [first["seq"]]
    assert replay["seq"] in after["entries"] and first["seq"] in after["entries"]


async def test_late_event_leaves_unrelated_reuse_alone(api: Api) -> None:
    """A window that does not cover a credential's first use leaves its reuse alert as it was."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    code = totp.at(api.clock.now)
    await login(api, vm_id, principal, code)
    replay = await login(api, vm_id, principal, code)
    api.clock.advance(10)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="later", snapshot_created_at=api.clock.now - 5)
    assert (await alert(api, replay["alert_id"]))["kind"] == "reuse"


async def test_restore_from_saved_state(api: Api) -> None:
    """A vm.restored to a state saved before the login makes the replay replay_after_rollback."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    saved_at = api.clock.now
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    await login(api, vm_id, principal, code)
    api.clock.advance(5)
    await event(api, vm_id, "vm.restored", snapshot_created_at=saved_at)
    assert (await login(api, vm_id, principal, code))["reason"] == "replay_after_rollback"


async def test_refuse_mode_until_admin_clears(api_factory: Callable[..., Any]) -> None:
    """With receipt_reaction=refuse a rolled-back VM is refused everything until an admin clears it."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    _, warmup = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "boot", "nonce": uid("n")})
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    assert (await login(api, vm_id, principal, code, warmup["receipt"]))["decision"] == "accept"
    replay = await login(api, vm_id, principal, code, warmup["receipt"])
    assert (replay["reason"], replay["flags"]) == ("locked_out", ["rollback_detected"])
    api.clock.advance(30)
    fresh = await login(api, vm_id, principal, totp.at(api.clock.now), replay["receipt"])
    assert (fresh["decision"], fresh["reason"]) == ("reject", "locked_out")
    status, cleared = await api.post(f"/v1/vms/{vm_id}/clear", {"note": "guest reinstalled"}, role="admin")
    assert status == 200 and cleared["was_refusing"] is True and cleared["refusing_reason"] == "rollback_detected"
    api.clock.advance(30)
    after = await login(api, vm_id, principal, totp.at(api.clock.now), fresh["receipt"])
    assert (after["decision"], after["reason"]) == ("accept", "ok")
    async with api.runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT kind, payload FROM ledger WHERE seq = $1", cleared["seq"])
    assert row["kind"] == "vm_cleared" and row["payload"]["note"] == "guest reinstalled"


async def test_refuse_mode_refuses_a_vm_whose_revert_or_clone_the_hypervisor_reported(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """With receipt_reaction=refuse, a VM whose revert the hypervisor reported, and a clone
    it reported, are refused everything (locked_out; no receipt needed, as a RADIUS callout
    sends none) until an admin clears each; the event's ledger entry and the VM's
    refusing_reason name the event."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()), receipt_reaction="refuse")

    async def consume(vm_id: str) -> dict[str, Any]:
        status, answer = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "refuse", "nonce": uid("n")})
        assert status == 200, answer
        return dict(answer)

    vm_id = uid("web-01")
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=clock.now)
    clock.advance(5)
    assert (await consume(vm_id))["decision"] == "accept"
    clock.advance(5)
    reverted = await event(api, vm_id, "snapshot.reverted", snapshot_id="s1", snapshot_created_at=clock.now - 10)
    clone = uid("clone")
    await event(api, clone, "vm.cloned", source_vm_id=vm_id)
    clock.advance(5)
    after_revert, in_clone = await consume(vm_id), await consume(clone)
    assert (after_revert["reason"], after_revert["flags"]) == ("locked_out", []), after_revert
    assert (in_clone["reason"], in_clone["flags"]) == ("locked_out", []), in_clone
    async with api.runtime.pool.acquire() as conn:
        payload = await conn.fetchval("SELECT payload FROM ledger WHERE seq = $1", await event_seq(api, reverted))
    assert payload["refusing"] is True
    for vm, reason in ((vm_id, "snapshot.reverted"), (clone, "vm.cloned")):
        status, cleared = await api.post(f"/v1/vms/{vm}/clear", {"note": "planned"}, role="admin")
        assert status == 200 and (cleared["was_refusing"], cleared["refusing_reason"]) == (True, reason), cleared
        assert (await consume(vm))["decision"] == "accept"


async def test_flag_mode_keeps_a_reported_revert_serving(api: Api) -> None:
    """With receipt_reaction=flag (the default), a VM whose revert the hypervisor reported
    keeps serving fresh credentials."""
    vm_id = uid("web-01")
    await event(api, vm_id, "snapshot.created", snapshot_id="s1", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s1")
    status, answer = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "flag", "nonce": uid("n")})
    assert status == 200 and answer["decision"] == "accept", answer


async def test_fresh_login_after_admin_revert_is_accepted(api: Api) -> None:
    """An administrator's revert does not stop a fresh login, nor the next step's code."""
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "snapshot.created", snapshot_id="pre-patch", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    assert (await login(api, vm_id, principal, totp.at(api.clock.now)))["decision"] == "accept"
    api.clock.advance(5)
    await event(api, vm_id, "snapshot.reverted", snapshot_id="pre-patch")
    api.clock.advance(30)
    fresh = await login(api, vm_id, principal, totp.at(api.clock.now))
    assert (fresh["decision"], fresh["reason"]) == ("accept", "ok")
    api.clock.advance(30)
    assert (await login(api, vm_id, principal, totp.at(api.clock.now)))["decision"] == "accept"


async def test_a_secret_shared_by_two_principals_is_one_credential(api: Api) -> None:
    """Alice's replayed code is refused for Bob too when his token holds the same secret: it is one credential."""
    vm_id = uid("web-01")
    secret = pyotp.random_base32()
    alice_id, bob_id = uid("alice"), uid("bob")
    await api.enroll(alice_id, secret=secret)
    await api.enroll(bob_id, secret=secret)
    await event(api, vm_id, "snapshot.created", snapshot_id="s", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = pyotp.TOTP(secret).at(api.clock.now)
    assert (await login(api, vm_id, alice_id, code))["decision"] == "accept"
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s")
    assert (await login(api, vm_id, alice_id, code))["reason"] == "replay_after_rollback"
    assert (await login(api, vm_id, bob_id, code))["reason"] == "replay_after_rollback"
    api.clock.advance(30)
    assert (await login(api, vm_id, bob_id, pyotp.TOTP(secret).at(api.clock.now)))["decision"] == "accept"


async def test_a_replay_after_a_revert_event_is_named_with_redis_configured(api_factory: Callable[..., Any]) -> None:
    """With Redis configured, a replay after a revert event is named for what it is."""
    api: Api = await api_factory(FakeClock(), redis_url=Secret(REDIS_URL))
    vm_id = uid("web-01")
    principal, totp = await alice(api)
    await event(api, vm_id, "snapshot.created", snapshot_id="s", snapshot_created_at=api.clock.now)
    api.clock.advance(5)
    code = totp.at(api.clock.now)
    assert (await login(api, vm_id, principal, code))["decision"] == "accept"
    assert (await login(api, vm_id, principal, code))["reason"] == "reused"
    await event(api, vm_id, "snapshot.reverted", snapshot_id="s")
    assert (await login(api, vm_id, principal, code))["reason"] == "replay_after_rollback"


async def test_late_snapshot_created_without_time_does_not_narrow_the_window(api: Api) -> None:
    """A snapshot taken at base, whose event carries no time and arrives at base+20; a login
    at base+10; a revert to that snapshot at base+25, with no snapshot time either: the
    replay of the login's code is replay_after_rollback (the snapshot was recorded at its
    event's arrival, after the login, and the window missed it)."""
    vm_id = uid("vm")
    principal, totp = await alice(api)
    api.clock.advance(10)
    code = totp.at(api.clock.now)
    assert (await login(api, vm_id, principal, code))["decision"] == "accept"
    api.clock.advance(10)  # the snapshot.created arrives now, late, with no time in it
    created = {"event_id": uid("evt"), "type": "snapshot.created", "vm_id": vm_id, "snapshot_id": "s1"}
    assert (await api.post("/v1/hypervisor/events", created, role="hypervisor"))[0] == 202
    api.clock.advance(5)
    revert = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm_id, "snapshot_id": "s1",
              "occurred_at": api.clock.now}
    assert (await api.post("/v1/hypervisor/events", revert, role="hypervisor"))[0] == 202
    api.clock.advance(2)
    replay = await login(api, vm_id, principal, code)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay
