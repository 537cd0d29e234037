"""The analysts' API (CONTRACT §6): alert queries, detail, acknowledgement, VMs, timelines,
the ledger listing, and the role check of every analyst route."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import pyotp
import pytest

from replayguard.http import analysts
from replayguard.http.state import ANALYSTS
from replayguard.settings import Secret
from tests.conftest import Api, uid
from tests.waiting import CountedLock, until


async def reuse_alert(api: Api, vm_id: str, scope: str, nonce: str | None = None) -> tuple[str, str]:
    """Consumes a nonce twice on ``vm_id``; returns (alert id, the raw nonce)."""
    nonce = nonce or secrets.token_hex(16)
    body = {"vm_id": vm_id, "scope": scope, "nonce": nonce}
    status, first = await api.post("/v1/nonces/consume", body)
    assert status == 200 and first["decision"] == "accept", first
    status, second = await api.post("/v1/nonces/consume", body)
    assert status == 200 and second["reason"] == "reused", second
    return second["alert_id"], nonce


async def rollback_alert(api: Api, vm_id: str) -> str:
    """Presents an old receipt: the VM went back in time, a critical alert."""
    async def consume(receipt: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"vm_id": vm_id, "scope": "s", "nonce": secrets.token_hex(8)}
        if receipt:
            body["receipt"] = receipt
        status, data = await api.post("/v1/nonces/consume", body)
        assert status == 200, data
        return dict(data)

    old = (await consume(None))["receipt"]
    await consume((await consume(old))["receipt"])
    result = await consume(old)
    assert "rollback_detected" in result["flags"]
    return str(result["alert_id"])


async def alert_ids(api: Api, query: str) -> list[str]:
    status, data = await api.get(f"/v1/alerts?{query}")
    assert status == 200, data
    return [item["id"] for item in data["items"]]


async def test_list_filters_by_vm_principal_kind_severity_status(api: Api) -> None:
    """Every filter of §6 narrows the list to the matching alerts."""
    vm_a, vm_b, scope = uid("vm"), uid("vm"), uid("scope")
    reuse, _ = await reuse_alert(api, vm_a, scope)
    rollback = await rollback_alert(api, vm_b)
    assert await alert_ids(api, f"vm_id={vm_a}") == [reuse]
    assert await alert_ids(api, f"principal={scope}") == [reuse]
    assert await alert_ids(api, f"vm_id={vm_b}&kind=rollback_detected") == [rollback]
    assert await alert_ids(api, f"vm_id={vm_b}&severity=critical") == [rollback]
    assert await alert_ids(api, f"vm_id={vm_a}&severity=critical") == []
    assert await alert_ids(api, f"vm_id={vm_a}&status=open") == [reuse]
    assert await alert_ids(api, f"vm_id={vm_a}&status=acknowledged") == []


async def test_list_since_until_select_alerts_active_in_the_window(api: Api) -> None:
    """since/until (RFC 3339 or Unix seconds) keep the alerts seen inside the interval."""
    scope = uid("scope")
    early, _ = await reuse_alert(api, uid("vm"), scope)
    api.clock.advance(3600)
    middle = api.clock.now
    api.clock.advance(3600)
    late, _ = await reuse_alert(api, uid("vm"), scope)
    assert await alert_ids(api, f"principal={scope}") == [late, early]
    assert await alert_ids(api, f"principal={scope}&since={middle}") == [late]
    assert await alert_ids(api, f"principal={scope}&until={int(middle)}") == [early]
    status, data = await api.get(f"/v1/alerts?principal={scope}&since=2020-01-01T00:00:00Z")
    assert status == 200 and len(data["items"]) == 2


@pytest.mark.parametrize(("query", "field"), [
    ("cursor=garbage!!", "cursor"), ("cursor=YjEy", "cursor"), ("severity=urgent", "severity"),
    ("status=closed", "status"), ("limit=0", "limit"), ("limit=abc", "limit"), ("since=yesterday", "since"),
    ("until=1e999", "until"), ("vm_id=%01", "vm_id"),
])
async def test_list_rejects_bad_parameters_with_their_field(api: Api, query: str, field: str) -> None:
    """A malformed filter or cursor is a 400 naming the parameter, never a 500."""
    status, data = await api.get(f"/v1/alerts?{query}")
    assert status == 400, data
    assert data["error"]["field"] == field


async def test_pagination_is_stable_while_new_alerts_arrive(api: Api) -> None:
    """Walking the pages while alerts are raised and joined skips nothing and repeats nothing."""
    scope = uid("scope")
    existing = [(await reuse_alert(api, uid("vm"), scope))[0] for _ in range(7)]
    seen: list[str] = []
    status, page = await api.get(f"/v1/alerts?principal={scope}&limit=3")
    while True:
        assert status == 200, page
        seen += [item["id"] for item in page["items"]]
        await reuse_alert(api, uid("vm"), scope)  # a new alert arrives between pages
        if page["next_cursor"] is None:
            break
        status, page = await api.get(f"/v1/alerts?principal={scope}&limit=3&cursor={page['next_cursor']}")
    assert seen == sorted(existing, key=int, reverse=True)


async def test_detail_has_entries_as_digests_and_history(api: Api) -> None:
    """The detail lists both ledger entries behind a reuse, as hex digests, never the raw nonce."""
    vm_id = uid("vm")
    alert_id, nonce = await reuse_alert(api, vm_id, uid("scope"))
    await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": "x", "nonce": "other"})
    resp = await api.client.get(f"/v1/alerts/{alert_id}", headers=api.auth("analyst"))
    text = await resp.text()
    detail = await resp.json()
    assert resp.status == 200 and nonce not in text
    assert detail["kind"] == "reuse" and detail["count"] == 1
    assert [e["decision"] for e in detail["entries"]] == ["accept", "reject"]
    assert len({e["digest"] for e in detail["entries"]}) == 1 and len(detail["entries"][0]["digest"]) == 64
    assert detail["history"][0]["change"] == "raised"
    assert (await api.get("/v1/alerts/999999999999"))[0] == 404
    assert (await api.get("/v1/alerts/abc"))[0] == 404


async def test_a_replayed_credential_keeps_a_bounded_history(api: Api) -> None:
    """Thirty sightings of one credential: the count says 30, the history keeps the entry
    that raised the alert and the 11 latest (migration 007), the ledger keeps them all."""
    vm_id, scope = uid("vm"), uid("scope")
    alert_id, nonce = await reuse_alert(api, vm_id, scope)
    seqs = []
    for _ in range(29):
        status, answer = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
        assert status == 200 and answer["reason"] == "reused" and answer["alert_id"] == alert_id
        seqs.append(answer["seq"])
    status, detail = await api.get(f"/v1/alerts/{alert_id}")
    assert status == 200 and detail["count"] == 30
    history = detail["history"]
    assert len(history) == 12 and history[0]["change"] == "raised"
    assert [h["seq"] for h in history[1:]] == seqs[-11:]
    status, timeline = await api.get(f"/v1/vms/{vm_id}/timeline")
    assert status == 200
    assert {e["seq"] for e in timeline["items"] if e.get("type", "decision") == "decision"} >= set(seqs)


async def test_detail_shows_the_hypervisor_events_behind_a_replay_after_rollback(api: Api) -> None:
    """A replay after a revert shows the rollback window and the revert event behind it."""
    vm_id, scope, nonce = uid("vm"), uid("scope"), secrets.token_hex(8)
    body = {"vm_id": vm_id, "scope": scope, "nonce": nonce}
    snapshot_at = api.clock.now - 60
    assert (await api.post("/v1/nonces/consume", body))[1]["decision"] == "accept"
    api.clock.advance(30)
    event = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm_id, "snapshot_id": "pre",
             "snapshot_created_at": snapshot_at, "occurred_at": api.clock.now}
    status, answer = await api.post("/v1/hypervisor/events", event, role="hypervisor")
    assert status == 202, answer
    api.clock.advance(30)
    _, replay = await api.post("/v1/nonces/consume", body)
    assert replay["reason"] == "replay_after_rollback"
    status, detail = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200 and detail["severity"] == "critical"
    assert [w["event_id"] for w in detail["rollback_windows"]] == [event["event_id"]]
    assert event["event_id"] in [e["event_id"] for e in detail["hypervisor_events"]]


async def test_acknowledge_records_caller_and_note_in_the_ledger(api: Api) -> None:
    """Acknowledging sets the status and appends an alert_ack entry naming the caller's token."""
    vm_id = uid("vm")
    alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
    caller = await api.runtime.api_tokens.authenticate(api.tokens["analyst"])
    assert caller is not None
    status, acked = await api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": "rolled back by ops"},
                                   role="analyst")
    assert status == 200, acked
    assert acked["status"] == "acknowledged" and acked["acknowledged"]["by"] == caller.token_id
    status, ledger = await api.get(f"/v1/ledger?vm_id={vm_id}")
    ack = [e for e in ledger["items"] if e["kind"] == "alert_ack"]
    assert len(ack) == 1 and ack[0]["seq"] == acked["ack_seq"]
    assert ack[0]["payload"]["by"] == caller.token_id and ack[0]["payload"]["alert_id"] == alert_id
    assert ack[0]["payload"]["note"] == "rolled back by ops"
    assert await alert_ids(api, f"vm_id={vm_id}&status=acknowledged") == [alert_id]


