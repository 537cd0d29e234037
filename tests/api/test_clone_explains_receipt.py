"""With ``receipt_reaction = "refuse"``, a reported ``vm.cloned`` (source S, clone C, state
time T) accounts for the receipt the clone presents next, when the report explains it: the
clone's disk is S's as of T, so it holds the receipt S's guest had then (the newest issued
to S at or before T; any of S's issued up to the clone, when T is unknown). That receipt
starts the clone's own line of receipts, once, without a clone_detected flag, a new window
or a second refusal, so an administrator may clear the clone before or after its first
request. Any other receipt of another VM (an older one of S, one of S issued after T, one
of a third VM, a second one, one after the clone already spoke before the report arrived)
is still ``clone_detected``. Flag mode is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.api.refuse_mode import clear, consume, event, vm_row
from tests.conftest import Api, FakeClock, uid


async def cloned(api: Api, clone: str, source: str, **fields: Any) -> None:
    """Reports ``clone`` a clone of ``source`` (occurred now unless ``fields`` say otherwise)."""
    await event(api, clone, "vm.cloned", source_vm_id=source, **fields)


async def clone_alerts(api: Api) -> int:
    async with api.runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM alerts WHERE kind = 'clone_detected'"))


async def receipt_windows(api: Api) -> int:
    async with api.runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM rollback_windows WHERE cause = 'receipt_clone'"))


async def source_guest(api: Api) -> tuple[str, list[str], float]:
    """A source guest that presented receipts s0, s1 (its state at T), then s2 and s3 after T.
    Returns the VM, [s0, s1, s2, s3] and T."""
    source = uid("gold")
    receipts = [(await consume(api, source))["receipt"]]
    api.clock.advance(5)
    receipts.append((await consume(api, source, receipts[-1]))["receipt"])
    api.clock.advance(5)
    taken = api.clock.now
    for _ in range(2):
        api.clock.advance(5)
        answer = await consume(api, source, receipts[-1])
        assert (answer["decision"], answer["flags"]) == ("accept", []), answer
        receipts.append(answer["receipt"])
    api.clock.advance(5)
    return source, receipts, taken


async def reported_clone(api: Api) -> tuple[str, list[str]]:
    """``source_guest``, cloned at T into a new VM (reported). Returns the clone and S's receipts."""
    source, receipts, taken = await source_guest(api)
    clone = uid("clone")
    await cloned(api, clone, source, snapshot_created_at=taken)
    return clone, receipts


async def test_a_clone_cleared_before_its_first_request_is_served(api_factory: Callable[..., Any]) -> None:
    """Clone reported, refused, cleared; its first request presents the receipt its source
    held at T: accepted, no flag, no clone alert or receipt window, the clone not refusing,
    the entry naming the event; its next request with its own receipt is accepted too."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    clone, receipts = await reported_clone(api)
    assert (await clear(api, clone))["refusing_reason"] == "vm.cloned"
    api.clock.advance(5)
    first = await consume(api, clone, receipts[1])
    assert (first["decision"], first["reason"], first["flags"]) == ("accept", "ok", []), first
    assert (await vm_row(api, clone))["refusing"] is False
    assert (await clone_alerts(api), await receipt_windows(api)) == (0, 0)
    async with api.runtime.pool.acquire() as conn:
        payload = await conn.fetchval("SELECT payload FROM ledger WHERE seq = $1", first["seq"])
    assert "receipt_explained_by" in payload, payload
    api.clock.advance(5)
    after = await consume(api, clone, first["receipt"])
    assert (after["decision"], after["flags"]) == ("accept", []), after


async def test_a_callout_on_the_source_before_the_clones_state_does_not_hide_the_guests_receipt(
    api_factory: Callable[..., Any],
) -> None:
    """A request of S that keeps no receipt (a RADIUS callout) between the guest's last
    request and T was issued a receipt the guest never stored: the clone presents the
    guest's (s1), which is explained; the callout's receipt would be too, not s0."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    source = uid("gold")
    receipts = [(await consume(api, source))["receipt"]]
    api.clock.advance(5)
    receipts.append((await consume(api, source, receipts[-1]))["receipt"])
    api.clock.advance(5)
    callout = (await consume(api, source))["receipt"]
    api.clock.advance(5)
    taken = api.clock.now
    api.clock.advance(5)
    clones = [uid("clone") for _ in range(3)]
    for clone in clones:
        await cloned(api, clone, source, snapshot_created_at=taken)
        await clear(api, clone)
    api.clock.advance(5)
    answers = [await consume(api, clone, held) for clone, held in zip(clones, [receipts[1], callout, receipts[0]],
                                                                       strict=True)]
    assert [(a["decision"], a["flags"]) for a in answers] == [
        ("accept", []), ("accept", []), ("reject", ["clone_detected"])], answers


