"""A consumed nonce is never accepted again, whatever a later ttl_s or issued_at claims (issue 15, reproduction 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.core.credentials import nonce_digest
from replayguard.services.retention import purge_expired
from replayguard.settings import Secret
from tests.conftest import Api, uid


async def consume(api: Api, body: dict[str, Any]) -> tuple[str, str]:
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, answer
    assert isinstance(answer["seq"], int) and answer["receipt"], answer
    return answer["decision"], answer["reason"]


async def purge(api: Api, body: dict[str, Any]) -> None:
    """Runs retention at the service's (fake) now until nothing more is due (the service's
    own leader may have run it first); the nonce has no use row and its spent digest stays."""
    while await purge_expired(api.runtime.pool, api.runtime.now_us(), limit=1000) > 0:
        pass
    digest = nonce_digest(api.runtime.keys.pepper, body["scope"], body["nonce"].encode())
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM uses WHERE digest = $1", digest) == 0
        assert await conn.fetchval("SELECT count(*) FROM spent_nonces WHERE digest = $1", digest) == 1


async def test_the_accepting_decision_spends_the_nonce(api: Api) -> None:
    """The decision that accepts a nonce writes its digest to spent_nonces, naming that
    decision's entry, and no use row: nothing is moved or deleted later."""
    scope, nonce = uid("scope"), uid("n")
    body = {"vm_id": uid("vm"), "scope": scope, "nonce": nonce, "ttl_s": 60}
    status, answer = await api.post("/v1/nonces/consume", body)
    assert (status, answer["decision"]) == (200, "accept"), answer
    digest = nonce_digest(api.runtime.keys.pepper, scope, nonce.encode())
    async with api.runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT first_seq FROM spent_nonces WHERE digest = $1", digest) == answer["seq"]
        assert await conn.fetchval("SELECT count(*) FROM uses WHERE digest = $1", digest) == 0


async def test_reproduction_4_a_later_ttl_does_not_reopen_a_nonce(api: Api) -> None:
    """N with issued_at = now and ttl_s = 1 accepted; 75 s later (retention run past its
    expiry) N with ttl_s = 3600, same issued_at or none, is refused."""
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("n"), "issued_at": api.clock.now, "ttl_s": 1}
    assert await consume(api, body) == ("accept", "ok")
    api.clock.advance(75)
    await purge(api, body)
    assert await consume(api, {**body, "ttl_s": 3600}) == ("reject", "reused")
    without = {k: v for k, v in body.items() if k != "issued_at"}
    assert await consume(api, {**without, "ttl_s": 3600}) == ("reject", "reused")
    assert await consume(api, without) == ("reject", "reused")
    assert await consume(api, {**body, "issued_at": api.clock.now, "ttl_s": 3600}) == ("reject", "reused")


async def test_a_later_ttl_does_not_reopen_a_nonce_before_retention_runs(api: Api) -> None:
    """Before retention runs, the same presentations are refused too."""
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("n"), "issued_at": api.clock.now, "ttl_s": 1}
    assert await consume(api, body) == ("accept", "ok")
    api.clock.advance(75)
    assert await consume(api, {**body, "ttl_s": 3600}) == ("reject", "reused")
    assert await consume(api, {k: v for k, v in body.items() if k != "issued_at"}) == ("reject", "reused")


async def test_a_nonce_without_issued_at_is_refused_after_nonce_max_ttl(api: Api) -> None:
    """A nonce consumed without issued_at is still refused after nonce_max_ttl_s and a retention run, with any ttl."""
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("n"), "ttl_s": 60}
    assert await consume(api, body) == ("accept", "ok")
    api.clock.advance(api.runtime.settings.nonce_max_ttl_s + 3600)
    await purge(api, body)
    assert await consume(api, body) == ("reject", "reused")
    assert await consume(api, {**body, "issued_at": api.clock.now, "ttl_s": 300}) == ("reject", "reused")


async def test_other_nonces_are_still_accepted_after_a_purge(api: Api) -> None:
    """spent_nonces refuses only what was consumed: a fresh nonce in the same scope is accepted."""
    scope, vm = uid("scope"), uid("vm")
    assert await consume(api, {"vm_id": vm, "scope": scope, "nonce": "a", "ttl_s": 1,
                               "issued_at": api.clock.now}) == ("accept", "ok")
    api.clock.advance(120)
    await purge(api, {"scope": scope, "nonce": "a"})
    assert await consume(api, {"vm_id": vm, "scope": scope, "nonce": "b"}) == ("accept", "ok")