async def test_an_alert_acknowledged_again_and_again_keeps_a_bounded_history(api: Api) -> None:
    """Twenty acknowledgements of one alert (the API accepts each: every one is an analyst's
    audited decision): every one is a ledger entry and listed under ``acknowledgements``, but
    the history keeps the entry that raised the alert and the 11 latest changes, as
    ``rg_alert`` bounds it, so repeated acknowledgements cannot grow the row without end."""
    vm_id = uid("vm")
    alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
    _, before = await api.get(f"/v1/alerts/{alert_id}")
    raised = before["history"][0]
    seqs = []
    for n in range(20):
        status, acked = await api.post(f"/v1/alerts/{alert_id}/acknowledge", {"note": f"look {n}"}, role="analyst")
        assert status == 200 and acked["status"] == "acknowledged", acked
        seqs.append(acked["ack_seq"])
    status, detail = await api.get(f"/v1/alerts/{alert_id}")
    assert status == 200
    history = detail["history"]
    assert len(history) == 12 and history[0] == raised
    assert [h["seq"] for h in history[1:]] == seqs[-11:]
    assert {h["change"] for h in history[1:]} == {"acknowledged"}
    assert [a["seq"] for a in detail["acknowledgements"]] == seqs
    status, ledger = await api.get(f"/v1/ledger?vm_id={vm_id}")
    assert [e["seq"] for e in ledger["items"] if e["kind"] == "alert_ack"] == seqs


