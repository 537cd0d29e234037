"""Tokens bound to VMs speak for those VMs only: decisions, receipts and events (issue 15, reproduction 5).

``replayguard token create --role callout|hypervisor --vm PATTERN`` stores shell-style
patterns over vm_id with the token; a request for another VM, or carrying the receipt of a
VM the token is not bound to, is 403 ``forbidden`` and changes nothing, on the fast front
and on aiohttp alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.errors import InvalidRequest
from replayguard.services.apitokens import Caller, check_patterns
from tests.conftest import Api, cli_env, run_cli, uid


async def bound_token(api: Api, role: str, *patterns: str) -> dict[str, str]:
    _, token = await api.runtime.api_tokens.create(role, uid(f"bound-{role}"), patterns)
    return {"Authorization": f"Bearer {token}"}


async def post(api: Api, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await api.client.post(path, json=body, headers=headers)
    return resp.status, await resp.json(content_type=None) if resp.status != 204 else None


def nonce(vm: str, receipt: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_id": vm, "scope": "bind", "nonce": uid("n")}
    if receipt is not None:
        body["receipt"] = receipt
    return body


@pytest.mark.parametrize("vm_id, patterns, covered", [
    ("web-01", (), True),
    ("web-01", ("web-*",), True),
    ("web-01", ("db-*", "web-0?"), True),
    ("web-10", ("web-0?",), False),
    ("Web-01", ("web-*",), False),
    ("web-01", ("web-01",), True),
    ("web-[1]", ("web-[[]1]",), True),
])
def test_caller_covers_shell_style_patterns(vm_id: str, patterns: tuple[str, ...], covered: bool) -> None:
    """fnmatch-style, case-sensitive patterns decide which VMs a token speaks for; none means every VM."""
    assert Caller("tok", "name", "callout", patterns).covers(vm_id) is covered


def test_only_callout_and_hypervisor_tokens_can_be_bound() -> None:
    """An analyst or admin token with VM patterns is refused; duplicates collapse."""
    with pytest.raises(InvalidRequest):
        check_patterns("analyst", ["web-*"])
    assert check_patterns("callout", ["a*", "a*", "b"]) == ("a*", "b")


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_decisions_for_other_vms_are_forbidden(api_factory: Callable[..., Any], front: str) -> None:
    """A callout token bound to web-* decides for web-01, and gets 403 for db-01 on every decision route."""
    api: Api = await api_factory(http_front=front)
    headers = await bound_token(api, "callout", "web-*")
    status, body = await post(api, "/v1/nonces/consume", nonce("web-01"), headers)
    assert (status, body["decision"]) == (200, "accept")
    status, body = await post(api, "/v1/nonces/consume", nonce("db-01"), headers)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    principal = uid("alice")
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    status, body = await post(api, "/v1/otp/verify", {"vm_id": "db-01", "principal": principal, "otp": code},
                              headers)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    radius = {"User-Name": {"type": "string", "value": [principal]},
              "User-Password": {"type": "string", "value": [code]},
              "NAS-Identifier": {"type": "string", "value": ["db-01"]}}
    status, body = await post(api, "/v1/radius/authenticate", radius, headers)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await post(api, "/v1/otp/verify", {"vm_id": "web-02", "principal": principal, "otp": code},
                              headers)
    assert (status, body["decision"]) == (200, "accept")  # the refused attempts consumed nothing


async def test_reproduction_5_a_token_of_another_vm_cannot_raise_rollbacks_on_a_victim(
    api_factory: Callable[..., Any],
) -> None:
    """Three consumes on a victim VM with its old receipt, by a token bound to another VM: all 403, and the victim's
    logins still pass under receipt_reaction = refuse."""
    api: Api = await api_factory(receipt_reaction="refuse")
    victim = uid("victim")
    guest = await bound_token(api, "callout", victim)
    attacker = await bound_token(api, "callout", "attacker-*")
    status, first = await post(api, "/v1/nonces/consume", nonce(victim), guest)
    assert status == 200
    status, second = await post(api, "/v1/nonces/consume", nonce(victim, first["receipt"]), guest)
    assert status == 200
    for _ in range(3):
        status, body = await post(api, "/v1/nonces/consume", nonce(victim, first["receipt"]), attacker)
        assert (status, body["error"]["code"]) == (403, "forbidden")
        # Its own VM, the victim's receipt: refused too, never used against the victim.
        status, body = await post(api, "/v1/nonces/consume", nonce("attacker-1", first["receipt"]), attacker)
        assert (status, body["error"]["code"], body["error"]["field"]) == (403, "forbidden", "receipt")
    status, body = await post(api, "/v1/nonces/consume", nonce(victim, second["receipt"]), guest)
    assert (status, body["decision"], body["flags"]) == (200, "accept", [])
    async with api.runtime.pool.acquire() as conn:
        refusing = await conn.fetchval("SELECT refusing FROM vms WHERE vm_id = $1", victim)
        windows = await conn.fetchval("SELECT count(*) FROM rollback_windows WHERE vm_id = $1", victim)
    assert (refusing, windows) == (False, 0)


async def test_a_caller_bound_to_both_vms_still_reveals_a_clone(api: Api) -> None:
    """A receipt of web-01 presented for web-02 by a token bound
    to both is flagged clone_detected, as without bindings."""
    headers = await bound_token(api, "callout", "web-0[12]")
    status, first = await post(api, "/v1/nonces/consume", nonce("web-01"), headers)
    assert status == 200
    status, cloned = await post(api, "/v1/nonces/consume", nonce("web-02", first["receipt"]), headers)
    assert (status, cloned["flags"]) == (200, ["clone_detected"])


async def test_events_for_other_vms_are_forbidden(api: Api) -> None:
    """A hypervisor token bound to web-* reports web VMs; an event
    for, or cloned from, another VM is 403 and not recorded."""
    headers = await bound_token(api, "hypervisor", "web-*")
    event = {"event_id": uid("evt"), "type": "vm.started", "vm_id": "web-01", "occurred_at": api.clock.now}
    assert (await post(api, "/v1/hypervisor/events", event, headers))[0] == 202
    other = {**event, "event_id": uid("evt"), "vm_id": "db-01"}
    status, body = await post(api, "/v1/hypervisor/events", other, headers)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    clone = {**event, "event_id": uid("evt"), "type": "vm.cloned", "vm_id": "web-09", "source_vm_id": "db-01"}
    status, body = await post(api, "/v1/hypervisor/events", clone, headers)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM hypervisor_events WHERE event_id = ANY($1::text[])",
                                   [other["event_id"], clone["event_id"]]) == 0


async def test_a_bound_token_cannot_take_another_vms_event_id(api: Api) -> None:
    """A token bound to att-* reports its own VM under the id the victim's relay will use next:
    the victim's revert is still recorded (202, not a duplicate, not 409), opens its window, and
    the victim's credential replayed after it is replay_after_rollback; the alert shows the
    victim's event. The same id for the same VM with another body stays a conflict."""
    victim, attacker = uid("web"), uid("att")
    squat = uid("evt")
    headers = await bound_token(api, "hypervisor", "att-*")
    taken = {"event_id": squat, "type": "vm.started", "vm_id": attacker, "occurred_at": api.clock.now}
    assert (await post(api, "/v1/hypervisor/events", taken, headers))[0] == 202
    snapshot_at = api.clock.now
    api.clock.advance(5)
    used = nonce(victim)
    status, first = await api.post("/v1/nonces/consume", used)
    assert (status, first["decision"]) == (200, "accept"), first
    api.clock.advance(5)
    revert = {"event_id": squat, "type": "snapshot.reverted", "vm_id": victim, "snapshot_id": "pre",
              "snapshot_created_at": snapshot_at, "occurred_at": api.clock.now}
    assert await api.post("/v1/hypervisor/events", revert, role="hypervisor") == (
        202, {"accepted": True, "duplicate": False, "events": 1})
    status, replay = await api.post("/v1/nonces/consume", used)
    assert (status, replay["decision"], replay["reason"]) == (200, "reject", "replay_after_rollback"), replay
    status, detail = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200, detail
    assert [(e["event_id"], e["vm_id"]) for e in detail["hypervisor_events"]] == [(squat, victim)], detail
    again = {**revert, "snapshot_id": "other"}
    status, body = await api.post("/v1/hypervisor/events", again, role="hypervisor")
    assert (status, body["error"]["code"]) == (409, "conflict"), body
    assert await api.post("/v1/hypervisor/events", taken, role="hypervisor") == (
        202, {"accepted": True, "duplicate": True, "events": 1})