async def test_a_nonce_without_ttl_is_decided_when_nonce_max_ttl_is_below_the_default(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """With nonce_max_ttl_s = 60, a consume without ttl_s is decided (its ttl is 60), not a 400."""
    api: Api = await api_factory(database_url=Secret(await fresh_database()), nonce_max_ttl_s=60)
    assert await consume(api, {"vm_id": uid("vm"), "scope": uid("s"), "nonce": uid("n")}) == ("accept", "ok")



async def test_a_nonce_replayed_after_a_rollback_is_reported_once_it_expired(api: Api) -> None:
    """A nonce consumed inside a rollback window and replayed after its ttl is
    ``replay_after_rollback`` with its alert, not a silent ``expired``: the replay is looked
    up before the ttl is judged (CONTRACT §5: presenting it again, anywhere)."""
    vm = uid("web")
    taken = api.clock.now
    api.clock.advance(5)
    nonce = {"vm_id": vm, "scope": uid("api-login"), "nonce": uid("n"), "ttl_s": 60, "issued_at": api.clock.now}
    assert await consume(api, nonce) == ("accept", "ok")
    api.clock.advance(5)
    revert = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm, "snapshot_id": "pre",
              "snapshot_created_at": taken, "occurred_at": api.clock.now}
    status, answer = await api.post("/v1/hypervisor/events", revert, role="hypervisor")
    assert status == 202, answer
    api.clock.advance(80)  # past issued_at + ttl_s, before retention may forget the use
    status, replay = await api.post("/v1/nonces/consume", nonce)
    assert (status, replay["decision"], replay["reason"]) == (200, "reject", "replay_after_rollback"), replay
    assert "alert_id" in replay
    assert await consume(api, {**nonce, "nonce": uid("n")}) == ("reject", "expired")


async def test_a_nonce_replayed_after_retention_ran_is_still_reported(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any]) -> None:
    """After retention ran past a nonce's expiry, a presentation of it (without issued_at:
    that is the caller's word) is still `reused` with a reuse alert naming the entry that
    accepted it, read from the ledger through spent_nonces' first_seq."""
    api: Api = await api_factory(database_url=Secret(await fresh_database()))
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("n"), "issued_at": api.clock.now, "ttl_s": 300}
    status, first = await api.post("/v1/nonces/consume", body)
    assert (status, first["decision"]) == (200, "accept"), first
    api.clock.advance(400)
    await purge(api, body)
    status, replay = await api.post("/v1/nonces/consume", {**{k: v for k, v in body.items() if k != "issued_at"},
                                                           "vm_id": uid("vm")})
    assert (status, replay["decision"], replay["reason"]) == (200, "reject", "reused"), replay
    status, raised = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200 and raised["kind"] == "reuse", raised
    assert raised["details"]["first_seq"] == first["seq"] and first["seq"] in {e["seq"] for e in raised["entries"]}


async def test_an_expired_nonce_first_used_inside_a_rollback_window_is_a_replay_after_rollback(api: Api) -> None:
    """A nonce first used on a VM later reverted to a state before that use, presented again
    after retention ran past its expiry, is `replay_after_rollback` (its first use's VM and
    time come from the ledger entry spent_nonces names)."""
    vm = uid("web")
    taken = api.clock.now
    api.clock.advance(5)
    body = {"vm_id": vm, "scope": uid("api-login"), "nonce": uid("n"), "ttl_s": 60, "issued_at": api.clock.now}
    assert await consume(api, body) == ("accept", "ok")
    api.clock.advance(5)
    revert = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm, "snapshot_id": "pre",
              "snapshot_created_at": taken, "occurred_at": api.clock.now}
    status, answer = await api.post("/v1/hypervisor/events", revert, role="hypervisor")
    assert status == 202, answer
    api.clock.advance(200)  # past issued_at + ttl_s + 60: retention may run
    await purge(api, body)
    assert await consume(api, body) == ("reject", "replay_after_rollback")
    without_issued_at = {k: v for k, v in body.items() if k != "issued_at"}
    assert await consume(api, without_issued_at) == ("reject", "replay_after_rollback")