@pytest.mark.parametrize("body", [{"note": 5}, {"note": "x" * 2001}, {"note": "a\x00b"}, [1]])
async def test_acknowledge_rejects_a_bad_note(api: Api, body: Any) -> None:
    """A note that is not bounded printable text is a 400."""
    alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    status, data = await api.post(f"/v1/alerts/{alert_id}/acknowledge", body, role="analyst")
    assert status == 400, data


async def test_timeline_lists_decisions_events_and_alerts_in_ledger_order(api: Api) -> None:
    """A VM's timeline holds its decisions, its revert event and the alert ids, ordered by seq."""
    vm_id, scope = uid("vm"), uid("scope")
    alert_id, _ = await reuse_alert(api, vm_id, scope)
    api.clock.advance(100)
    cut = api.clock.now
    event = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm_id, "snapshot_id": "s",
             "snapshot_created_at": cut - 10, "occurred_at": cut}
    assert (await api.post("/v1/hypervisor/events", event, role="hypervisor"))[0] == 202
    status, page = await api.get(f"/v1/vms/{vm_id}/timeline")
    assert status == 200, page
    seqs = [item["seq"] for item in page["items"]]
    assert seqs == sorted(seqs) and len(seqs) == 3
    assert [i["decision"] for i in page["items"][:2]] == ["accept", "reject"]
    assert page["items"][1]["alert_ids"] == [alert_id]
    assert page["items"][2]["event"]["event_id"] == event["event_id"]
    status, later = await api.get(f"/v1/vms/{vm_id}/timeline?since={cut}")
    assert [i["seq"] for i in later["items"]] == seqs[2:]
    status, first = await api.get(f"/v1/vms/{vm_id}/timeline?limit=2")
    assert first["next_after_seq"] == seqs[1]
    assert (await api.get(f"/v1/vms/{uid('nope')}/timeline"))[0] == 404