async def test_the_clones_first_request_before_the_clear_raises_no_second_refusal(
    api_factory: Callable[..., Any],
) -> None:
    """The clone speaks before the clear, with the receipt the report explains: refused
    (still refusing because of the event) but not flagged, its refusing_reason still the
    event's; after the clear, the receipt that answer carried is accepted."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    clone, receipts = await reported_clone(api)
    api.clock.advance(5)
    first = await consume(api, clone, receipts[1])
    assert (first["reason"], first["flags"]) == ("locked_out", []), first
    assert (await vm_row(api, clone))["refusing_reason"] == "vm.cloned"
    await clear(api, clone)
    api.clock.advance(5)
    after = await consume(api, clone, first["receipt"])
    assert (after["decision"], after["flags"]) == ("accept", []), after
    assert await clone_alerts(api) == 0


async def test_the_sources_receipt_a_second_time_is_still_clone_detected(api_factory: Callable[..., Any]) -> None:
    """After the clone started its own line with S's receipt, S's receipt again (a second,
    unreported clone of the same state, or the disk copied back) is clone_detected and
    refuses the clone: the report explains one receipt, once."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    clone, receipts = await reported_clone(api)
    await clear(api, clone)
    api.clock.advance(5)
    assert (await consume(api, clone, receipts[1]))["decision"] == "accept"
    api.clock.advance(5)
    again = await consume(api, clone, receipts[1])
    assert (again["reason"], again["flags"]) == ("locked_out", ["clone_detected"]), again
    assert await vm_row(api, clone) == {"refusing": True, "refusing_reason": "clone_detected"}


async def test_a_receipt_of_the_source_older_than_the_clones_state_is_still_clone_detected(
    api_factory: Callable[..., Any],
) -> None:
    """The clone presents a receipt S had before the one it held at T: the clone's disk is
    older than reported (S's uses in between are in no window), so it is clone_detected."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    clone, receipts = await reported_clone(api)
    await clear(api, clone)
    api.clock.advance(5)
    older = await consume(api, clone, receipts[0])
    assert (older["reason"], older["flags"]) == ("locked_out", ["clone_detected"]), older
    assert await receipt_windows(api) == 1


async def test_a_receipt_of_the_source_issued_after_the_clones_state_is_still_clone_detected(
    api_factory: Callable[..., Any],
) -> None:
    """The clone presents a receipt S was issued after T: the clone's disk is not the state
    the report names, so it is clone_detected."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    clone, receipts = await reported_clone(api)
    await clear(api, clone)
    for later in receipts[2:]:
        api.clock.advance(5)
        answer = await consume(api, clone, later)
        assert (answer["reason"], answer["flags"]) == ("locked_out", ["clone_detected"]), answer