async def _revert(api: Api, vm: str, snapshot_at: float, reverted_at: float) -> None:
    """Posts a revert of `vm` to a snapshot taken at `snapshot_at`, done at `reverted_at`."""
    body = {"event_id": uid("evt"), "type": "snapshot.reverted", "vm_id": vm, "snapshot_id": "pre",
            "snapshot_created_at": snapshot_at, "occurred_at": reverted_at}
    status, answer = await api.post("/v1/hypervisor/events", body, role="hypervisor")
    assert status == 202 and answer["duplicate"] is False, answer


async def test_a_late_revert_reclassifies_the_reuse_alert_of_an_expired_nonce(api: Api) -> None:
    """A nonce consumed on a VM, retention run past its expiry, replayed (`reused`, a reuse
    alert read from the ledger entry spent_nonces names), and only then the revert that
    undid its consumption reported: the reuse alert becomes a critical
    replay_after_rollback, as it does before retention runs
    (test_rollback_attack.py::test_late_event_reclassifies_the_alert), listing the nonce's
    use as at risk."""
    vm = uid("web")
    taken = api.clock.now
    api.clock.advance(5)
    body = {"vm_id": vm, "scope": uid("api-login"), "nonce": uid("n"), "ttl_s": 60, "issued_at": api.clock.now}
    status, first = await api.post("/v1/nonces/consume", body)
    assert (status, first["decision"]) == (200, "accept"), first
    api.clock.advance(5)
    reverted_at = api.clock.now
    api.clock.advance(200)  # past issued_at + ttl_s + 60
    await purge(api, body)
    status, replay = await api.post("/v1/nonces/consume", body)
    assert (status, replay["decision"], replay["reason"]) == (200, "reject", "reused"), replay
    status, before = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200 and (before["kind"], before["severity"]) == ("reuse", "warning"), before
    api.clock.advance(60)
    await _revert(api, vm, taken, reverted_at)
    status, after = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200, after
    assert (after["kind"], after["severity"], after["count"]) == ("replay_after_rollback", "critical", 1), after
    assert [(h["change"], h["kind"]) for h in after["history"]] == [
        ("raised", "reuse"), ("reclassified", "replay_after_rollback")]
    assert after["details"]["first_seq"] == first["seq"] and after["details"]["first_vm_id"] == vm
    assert first["seq"] in [u["seq"] for u in after["details"]["at_risk_uses"]], after["details"]
    assert {replay["seq"], first["seq"]} <= {e["seq"] for e in after["entries"]}


async def test_the_replay_alert_lists_every_use_the_window_put_at_risk(api: Api) -> None:
    """The replay_after_rollback alert's `at_risk_uses` lists every use the window covers,
    read from the ledger: two nonces consumed on a VM inside a window, retention run past
    their expiry, and one of them replayed after the revert; the alert lists both (the
    other is as much at risk: its consumption was undone too)."""
    vm = uid("web")
    taken = api.clock.now
    api.clock.advance(5)
    bodies = [{"vm_id": vm, "scope": uid("api-login"), "nonce": uid("n"), "ttl_s": 60, "issued_at": api.clock.now}
              for _ in range(2)]
    seqs = []
    for body in bodies:
        status, use = await api.post("/v1/nonces/consume", body)
        assert (status, use["decision"]) == (200, "accept"), use
        seqs.append(use["seq"])
    api.clock.advance(5)
    await _revert(api, vm, taken, api.clock.now)
    api.clock.advance(200)
    for body in bodies:
        await purge(api, body)
    status, replay = await api.post("/v1/nonces/consume", bodies[0])
    assert (status, replay["decision"], replay["reason"]) == (200, "reject", "replay_after_rollback"), replay
    status, raised = await api.get(f"/v1/alerts/{replay['alert_id']}")
    assert status == 200 and raised["kind"] == "replay_after_rollback", raised
    at_risk = raised["details"]["at_risk_uses"]
    assert [u["seq"] for u in at_risk] == seqs, raised["details"]
    assert all((u["kind"], u["vm_id"]) == ("nonce", vm) for u in at_risk), at_risk
