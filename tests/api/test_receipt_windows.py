"""The rollback window a stale receipt opens covers every use the ledger recorded on the VM
after that receipt's entry, whatever clock stamped them: the host's clock stepped back
since, or another instance's clock running ahead, leaves none of those uses outside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid


async def consume(api: Api, vm_id: str, nonce: str, receipt: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"vm_id": vm_id, "scope": "windows", "nonce": nonce}
    if receipt is not None:
        body["receipt"] = receipt
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, answer
    return dict(answer)


async def test_a_stale_receipt_after_the_host_clock_stepped_back_puts_the_lost_uses_at_risk(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """A nonce first used on a VM after the receipt its guest goes back to, then the host
    clock steps back 30 s (an NTP correction) before the guest presents that receipt: the
    window still covers the use, and its replay is `replay_after_rollback` (CONTRACT §4/§5)."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()))
    vm = uid("vm")
    old = (await consume(api, vm, uid("a")))["receipt"]
    old = (await consume(api, vm, uid("b"), old))["receipt"]  # the guest's state at this point
    clock.advance(10)
    used = uid("n")
    later = await consume(api, vm, used, old)  # first use, after the receipt the guest will go back to
    assert later["decision"] == "accept"
    clock.advance(-30)  # the host clock steps back 30 s
    back = await consume(api, vm, uid("c"), old)  # the guest's disk went back: the old receipt
    assert "rollback_detected" in back["flags"], back
    replay = await consume(api, vm, used)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay


async def test_a_stale_receipt_puts_at_risk_a_use_recorded_by_an_instance_whose_clock_runs_ahead(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """Two instances on one database, one's clock 3 s ahead of the other's. A nonce is
    consumed on VM X through the fast instance after the receipt the guest will go back to;
    1 s later the guest, rolled back, presents that receipt through the slow instance: the
    window reaches the use's time stamp, so the replay is `replay_after_rollback`. The uses a
    stale receipt puts at risk are those the ledger recorded after it (seq order)."""
    dsn = Secret(await fresh_database())
    slow_clock = FakeClock()
    fast_clock = FakeClock(slow_clock.now + 3)
    slow: Api = await api_factory(slow_clock, database_url=dsn)
    fast: Api = await api_factory(fast_clock, database_url=dsn)
    vm = uid("vm")
    old = (await consume(slow, vm, uid("a")))["receipt"]
    old = (await consume(slow, vm, uid("b"), old))["receipt"]
    for c in (slow_clock, fast_clock):
        c.advance(1)
    used = uid("n")
    assert (await consume(fast, vm, used, old))["decision"] == "accept"
    for c in (slow_clock, fast_clock):
        c.advance(1)
    back = await consume(slow, vm, uid("c"), old)
    assert "rollback_detected" in back["flags"], back
    replay = await consume(slow, vm, used)
    assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay


async def test_a_foreign_receipt_puts_at_risk_the_source_uses_stamped_before_the_receipt(
    fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
) -> None:
    """A clone presenting its source's receipt after the host clock stepped back: the
    source's uses recorded after that receipt are at risk all the same (`receipt_clone`
    window bounded by the ledger), and a nonce the source used before the receipt is not."""
    clock = FakeClock()
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()))
    source, clone = uid("vm"), uid("clone")
    before = uid("n")
    await consume(api, source, before)
    clock.advance(10)
    receipt = (await consume(api, source, uid("a")))["receipt"]
    clock.advance(10)
    used = uid("n")
    assert (await consume(api, source, used, receipt))["decision"] == "accept"
    clock.advance(-40)
    in_clone = await consume(api, clone, uid("c"), receipt)
    assert "clone_detected" in in_clone["flags"], in_clone
    assert (await consume(api, clone, used))["reason"] == "replay_after_rollback"
    assert (await consume(api, clone, before))["reason"] == "reused"