async def test_cli_binds_tokens_lists_bindings_and_refuses_duplicate_names(api: Api) -> None:
    """`token create --vm` (repeatable) binds, `token list` shows the
    patterns, a second active token of one name exits 2 with one line."""
    name = uid("pam-web-01")
    args = ("--data-dir", str(api.runtime.settings.data_dir), "--database-url", api.runtime.dsn)
    created = run_cli("token", "create", "--role", "callout", "--name", name, "--vm", "web-01", "--vm", "web-01b",
                      *args, env=cli_env())
    assert created.returncode == 0, created.stderr
    headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
    assert (await post(api, "/v1/nonces/consume", nonce("web-01b"), headers))[0] == 200
    assert (await post(api, "/v1/nonces/consume", nonce("web-02"), headers))[0] == 403
    listed = run_cli("token", "list", *args, env=cli_env())
    line = next(row for row in listed.stdout.splitlines() if row.split("\t")[2] == name)
    assert line.split("\t")[3:] == ["active", "web-01,web-01b"]
    again = run_cli("token", "create", "--role", "callout", "--name", name, *args, env=cli_env())
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "already named" in again.stderr
    analyst = run_cli("token", "create", "--role", "analyst", "--name", uid("a"), "--vm", "x", *args, env=cli_env())
    assert analyst.returncode == 2 and "bound to VMs" in analyst.stderr