async def test_timeline_carries_the_vms_rollback_windows(api: Api) -> None:
    """A revert's window [T, R] is on its VM's timeline, and a clone's on its source VM's."""
    vm_id, clone = uid("vm"), uid("clone")
    start = api.clock.now
    api.clock.advance(60)
    event = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm_id, "snapshot_id": "s",
             "snapshot_created_at": start, "occurred_at": api.clock.now}
    assert (await api.post("/v1/hypervisor/events", event, role="hypervisor"))[0] == 202
    status, page = await api.get(f"/v1/vms/{vm_id}/timeline")
    assert status == 200, page
    [window] = page["rollback_windows"]
    assert (window["vm_id"], window["event_id"], window["cause"]) == (vm_id, event["event_id"], "snapshot.reverted")
    assert window["start"] < window["end"]
    status, page = await api.get(f"/v1/vms/{vm_id}/timeline?until={start - 10}")
    assert page["rollback_windows"] == []
    cloned = {"event_id": uid("evt"), "type": "vm.cloned", "vm_id": clone, "source_vm_id": vm_id,
              "occurred_at": api.clock.now}
    assert (await api.post("/v1/hypervisor/events", cloned, role="hypervisor"))[0] == 202
    status, page = await api.get(f"/v1/vms/{vm_id}/timeline")
    assert {w["event_id"] for w in page["rollback_windows"]} == {event["event_id"], cloned["event_id"]}


async def test_vm_list_pages_with_a_cursor(api: Api) -> None:
    """The VM list walks every VM once, with open alert counts."""
    vm_id = uid("vm")
    await reuse_alert(api, vm_id, uid("scope"))
    seen: list[dict[str, Any]] = []
    cursor = ""
    while True:
        status, page = await api.get(f"/v1/vms?limit=50{cursor}")
        assert status == 200, page
        seen += page["items"]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    names = [vm["vm_id"] for vm in seen]
    assert names == sorted(set(names))
    assert next(vm for vm in seen if vm["vm_id"] == vm_id)["open_alerts"] == 1
    assert (await api.get("/v1/vms?cursor=%%%"))[0] == 400


async def test_ledger_listing_never_holds_raw_credentials(api: Api) -> None:
    """Ledger entries carry keyed digests; the raw nonce and OTP appear nowhere in the listing."""
    vm_id, principal = uid("vm"), uid("alice")
    nonce = "very-secret-nonce-" + secrets.token_hex(8)
    await reuse_alert(api, vm_id, uid("scope"), nonce)
    token = await api.enroll(principal)
    code = pyotp.TOTP(token["secret"]).at(api.clock.now)
    await api.post("/v1/otp/verify", {"vm_id": vm_id, "principal": principal, "otp": code})
    resp = await api.client.get(f"/v1/ledger?vm_id={vm_id}", headers=api.auth("analyst"))
    text = await resp.text()
    assert resp.status == 200
    assert nonce not in text and token["secret"] not in text and f'"{code}"' not in text
    items = (await resp.json())["items"]
    assert len(items) == 3 and all(len(i["digest"]) == 64 for i in items)
    status, paged = await api.get(f"/v1/ledger?vm_id={vm_id}&after_seq={items[0]['seq']}&limit=1")
    assert status == 200 and [i["seq"] for i in paged["items"]] == [items[1]["seq"]]
    assert paged["next_after_seq"] == items[1]["seq"]


async def test_ledger_verify_and_public_key(api: Api) -> None:
    """An untouched ledger verifies, and the checkpoint key is exported as PEM."""
    await reuse_alert(api, uid("vm"), uid("scope"))
    status, report = await api.get("/v1/ledger/verify")
    assert status == 200 and report["ok"] is True and report["checked"] == report["head"]["seq"]
    status, key = await api.get("/v1/ledger/public-key")
    assert status == 200 and key["algorithm"] == "Ed25519"
    assert key["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")