async def test_a_receipt_of_another_vm_is_still_clone_detected(api_factory: Callable[..., Any]) -> None:
    """A clone of unknown state time may hold any receipt its source was issued, but not
    one of a third VM (issued in the same span): that is clone_detected."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    source = uid("gold")
    other = uid("other")
    await consume(api, source)
    api.clock.advance(5)
    foreign = (await consume(api, other))["receipt"]
    api.clock.advance(5)
    await consume(api, source)
    api.clock.advance(5)
    clone = uid("clone")
    await cloned(api, clone, source)
    await clear(api, clone)
    api.clock.advance(5)
    answer = await consume(api, clone, foreign)
    assert (answer["reason"], answer["flags"]) == ("locked_out", ["clone_detected"]), answer


async def test_a_clone_of_unknown_state_time_explains_any_one_earlier_receipt_of_its_source(
    api_factory: Callable[..., Any],
) -> None:
    """A clone whose state time is unknown puts every earlier use of S at risk, so any one
    receipt S was issued before the clone is explained; one S was issued after the clone
    happened (the report came late) is not."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    source, receipts, _ = await source_guest(api)
    cloned_at = api.clock.now
    api.clock.advance(5)
    late = (await consume(api, source, receipts[-1]))["receipt"]
    api.clock.advance(5)
    clones = [uid("clone"), uid("clone")]
    for clone in clones:
        await cloned(api, clone, source, occurred_at=cloned_at)
        await clear(api, clone)
    api.clock.advance(5)
    first = await consume(api, clones[0], receipts[0])
    assert (first["decision"], first["flags"]) == ("accept", []), first
    api.clock.advance(5)
    after = await consume(api, clones[1], late)
    assert (after["reason"], after["flags"]) == ("locked_out", ["clone_detected"]), after


async def test_a_clone_reported_after_it_spoke_explains_nothing(api_factory: Callable[..., Any]) -> None:
    """The clone presented S's receipt (clone_detected) before the report arrived, whether
    or not the report says when the clone happened: the report explains no later receipt,
    so S's receipt presented again after the clear is clone_detected."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    source, receipts, taken = await source_guest(api)
    for occurred in (api.clock.now, None):
        clone = uid("clone")
        api.clock.advance(5)
        spoke = await consume(api, clone, receipts[1])
        assert spoke["flags"] == ["clone_detected"], spoke
        api.clock.advance(5)
        await cloned(api, clone, source, snapshot_created_at=taken, occurred_at=occurred)
        await clear(api, clone)
        api.clock.advance(5)
        again = await consume(api, clone, receipts[1])
        assert (again["reason"], again["flags"]) == ("locked_out", ["clone_detected"]), (occurred, again)


async def test_a_clone_reported_as_seen_after_it_spoke_explains_nothing(api_factory: Callable[..., Any]) -> None:
    """The report's occurred_at is when a relay saw the clone, after the clone presented S's
    receipt (clone_detected): the clone already spoke, so the report explains no later
    receipt of S, whatever time it gives."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    source, receipts, taken = await source_guest(api)
    for seen_after in (0, 5):
        clone = uid("clone")
        api.clock.advance(5)
        spoke = await consume(api, clone, receipts[1])
        assert spoke["flags"] == ["clone_detected"], spoke
        api.clock.advance(seen_after)
        await cloned(api, clone, source, snapshot_created_at=taken)
        await clear(api, clone)
        api.clock.advance(5)
        again = await consume(api, clone, receipts[1])
        assert (again["reason"], again["flags"]) == ("locked_out", ["clone_detected"]), (seen_after, again)


async def test_a_clone_taking_a_known_name_still_flags_that_vms_own_stale_receipt(
    api_factory: Callable[..., Any],
) -> None:
    """A clone reported under the name of a VM that had receipts of its own (issued after
    S's at T): that VM's stale receipt is no receipt the clone's disk holds, so it is
    rollback_detected, not explained."""
    api: Api = await api_factory(FakeClock(), receipt_reaction="refuse")
    source, _, taken = await source_guest(api)
    clone = uid("clone")
    own = [(await consume(api, clone))["receipt"]]
    for _ in range(2):
        api.clock.advance(5)
        own.append((await consume(api, clone, own[-1]))["receipt"])
    api.clock.advance(5)
    await cloned(api, clone, source, snapshot_created_at=taken)
    await clear(api, clone)
    api.clock.advance(5)
    stale = await consume(api, clone, own[1])
    assert (stale["reason"], stale["flags"]) == ("locked_out", ["rollback_detected"]), stale


async def test_flag_mode_still_flags_the_receipt_a_reported_clone_explains(api: Api) -> None:
    """With receipt_reaction=flag the clone's first request with S's receipt is
    clone_detected as before (and the clone keeps serving)."""
    clone, receipts = await reported_clone(api)
    api.clock.advance(5)
    first = await consume(api, clone, receipts[1])
    assert (first["decision"], first["flags"]) == ("accept", ["clone_detected"]), first