async def test_a_verification_whose_client_left_stops_on_the_server(api: Api) -> None:
    """A whole-ledger verification whose client went away (the analyst left the ledger page)
    stops on the server: held here before its chain check (which runs one at a time), it
    gives up its place once the client closes the connection, rather than run to the end
    for nobody and hold up the verifications after it."""
    await reuse_alert(api, uid("vm"), uid("scope"))
    chain = api.client.app[ANALYSTS].ledger._chain
    assert chain is not None
    chain._apart = turn = CountedLock()
    await turn.acquire()  # a verification under way
    try:
        asking = asyncio.create_task(api.get("/v1/ledger/verify"))
        await until(lambda: turn.waiting == 1, "the verification to wait for its turn")
        asking.cancel()  # the client closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        await until(lambda: turn.waiting == 0, "the abandoned verification to stop")
    finally:
        turn.release()
    status, report = await api.get("/v1/ledger/verify")
    assert status == 200 and report["ok"] is True


def _path(route: Any, alert_id: str, vm_id: str) -> str:
    return route.path.replace("{id}", alert_id).replace("{vm_id}", vm_id)


@pytest.mark.parametrize("route", analysts.ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_every_analyst_route_checks_the_role(api: Api, route: Any) -> None:
    """No token: 401; callout or hypervisor role: 403; analyst and admin: 200."""
    vm_id = uid("vm")
    alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
    path = _path(route, alert_id, vm_id)
    kwargs: dict[str, Any] = {"json": {"note": "ok"}} if route.method == "POST" else {}
    resp = await api.client.request(route.method, path, **kwargs)
    assert resp.status == 401
    for role, expected in (("callout", 403), ("hypervisor", 403), ("analyst", 200), ("admin", 200)):
        resp = await api.client.request(route.method, path, headers=api.auth(role), **kwargs)
        assert resp.status == expected, (role, await resp.text())
        resp.close()


async def test_status_reports_head_checkpoint_sinks_and_caller(api: Api) -> None:
    """/v1/status names the ledger head, the last checkpoint (or null), the sinks and the caller's role."""
    await reuse_alert(api, uid("vm"), uid("scope"))
    status, body = await api.get("/v1/status")
    assert status == 200, body
    async with api.runtime.pool.acquire() as conn:
        head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
    assert body["ledger"]["head"] == {"seq": head["seq"], "hash": bytes(head["hash"]).hex()}
    assert body["ledger"]["last_checkpoint"] is None or body["ledger"]["last_checkpoint"]["seq"] <= head["seq"]
    assert body["sinks"] == [] and body["caller"]["role"] == "analyst"
    assert (await api.get("/v1/status", role="admin"))[1]["caller"]["role"] == "admin"
    assert (await api.get("/v1/status", role="callout"))[0] == 403


async def test_status_names_each_witness_and_its_state(api_factory: Any, fresh_database: Any,
                                                      tmp_path: Any) -> None:
    """/v1/status reports continuity and each witness: up when it answers, unreachable when its directory is gone."""
    (tmp_path / "witness").mkdir()
    held, gone = tmp_path / "witness" / "rg.json", tmp_path / "missing" / "rg.json"
    api: Api = await api_factory(database_url=Secret(await fresh_database()),
                                 witnesses=(f"file:{held}", f"file:{gone}"))
    status, body = await api.get("/v1/status")
    assert status == 200, body
    assert body["continuity"] == "witness_unreachable" and body["rollback"] is None
    states = {w["name"]: w["state"] for w in body["witnesses"]}
    assert states == {f"file:{held}": "up", f"file:{gone}": "unreachable"}


@pytest.mark.parametrize(("name", "shown"), [
    ("file:/srv/witness/rg.json", "file:/srv/witness/rg.json"),
    ("https://user:secret@witness.example:8443/v1?token=abc#x", "https://witness.example:8443/v1"),
    ("http://witness.example", "http://witness.example"),
])
def test_status_shows_witness_urls_without_credentials(name: str, shown: str) -> None:
    """A witness URL's userinfo, query and fragment never reach /v1/status."""
    assert analysts._shown(name) == shown
