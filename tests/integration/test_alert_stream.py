"""The live alert stream (SSE) and the alert feed: the opening position and resume (also by
``alerts follow``), a revoked token's stream, fan-out across two instances over one database,
heartbeats, the subscriber cap, stalled consumers, the sinks' copy, and the stream and the
sinks' record ids after the database went back in time (also when it numbered as many
changes as it lost before the feed read again)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from replayguard.errors import Unavailable
from replayguard.http import analysts
from replayguard.http.state import ANALYSTS
from replayguard.services import alertfeed, alertfeed_streams
from replayguard.settings import Secret
from tests.api.test_alert_log import alert_lines
from tests.api.test_analysts import reuse_alert
from tests.conftest import REPO, Api, cli_env, uid
from tests.integration.db_restore import refusing_sessions, restore, scratch_dbs, settled, snapshot
from tests.integration.tcp_proxy import proxied
from tests.waiting import until

__all__ = ["scratch_dbs"]  # a fixture


def change_of(event_id: str) -> int:
    """The change number an event id of the stream names (``<change>.<alert>.<digests>``, or ``0``)."""
    return int(event_id.partition(".")[0])


async def open_stream(api: Api, last_event_id: int | str | None = None) -> aiohttp.ClientResponse:
    headers = api.auth("analyst")
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    resp = await api.client.get("/v1/alerts/stream", headers=headers)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    return resp


async def events_until(resp: aiohttp.ClientResponse, vm_id: str,
                       timeout: float = 20) -> list[tuple[str, dict[str, Any]]]:
    """Every alert event read, with its id, up to and including the first about ``vm_id`` (the
    test may have raised others before); the timeout bounds a failure."""
    seen: list[tuple[str, dict[str, Any]]] = []

    async def read() -> None:
        event_id = ""
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("id: "):
                event_id = line[4:].rstrip("\n")
            elif line.startswith("data: "):
                seen.append((event_id, orjson.loads(line[6:])))
                if seen[-1][1]["vm_id"] == vm_id:
                    return

    await asyncio.wait_for(read(), timeout)
    return seen


async def next_alert(resp: aiohttp.ClientResponse, vm_id: str, timeout: float = 20) -> tuple[str, dict[str, Any]]:
    """The next event about ``vm_id``; the timeout bounds a failure."""
    return (await events_until(resp, vm_id, timeout))[-1]


async def opening_id(resp: aiohttp.ClientResponse, timeout: float = 20) -> str:
    """The first ``id:`` the stream sends, as sent; the timeout bounds a failure."""
    async def read() -> str:
        while not (line := (await resp.content.readline()).decode()).startswith("id: "):
            assert line, "the stream ended"
        return line[4:].rstrip("\n")

    return await asyncio.wait_for(read(), timeout)


async def first_id(resp: aiohttp.ClientResponse, timeout: float = 20) -> int:
    """The change number of the first ``id:`` the stream sends; the timeout bounds a failure."""
    return change_of(await opening_id(resp, timeout))


def drop_streams_and_refuse_new(feed: alertfeed.AlertFeed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ends every open stream (a restart, a proxy timeout) and refuses new ones with 503 until
    ``monkeypatch.undo()``."""
    def refuse() -> Any:
        raise Unavailable("too many alert stream subscribers; try again later")

    monkeypatch.setattr(feed.streams, "subscribe", refuse)
    feed.streams.close()


async def test_a_raised_alert_appears_on_the_stream(api: Api) -> None:
    """An alert raised by a decision is pushed to an open stream."""
    resp = await open_stream(api)
    vm_id = uid("vm")
    alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
    event_id, alert = await next_alert(resp, vm_id)
    assert alert["id"] == alert_id and alert["kind"] == "reuse" and change_of(event_id) == alert["change"]
    resp.close()


async def test_last_event_id_resumes_with_what_was_missed(api: Api) -> None:
    """A client that reconnects with Last-Event-ID gets the changes made while it was away."""
    resp = await open_stream(api)
    vm_id, scope = uid("vm"), uid("scope")
    first, _ = await reuse_alert(api, vm_id, scope)
    event_id, _ = await next_alert(resp, vm_id)
    resp.close()
    second, _ = await reuse_alert(api, vm_id, scope)
    assert (await api.post(f"/v1/alerts/{first}/acknowledge", {"note": "seen"}, role="analyst"))[0] == 200
    resumed = await open_stream(api, last_event_id=event_id)
    _, missed = await next_alert(resumed, vm_id)
    _, acked = await next_alert(resumed, vm_id)
    assert [missed["id"], acked["id"]] == [second, first] and acked["status"] == "acknowledged"
    resumed.close()
    bad = await api.client.get("/v1/alerts/stream", headers={**api.auth("analyst"), "Last-Event-ID": "x1"})
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "Last-Event-ID"


async def test_a_resumed_stream_never_resends_changes_at_or_before_last_event_id(
        api_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream resumed with Last-Event-ID N on an instance whose feed lags (two instances, one
    database) sends only changes after N, never again the change N the client already has."""
    one: Api = await api_factory()
    other: Api = await api_factory()
    feed = other.client.app[ANALYSTS].feed
    held, gate = hold(feed, monkeypatch)  # the feed busy (leader duties, a reconnect...)
    await until(held.is_set, "the other instance's feed to be held back")

    alert_id, _ = await reuse_alert(one, uid("vm"), uid("scope"))
    _, alert = await one.get(f"/v1/alerts/{alert_id}")
    seen_change = alert["change"]  # the client saw this change on `one`'s stream

    resp = await open_stream(other, last_event_id=seen_change)
    await until(lambda: len(feed.streams.open) == 1, "the resumed stream to subscribe")
    gate.set()  # the feed catches up with what was committed while it lagged

    sentinel = uid("vm")
    await reuse_alert(one, sentinel, uid("scope"))
    events = await events_until(resp, sentinel)
    resp.close()
    old = [(event_id, data["id"]) for event_id, data in events if change_of(event_id) <= seen_change]
    assert old == [], f"events at or before Last-Event-ID {seen_change} were sent again: {old}"


async def frames_until(resp: aiohttp.ClientResponse, vm_id: str,
                       timeout: float = 20) -> list[tuple[str | None, dict[str, Any] | None]]:
    """Every frame read with an id or data, as (id, alert), up to and including the first
    alert about ``vm_id``: id-only frames too; the timeout bounds a failure."""
    frames: list[tuple[str | None, dict[str, Any] | None]] = []

    async def read() -> None:
        event_id: str | None = None
        data: dict[str, Any] | None = None
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line == "\n":
                if event_id is not None or data is not None:
                    frames.append((event_id, data))
                    if data is not None and data["vm_id"] == vm_id:
                        return
                event_id, data = None, None
            elif line.startswith("id: "):
                event_id = line[4:].rstrip("\n")
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])

    await asyncio.wait_for(read(), timeout)
    return frames


async def replay_nonce(api: Api, vm_id: str, scope: str, nonce: str) -> dict[str, Any]:
    """Presents a consumed nonce once more: its ``reuse`` alert counts up (a change of it)."""
    status, again = await api.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
    assert status == 200 and again["reason"] == "reused", again
    return dict(again)


async def test_a_resume_from_a_change_whose_alert_changed_again_goes_on_after_it(api: Api) -> None:
    """The client's last change is no longer in the database as it got it: its ``reuse``
    alert counted up since (the nonce was replayed again, as it is all along during an
    attack), and nothing went back. The resumed stream goes on after the client's change:
    the alert's newer change and what followed, no ``0`` frame, no older alert again."""
    older, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    resp = await open_stream(api)
    vm_id, scope = uid("vm"), uid("scope")
    try:
        changed, nonce = await reuse_alert(api, vm_id, scope)
        last_id, _ = await next_alert(resp, vm_id)
    finally:
        resp.close()
    assert (await replay_nonce(api, vm_id, scope, nonce))["alert_id"] == changed
    sentinel = uid("vm")
    raised, _ = await reuse_alert(api, sentinel, uid("scope"))
    resumed = await open_stream(api, last_event_id=last_id)
    try:
        frames = await frames_until(resumed, sentinel)
    finally:
        resumed.close()
    assert "0" not in [event_id for event_id, _ in frames], f"the resume went back to the start: {frames[:3]}"
    alerts = [(event_id, alert) for event_id, alert in frames if alert is not None]
    assert older not in {alert["id"] for _, alert in alerts}
    assert [(alert["id"], alert["count"]) for _, alert in alerts][-2:] == [(changed, 2), (raised, 1)]
    assert all(change_of(str(event_id)) > change_of(last_id) for event_id, _ in alerts)


async def test_a_resume_from_a_position_whose_alert_changed_again_goes_on_after_it(api: Api) -> None:
    """The same from a stream's opening position (an id-only frame naming the alert at the
    newest change), that alert acknowledged since: the resumed stream sends the
    acknowledgement and what followed, nothing from before."""
    older, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    newest, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    resp = await open_stream(api)
    try:
        position = await opening_id(resp)
    finally:
        resp.close()
    assert change_of(position) == (await api.get(f"/v1/alerts/{newest}"))[1]["change"]  # names the newest alert
    assert (await api.post(f"/v1/alerts/{newest}/acknowledge", {"note": "seen"}, role="analyst"))[0] == 200
    sentinel = uid("vm")
    await reuse_alert(api, sentinel, uid("scope"))
    resumed = await open_stream(api, last_event_id=position)
    try:
        frames = await frames_until(resumed, sentinel)
    finally:
        resumed.close()
    assert "0" not in [event_id for event_id, _ in frames]
    sent = [alert for _, alert in frames if alert is not None]
    assert older not in {alert["id"] for alert in sent}
    assert (sent[0]["id"], sent[0]["status"]) == (newest, "acknowledged")


async def test_a_bare_change_number_is_taken_as_it_is(api: Api) -> None:
    """A Last-Event-ID that is a change number alone (a client from before the ids carried a
    digest) resumes after that number, as it always did: the changes after it, none at or
    below it, though the alert at that number changed again since."""
    resp = await open_stream(api)
    vm_id = uid("vm")
    try:
        changed, _ = await reuse_alert(api, vm_id, uid("scope"))
        last_id, _ = await next_alert(resp, vm_id)
    finally:
        resp.close()
    assert (await api.post(f"/v1/alerts/{changed}/acknowledge", {"note": "seen"}, role="analyst"))[0] == 200
    sentinel = uid("vm")
    await reuse_alert(api, sentinel, uid("scope"))
    resumed = await open_stream(api, last_event_id=str(change_of(last_id)))
    try:
        events = await events_until(resumed, sentinel)  # raised before the resume: caught up
        position = change_of(await opening_id(resumed))  # the id-only frame after the catch-up
    finally:
        resumed.close()
    assert [alert["id"] for _, alert in events][-2:] == [changed, events[-1][1]["id"]]
    assert all(change_of(event_id) > change_of(last_id) for event_id, _ in events)
    assert position == change_of(events[-1][0])


_C, _R = "0123456789abcdef", "fedcba9876543210"


@pytest.mark.parametrize("raw", ["x1", "12.", f".7.{_C}.{_R}", f"12.7.{_C.upper()}.{_R}", f"12.7.{_C[:-1]}.{_R}",
                                 f"12.7.{_C}.{_R}0", f"12.{_C}", f"12.7.{_C}", f"12.x.{_C}.{_R}",
                                 f"12.{'9' * 19}.{_C}.{_R}", "-1", "1" * 19, f"12.7.{_C}.{_R}.1", "12,5"])
async def test_a_malformed_last_event_id_is_refused_with_400(api: Api, raw: str) -> None:
    """A Last-Event-ID that is not an id the stream sends (a bare change number, or a change
    number, an alert id and two digests of 16 lowercase hex digits) is refused with 400 and
    the contract's error body naming the field, never a 500 (an alert id past a bigint
    among them), whether in the header or in ``last_event_id``."""
    for where in ("header", "query"):
        headers = {**api.auth("analyst"), **({"Last-Event-ID": raw} if where == "header" else {})}
        params = {"last_event_id": raw} if where == "query" else {}
        resp = await api.client.get("/v1/alerts/stream", headers=headers, params=params)
        body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "invalid_request", (where, body)
        assert body["error"]["field"] == "Last-Event-ID"


async def test_an_id_of_the_digest_form_is_accepted_in_the_query_too(api: Api) -> None:
    """``last_event_id`` (for clients that cannot set the header) takes the same ids: a stream
    resumed from its own opening id carries on after it."""
    await reuse_alert(api, uid("vm"), uid("scope"))
    resp = await open_stream(api)
    try:
        position = await opening_id(resp)
    finally:
        resp.close()
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9a-f]{16}\.[0-9a-f]{16}", position), position
    vm_id = uid("vm")
    raised, _ = await reuse_alert(api, vm_id, uid("scope"))
    resumed = await api.client.get("/v1/alerts/stream", headers=api.auth("analyst"),
                                   params={"last_event_id": position})
    assert resumed.status == 200
    try:
        events = await events_until(resumed, vm_id)
    finally:
        resumed.close()
    assert [alert["id"] for _, alert in events] == [raised]


async def test_a_stream_opens_with_its_position_and_resumes_from_it(api: Api) -> None:
    """A new stream's first id, sent before any alert, is the current change number, and a client
    that drops before any alert and resumes from it gets the alerts raised meanwhile."""
    earlier, _ = await reuse_alert(api, uid("vm"), uid("scope"))
    _, alert = await api.get(f"/v1/alerts/{earlier}")
    resp = await open_stream(api)
    position = await opening_id(resp)
    resp.close()
    assert change_of(position) == alert["change"]
    vm_id = uid("vm")
    missed, _ = await reuse_alert(api, vm_id, uid("scope"))
    resumed = await open_stream(api, last_event_id=position)
    _, data = await next_alert(resumed, vm_id)
    resumed.close()
    assert data["id"] == missed


async def test_alerts_follow_resumes_from_the_streams_opening_position(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replayguard alerts follow`, whose stream dropped before any alert, prints the alert raised
    while it was reconnecting."""
    feed = api.client.app[ANALYSTS].feed
    env = cli_env(REPLAYGUARD_URL=str(api.client.make_url("/")).rstrip("/"), REPLAYGUARD_TOKEN=api.tokens["analyst"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replayguard", "alerts", "follow", "--json", "--count", "1", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await until(lambda: len(feed.streams.open) == 1, "the CLI to subscribe", timeout=30)
        drop_streams_and_refuse_new(feed, monkeypatch)
        vm_id = uid("vm")
        alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
        monkeypatch.undo()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    alert = json.loads(out.splitlines()[0])
    assert (alert["id"], alert["vm_id"]) == (alert_id, vm_id)


async def test_an_open_stream_of_a_revoked_token_stops_carrying_alerts(api: Api) -> None:
    """Once an analyst token is revoked, a stream it opened earlier ends instead of carrying the
    alerts raised after the revocation."""
    token_id, token = await api.runtime.api_tokens.create("analyst", uid("leaving-analyst"))
    resp = await api.client.get("/v1/alerts/stream", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert await api.runtime.api_tokens.revoke(token_id) == 1
    later = await api.client.get("/v1/alerts", headers={"Authorization": f"Bearer {token}"})
    assert later.status == 401  # the service knows the token is revoked

    vm_id = uid("vm")
    await reuse_alert(api, vm_id, uid("scope"))
    leaked: list[str] = []

    async def read() -> None:  # to the stream's end, or the alert
        while line := (await resp.content.readline()).decode():
            if line.startswith("data: ") and orjson.loads(line[6:])["vm_id"] == vm_id:
                leaked.append(line)
                return

    await asyncio.wait_for(read(), 20)
    resp.close()
    assert leaked == [], "an alert raised after the revocation reached the revoked token's stream"


async def test_an_idle_stream_of_a_revoked_token_ends_at_its_next_heartbeat(api_factory: Callable[..., Any]) -> None:
    """A stream that carries no alert ends at the first heartbeat after its token is revoked."""
    api: Api = await api_factory(sse_heartbeat_s=1)
    token_id, token = await api.runtime.api_tokens.create("analyst", uid("leaving-analyst"))
    resp = await api.client.get("/v1/alerts/stream", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    await api.runtime.api_tokens.revoke(token_id)

    async def ended() -> None:
        while await resp.content.readline():
            pass

    await asyncio.wait_for(ended(), 20)
    resp.close()


async def test_a_change_made_once_the_client_has_the_headers_is_sent(
        api_factory: Callable[..., Any], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's position is read before its headers go: an alert the client raises as
    soon as it has them is sent, even when the position's read is slow (here it waits up
    to a second for the client, which raises its alert on the headers)."""
    api: Api = await api_factory(database_url=Secret(database_url))
    alerts = api.client.app[ANALYSTS].alerts
    real_held_at, raised = alerts.held_at, asyncio.Event()

    async def slow_held_at(upto: int | None) -> Any:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(raised.wait(), 1)
        return await real_held_at(upto)

    monkeypatch.setattr(alerts, "held_at", slow_held_at)
    resp = await open_stream(api)
    try:
        vm_id = uid("vm")
        alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
        raised.set()
        _, alert = await next_alert(resp, vm_id)
    finally:
        resp.close()
    assert alert["id"] == alert_id


async def test_a_new_stream_while_the_database_cannot_be_reached_is_refused_with_503(
        api_factory: Callable[..., Any], database_url: str) -> None:
    """No stream opens on a position it could not read: 503 ``unavailable``, the client tries
    again, instead of an open stream that ends."""
    api: Api = await api_factory(database_url=Secret(database_url))
    (await open_stream(api)).close()
    async with refusing_sessions(database_url):
        resp = await api.client.get("/v1/alerts/stream", headers=api.auth("analyst"))
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    resp.close()


def _outage_at_the_streams_next_token_check(
        api: Api, database_url: str, monkeypatch: pytest.MonkeyPatch,
        reopen: asyncio.Event) -> tuple[asyncio.Event, list[asyncio.Task[None]], list[int]]:
    """The database stops taking sessions as the stream checks its token before its next
    alert, until ``reopen`` is set; the token's cached answer is dropped, so the check must
    read the database. Returns the event set once the outage began, the outage's task
    (awaited after ``reopen``) and the checks of the stream's token made during it."""
    tokens, began = api.runtime.api_tokens, asyncio.Event()
    real, stream_token = tokens.authenticate, api.tokens["analyst"]
    outages: list[asyncio.Task[None]] = []
    tries: list[int] = []

    async def outage() -> None:
        async with refusing_sessions(database_url):
            began.set()
            await reopen.wait()

    async def checked(token: str) -> Any:
        if token == stream_token and not began.is_set():
            outages.append(asyncio.create_task(outage()))
            await began.wait()
            tokens._cache.clear()
        if token == stream_token and not reopen.is_set():
            tries.append(1)
        return await real(token)

    monkeypatch.setattr(tokens, "authenticate", checked)
    return began, outages, tries


async def test_an_open_stream_rides_out_a_database_that_cannot_be_reached_for_a_moment(
        api_factory: Callable[..., Any], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database goes away as the stream checks its token before an alert (a restart, a
    restore): the stream sends nothing meanwhile, tries the check again, and sends the
    alert once the database answers, instead of ending."""
    api: Api = await api_factory(database_url=Secret(database_url))
    resp = await open_stream(api)
    reopen = asyncio.Event()
    outages: list[asyncio.Task[None]] = []
    try:
        await first_id(resp)
        began, outages, tries = _outage_at_the_streams_next_token_check(api, database_url, monkeypatch, reopen)
        vm_id = uid("vm")
        alert_id, _ = await reuse_alert(api, vm_id, uid("scope"))
        await until(began.is_set, "the outage to begin")
        await until(lambda: len(tries) >= 3, "the stream to try its check again while the database is away")
        reopen.set()
        _, alert = await next_alert(resp, vm_id)
    finally:
        reopen.set()
        await asyncio.gather(*outages)
        resp.close()
    assert alert["id"] == alert_id


async def test_an_open_stream_ends_without_the_alert_when_the_database_stays_away(
        api_factory: Callable[..., Any], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same outage lasting past the heartbeat interval: the stream ends without sending
    the alert (its token could not be checked), and its client resumes with Last-Event-ID."""
    api: Api = await api_factory(database_url=Secret(database_url), sse_heartbeat_s=1)
    resp = await open_stream(api)
    reopen = asyncio.Event()
    outages: list[asyncio.Task[None]] = []
    lines = []
    try:
        await first_id(resp)
        _, outages, _ = _outage_at_the_streams_next_token_check(api, database_url, monkeypatch, reopen)
        await reuse_alert(api, uid("vm"), uid("scope"))

        async def ended() -> None:
            while line := await resp.content.readline():
                lines.append(line)

        await asyncio.wait_for(ended(), 20)
    finally:
        reopen.set()
        await asyncio.gather(*outages)
        resp.close()
    assert not [line for line in lines if line.startswith(b"data: ")]


async def test_an_alert_raised_on_one_instance_reaches_the_other(api_factory: Callable[..., Any]) -> None:
    """Two instances on one database: the stream of one carries alerts raised through the other."""
    one, other = await api_factory(), await api_factory()
    resp = await open_stream(other)
    vm_id = uid("vm")
    alert_id, _ = await reuse_alert(one, vm_id, uid("scope"))
    _, alert = await next_alert(resp, vm_id)
    assert alert["id"] == alert_id
    resp.close()


async def test_heartbeats_keep_an_idle_stream_alive(api_factory: Callable[..., Any]) -> None:
    """An idle stream receives SSE comment lines at the heartbeat interval."""
    api = await api_factory(sse_heartbeat_s=1)
    resp = await open_stream(api)

    async def heartbeat() -> None:
        while (await resp.content.readline()) != b": heartbeat\n":
            pass

    await asyncio.wait_for(heartbeat(), 20)
    resp.close()


async def test_subscribers_beyond_the_cap_get_503(api_factory: Callable[..., Any]) -> None:
    """With max_sse_subscribers=1 a second stream is refused with 503 unavailable."""
    api = await api_factory(max_sse_subscribers=1)
    first = await open_stream(api)
    second = await api.client.get("/v1/alerts/stream", headers=api.auth("analyst"))
    assert second.status == 503 and (await second.json())["error"]["code"] == "unavailable"
    first.close()


async def test_a_stream_whose_client_left_gives_up_its_place_when_the_client_leaves(
        api_factory: Callable[..., Any]) -> None:
    """A stream whose client closed the connection ends on the server then (the service as
    ``serve`` runs it), not at its next heartbeat or alert: with one stream allowed and
    heartbeats an hour apart, the stream an analyst opens after leaving the first (a page
    reloaded) is served, not refused 503 for the hour."""
    api = await api_factory(max_sse_subscribers=1, sse_heartbeat_s=3600)
    feed = api.client.app[ANALYSTS].feed
    first = await open_stream(api)
    await first_id(first)  # under way: subscribed, waiting for a change
    first.close()  # the client closes the connection
    await until(lambda: not feed.streams.open, "the left stream to unsubscribe")
    second = await open_stream(api)
    await first_id(second)
    second.close()


async def test_a_stream_whose_client_left_is_logged_and_counted_as_499(api_factory: Callable[..., Any]) -> None:
    """A stream that ends because its client closed the connection (the service as
    ``serve`` runs it) writes its access line and counts in the request metrics, with
    status 499 (nginx's "client closed request"), like every other request."""
    api = await api_factory(sse_heartbeat_s=3600)
    key = ("/v1/alerts/stream", "GET", 499)
    with capture_logs() as logs:
        stream = await open_stream(api)
        await first_id(stream)
        stream.close()
        await until(lambda: api.runtime.metrics.counts.requests.get(key) == 1, "the left stream to be counted")
    lines = [e for e in logs if e["event"] == "request" and e["status"] == 499]
    assert [(e["method"], e["log_level"]) for e in lines] == [("GET", "info")], logs
    assert lines[0]["duration_ms"] > 0


async def test_a_stalled_subscriber_is_held_to_its_queue_and_neither_decisions_nor_the_feed_wait_for_it(
    api: Api, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a subscriber that never takes from its queue, 40 alert-raising decisions all answer
    (each with its own alert), its queue holds at most its size, what overflowed replaced by
    one catch-up item (its stream would read those changes from the database), and a stream
    opened afterwards still receives the next alert: the feed is not wedged behind it."""
    usual = alertfeed_streams.QUEUE_SIZE
    monkeypatch.setattr(alertfeed_streams, "QUEUE_SIZE", 4)
    feed = api.client.app[ANALYSTS].feed
    # Stalled at the feed: a stream whose client stops reading still takes from its queue
    # until the socket's buffers fill, which 40 alerts do not.
    sub = feed.streams.subscribe()
    try:
        vm_id, scope = uid("vm"), uid("scope")
        results = await asyncio.wait_for(asyncio.gather(*[reuse_alert(api, vm_id, scope) for _ in range(40)]), 60)
        assert len({alert_id for alert_id, _ in results}) == 40
        last = max(int(alert_id) for alert_id, _ in results)
        _, newest = await api.get(f"/v1/alerts/{last}")
        await until(lambda: (feed._pos or 0) >= newest["change"], "the feed to read every alert")
        held = list(sub.queue._queue)  # type: ignore[attr-defined]  # asyncio.Queue's deque: not in its stubs
        assert len(held) <= 4 and any(alert is alertfeed_streams.CATCH_UP for _, alert in held), held
        assert sub in feed.streams.open and not sub.dropped
    finally:
        feed.streams.unsubscribe(sub)
    monkeypatch.setattr(alertfeed_streams, "QUEUE_SIZE", usual)
    reader = await open_stream(api)
    later_vm = uid("vm")
    later_id, _ = await reuse_alert(api, later_vm, uid("scope"))
    _, data = await next_alert(reader, later_vm)
    assert str(data["id"]) == str(later_id)
    reader.close()


async def test_a_stream_whose_queue_overflows_reads_what_it_missed_from_the_database_and_stays_open(
        api_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream busy sending (its client reads slowly, or its server is starved) while more
    alerts are raised than its queue holds: it is not ended; it sends what it had, reads the
    changes its queue dropped from the database, and goes on live: every alert arrives once,
    in change order, and the next one too."""
    monkeypatch.setattr(alertfeed_streams, "QUEUE_SIZE", 4)
    api: Api = await api_factory()
    feed = api.client.app[ANALYSTS].feed
    resp = await open_stream(api)
    try:
        await first_id(resp)
        gate, sending = asyncio.Event(), asyncio.Event()
        real_send = analysts._send

        async def slow_client(stream: Any, data: bytes) -> None:
            if b"\nevent: alert\n" in data:
                sending.set()
                await gate.wait()
            await real_send(stream, data)

        monkeypatch.setattr(analysts, "_send", slow_client)
        (sub,) = feed.streams.open
        vm_ids = [uid("vm") for _ in range(12)]
        await reuse_alert(api, vm_ids[0], uid("scope"))
        await until(sending.is_set, "the stream to be sending the first alert")
        for vm_id in vm_ids[1:]:
            await reuse_alert(api, vm_id, uid("scope"))
        _, newest = await api.get("/v1/alerts?limit=1")
        await until(lambda: (feed._pos or 0) >= newest["items"][0]["change"], "the feed to read every alert")
        assert any(alert is alertfeed_streams.CATCH_UP for _, alert in list(sub.queue._queue))  # type: ignore[attr-defined]
        gate.set()
        events = await events_until(resp, vm_ids[-1])
        later = uid("vm")
        await reuse_alert(api, later, uid("scope"))
        after = await events_until(resp, later)
    finally:
        resp.close()
    assert [data["vm_id"] for _, data in events] == vm_ids
    assert [data["vm_id"] for _, data in after] == [later]
    changes = [change_of(event_id) for event_id, _ in events + after]
    assert changes == sorted(set(changes))


class _PacedConnection:
    """The feed's connection, whose reads of the alert changes each wait until ``sub``'s queue
    is empty: a client that takes what one read gave before the next read."""

    def __init__(self, conn: Any, sub: alertfeed_streams.Subscriber) -> None:
        self._conn, self._sub = conn, sub

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, query: str, *args: Any) -> Any:
        if query == alertfeed._TAIL:
            await until(self._sub.queue.empty, "the stream to take what the feed read last")
        return await self._conn.fetch(query, *args)


async def test_a_burst_of_more_changes_than_a_streams_queue_does_not_drop_a_stream_that_keeps_up(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """More alerts than a stream's queue holds, raised while the feed is held back (busy, under
    load), are read at most a queue's worth at a time: a stream whose client takes each read
    before the next gets every alert, in order, and stays open, rather than being dropped as
    a client that reads slowly."""
    monkeypatch.setattr(alertfeed_streams, "QUEUE_SIZE", 4)
    feed = api.client.app[ANALYSTS].feed
    resp = await open_stream(api)
    try:
        await first_id(resp)
        (sub,) = list(feed.streams.open)
        gate, held = asyncio.Event(), asyncio.Event()
        real_tail = feed._tail

        async def held_tail(conn: Any) -> None:
            held.set()
            await gate.wait()
            await real_tail(_PacedConnection(conn, sub))

        monkeypatch.setattr(feed, "_tail", held_tail)
        await until(held.is_set, "the feed to be held back")
        vm_ids = [uid("vm") for _ in range(10)]
        for vm_id in vm_ids:
            await reuse_alert(api, vm_id, uid("scope"))
        gate.set()
        events = await events_until(resp, vm_ids[-1])
    finally:
        resp.close()
    assert [data["vm_id"] for _, data in events] == vm_ids
    assert not sub.dropped


async def test_alerts_and_checkpoints_reach_the_sinks(fresh_database: Callable[[], Any],
                                                      api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Every new alert and every checkpoint is written to the configured file sink."""
    out = tmp_path / "siem" / "alerts.jsonl"
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), sinks=(f"file:{out}",), checkpoint_every=2)
    vm_id = uid("vm")
    alert_id, nonce = await reuse_alert(api, vm_id, uid("scope"))

    def records() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in out.read_bytes().splitlines()] if out.exists() else []

    async def both() -> None:
        while not ({"alert", "checkpoint"} <= {r["type"] for r in records()}):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(both(), 30)
    alert = next(r for r in records() if r["type"] == "alert")
    assert alert["alert_id"] == alert_id and alert["vm_id"] == vm_id and nonce not in out.read_text()
    assert re.fullmatch(rf"{alert_id}\.[0-9a-f]{{16}}", alert["alert_uid"]), alert["alert_uid"]
    assert re.fullmatch(rf"alert-{alert['alert_uid']}\.{alert['change']}\.[0-9a-f]{{16}}", alert["id"]), alert["id"]
    checkpoint = next(r for r in records() if r["type"] == "checkpoint")
    assert re.fullmatch(rf"checkpoint-{checkpoint['seq']}\.[0-9a-f]{{16}}", checkpoint["id"]), checkpoint["id"]
    _, listed = await api.get("/v1/ledger/checkpoints")
    assert checkpoint["signature"] in [c["signature"] for c in listed["items"]]
    assert secrets.compare_digest(checkpoint["key_id"], listed["key_id"])


async def _alert_of_kind(resp: aiohttp.ClientResponse, kind: str, timeout: float = 20) -> dict[str, Any]:
    """The next alert event of ``kind`` on the stream; the timeout bounds a failure."""
    async def read() -> dict[str, Any]:
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                alert = orjson.loads(line[6:])
                if alert["kind"] == kind:
                    return dict(alert)

    return await asyncio.wait_for(read(), timeout)


async def _listed(api: Api, kind: str) -> dict[str, Any] | None:
    status, page = await api.get(f"/v1/alerts?kind={kind}")
    return dict(page["items"][0]) if status == 200 and page["items"] else None


async def _went_back(api: Api, dsn: str, scratch: list[str],
                     before: Callable[[], Any] = lambda: True) -> int:
    """Raises an alert, copies the database, raises three more (changes the copy has not),
    waits for the feed to read them (and for ``before``), and puts the copy back in place (a
    restore from a backup, a failover to a standby that had not caught up). Returns the
    feed's position before the restore (the last change the database then had)."""
    feed = api.client.app[ANALYSTS].feed
    await reuse_alert(api, uid("vm"), uid("scope"))
    scratch.append(copy := await snapshot(dsn))
    for _ in range(3):
        await reuse_alert(api, uid("vm"), uid("scope"))
    _, latest = await api.get("/v1/alerts?limit=1")
    high = int(latest["items"][0]["change"])
    await until(lambda: feed._pos == high, "the feed to read every change")
    await until(before, "what the test waits for before the restore", timeout=30)
    await restore(dsn, copy, scratch)
    return high


async def ledger_rollback_noticed(api: Api) -> dict[str, Any]:
    """A decision on the restored database: refused, ledger_rollback; returns that alert as listed."""
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": secrets.token_hex(8)}
    status, answer = await settled(lambda: api.post("/v1/nonces/consume", body))
    assert status == 503 and answer["error"]["code"] == "ledger_rollback", answer
    return await until(lambda: _listed(api, "ledger_rollback"), "the ledger_rollback alert to be listed")


async def test_the_ledger_rollback_alert_reaches_a_stream_opened_after_the_database_went_back(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str) -> None:
    """After the database went back in time, its change counter numbers new alert changes at
    or below the position the feed had reached; the feed notices (the database's last change
    is below its position) and moves its position back, so a stream opened on the restored
    database gets the alerts raised since, the critical ``ledger_rollback`` alert first."""
    api: Api = await api_factory(database_url=Secret(database_url))
    high = await _went_back(api, database_url, scratch_dbs)
    await settled(lambda: api.get("/v1/alerts?limit=1"))
    resp = await open_stream(api)
    try:
        position = await first_id(resp)
        assert position < high  # the stream's position comes from the restored database
        listed = await ledger_rollback_noticed(api)
        alert = await _alert_of_kind(resp, "ledger_rollback")
    finally:
        resp.close()
    assert alert["id"] == listed["id"] and alert["change"] <= high


async def test_a_stream_past_a_database_that_went_back_goes_back_with_it_and_a_resume_starts_over(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str) -> None:
    """A stream opened before the database went back in time is past every change it now
    holds: the feed tells it where the database parts from what it sent (an ``id:`` line
    with that position), and it goes on from there, the ``ledger_rollback`` alert among
    what follows. A Last-Event-ID past the database's last change is stale, so a stream
    resumed with it replays every change the database holds, from the start."""
    api: Api = await api_factory(database_url=Secret(database_url))
    await reuse_alert(api, uid("vm"), uid("scope"))
    old = await open_stream(api)
    try:
        before = await first_id(old)
        high = await _went_back(api, database_url, scratch_dbs)
        assert before < high

        async def went_back() -> int:
            while True:
                line = (await old.content.readline()).decode()
                assert line, "the stream ended"
                # An id-only frame below what was sent: the stream's position went back.
                if line.startswith("id: ") and change_of(line[4:]) < high and await old.content.readline() == b"\n":
                    return change_of(line[4:])

        parted = await asyncio.wait_for(went_back(), 20)
        assert parted <= high - 3  # at most the last change the copy holds
        listed = await ledger_rollback_noticed(api)
        alert = await _alert_of_kind(old, "ledger_rollback")
    finally:
        old.close()
    assert alert["id"] == listed["id"] and alert["change"] > parted
    _, page = await api.get("/v1/alerts?limit=100")
    held = {alert["id"] for alert in page["items"]}  # the restored database's alerts
    assert listed["id"] in held and len(held) >= 2
    resumed = await open_stream(api, last_event_id=high)
    seen: set[str] = set()

    async def replayed() -> None:
        while not held <= seen:
            line = (await resumed.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                seen.add(orjson.loads(line[6:])["id"])

    try:
        await asyncio.wait_for(replayed(), 20)
    finally:
        resumed.close()


async def _alert_ids_until(resp: aiohttp.ClientResponse, last: str, timeout: float = 30) -> list[str]:
    """The ids of the alerts the stream sends, up to and including the alert ``last``; the
    timeout bounds a failure."""
    ids: list[str] = []

    async def read() -> None:
        while not ids or ids[-1] != last:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                ids.append(orjson.loads(line[6:])["id"])

    await asyncio.wait_for(read(), timeout)
    return ids


async def test_a_client_resumed_after_the_database_went_back_gets_the_changes_numbered_again(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str) -> None:
    """A client reads some alerts and disconnects; the database goes back to a copy without
    the last three, and numbers new changes (its ``ledger_rollback`` alert, alerts of the
    continuity checks) up past the change the client last got. Resumed with its
    Last-Event-ID, whose change the database now numbers for another alert, the stream
    does not go on after that number: the client gets every change the restored database
    numbered, those at or below its id among them, after an id-only frame ``0`` that tells it
    the stream went back."""
    api: Api = await api_factory(database_url=Secret(database_url))
    resp = await open_stream(api)
    try:
        await first_id(resp)
        await reuse_alert(api, uid("vm"), uid("scope"))
        scratch_dbs.append(copy := await snapshot(database_url))
        vm_ids = [uid("vm") for _ in range(3)]
        for vm_id in vm_ids:
            await reuse_alert(api, vm_id, uid("scope"))
        last_id, _ = await next_alert(resp, vm_ids[-1])
    finally:
        resp.close()
    high = change_of(last_id)
    await restore(database_url, copy, scratch_dbs)
    numbered = [(await ledger_rollback_noticed(api))["id"]]
    while True:  # alerts that write no ledger entry, as a witness or the tamper checks raise
        numbered.append(str(await _raise_unledgered(database_url, "witness_unreachable", uid("witness"))))
        _, latest = await api.get("/v1/alerts?limit=1")
        if latest["items"][0]["change"] > high:
            break
    _, below = await api.get(f"/v1/alerts/{numbered[0]}")
    assert below["change"] <= high  # numbered again, at or below the client's id
    resumed = await open_stream(api, last_event_id=last_id)
    try:
        went_back = await opening_id(resumed)
        sent = await _alert_ids_until(resumed, numbered[-1])
    finally:
        resumed.close()
    assert went_back == "0"  # the stream tells the client it goes back, before the replay
    assert set(numbered) <= set(sent), f"changes the client never got were skipped: {sorted(set(numbered) - set(sent))}"


async def test_a_client_whose_alerts_last_change_a_restore_lost_gets_the_changes_again(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str) -> None:
    """The client's last change is a ``reuse`` alert counting up; the database goes back to a
    copy that holds that alert at its change before (count 1), and numbers its own changes
    (its ``ledger_rollback`` alert, changed again and again) up past the client's id, none
    of them left at that id and none touching that alert. The database holds the client's
    alert at a change below the client's: it went back, not the alert on, so the resumed
    stream opens with ``0`` and replays from the start, that alert as the restored database
    holds it among what it sends."""
    api: Api = await api_factory(database_url=Secret(database_url))
    vm_id, scope = uid("vm"), uid("scope")
    resp = await open_stream(api)
    try:
        await first_id(resp)
        counted, nonce = await reuse_alert(api, vm_id, scope)
        await next_alert(resp, vm_id)
        scratch_dbs.append(copy := await snapshot(database_url))
        await replay_nonce(api, vm_id, scope, nonce)
        last_id, alert = await next_alert(resp, vm_id)
    finally:
        resp.close()
    assert alert["id"] == counted and alert["count"] == 2
    high = change_of(last_id)
    await restore(database_url, copy, scratch_dbs)
    rollback = (await ledger_rollback_noticed(api))["id"]
    conn = await asyncpg.connect(database_url)
    try:  # each update of an alert takes the next change number (rg_alert_changed)
        while True:
            at = await conn.fetchval("SELECT id FROM alerts WHERE change_seq = $1", high)
            if at is None and await conn.fetchval("SELECT max(change_seq) FROM alerts") > high:
                break
            await conn.execute("UPDATE alerts SET updated_us = updated_us WHERE id = $1",
                               int(rollback) if at is None else at)
    finally:
        await conn.close()
    _, held = await api.get(f"/v1/alerts/{counted}")
    assert held["count"] == 1 and held["change"] < high  # the copy's state, below the client's id
    _, page = await api.get("/v1/alerts?limit=100")
    expected = {item["id"] for item in page["items"]}  # the restored database's alerts
    assert {counted, rollback} <= expected
    resumed = await open_stream(api, last_event_id=last_id)
    sent: set[str] = set()

    async def replayed() -> None:
        while not expected <= sent:
            line = (await resumed.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                sent.add(orjson.loads(line[6:])["id"])

    try:
        went_back = await opening_id(resumed)
        await asyncio.wait_for(replayed(), 30)
    finally:
        resumed.close()
    assert went_back == "0"


def hold(feed: alertfeed.AlertFeed, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Holds ``feed`` back before its next read of the alert changes (leader duties, a slow
    reconnect): returns (held, gate); the feed reads again once ``gate`` is set."""
    gate, held = asyncio.Event(), asyncio.Event()
    real_tail = feed._tail

    async def lagging_tail(conn: Any) -> None:
        held.set()
        await gate.wait()
        await real_tail(conn)

    monkeypatch.setattr(feed, "_tail", lagging_tail)
    return held, gate


async def _alerts_until(resp: aiohttp.ClientResponse, done: Callable[[list[dict[str, Any]]], bool],
                        timeout: float = 30) -> list[dict[str, Any]]:
    """The alert events the stream sends until ``done`` holds of them; the timeout bounds a failure."""
    seen: list[dict[str, Any]] = []

    async def read() -> None:
        while not done(seen):
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                seen.append(orjson.loads(line[6:]))

    await asyncio.wait_for(read(), timeout)
    return seen


async def test_an_open_stream_gets_the_changes_a_restored_database_numbers_again(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database goes back to a copy that lacks the last 3 alert changes, and numbers 3
    new ones (the ``ledger_rollback`` alert, two acknowledgements) before the feed reads
    again: its last change is the one the feed had reached, so change numbers alone show
    nothing. The feed compares what it read with what the database holds, finds where they
    part, and an open stream gets every change numbered since, ``ledger_rollback`` first."""
    api: Api = await api_factory(database_url=Secret(database_url))
    feed = api.client.app[ANALYSTS].feed
    resp = await open_stream(api)
    try:
        await first_id(resp)
        kept, _ = await reuse_alert(api, uid("vm"), uid("scope"))
        scratch_dbs.append(copy := await snapshot(database_url))
        for _ in range(3):
            await reuse_alert(api, uid("vm"), uid("scope"))
        high = await api.client.app[ANALYSTS].alerts.last_change()
        await until(lambda: feed._pos == high, "the feed to read every change")
        held, gate = hold(feed, monkeypatch)
        await until(held.is_set, "the feed to be held back")
        await restore(database_url, copy, scratch_dbs)
        listed = await ledger_rollback_noticed(api)
        acks = 0
        while await api.client.app[ANALYSTS].alerts.last_change() < high:
            status, _ = await api.post(f"/v1/alerts/{kept}/acknowledge", {"note": f"ack {acks}"}, role="analyst")
            assert status == 200
            acks += 1
        assert acks >= 1 and await api.client.app[ANALYSTS].alerts.last_change() == high  # as many changes as were lost
        gate.set()
        sent = await _alerts_until(resp, lambda seen: any(a["kind"] == "ledger_rollback" for a in seen)
                                   and any(a["id"] == kept and a["acknowledged"] for a in seen))
    finally:
        resp.close()
    assert [a["id"] for a in sent if a["kind"] == "ledger_rollback"] == [listed["id"]]
    notes = [a["acknowledged"]["note"] for a in sent if a["id"] == kept and a["acknowledged"]]
    assert notes[-1] == f"ack {acks - 1}"


async def test_a_stream_whose_queue_is_full_when_the_database_went_back_goes_back_with_it(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream busy sending (its client reads slowly) has a full queue when the feed finds
    that the database went back: the go-back frame has no room. Ended there, its client
    would resume with a Last-Event-ID the restored database does not hold, and get every
    change again from the start. What its queue holds is dropped for the go-back frame instead (the feed
    reads again from below it), and the stream goes on with the restored database's
    changes, the ``ledger_rollback`` alert among them."""
    monkeypatch.setattr(alertfeed_streams, "QUEUE_SIZE", 2)
    api: Api = await api_factory(database_url=Secret(database_url))
    feed = api.client.app[ANALYSTS].feed
    resp = await open_stream(api)
    try:
        await first_id(resp)
        vm_id = uid("vm")
        await reuse_alert(api, vm_id, uid("scope"))
        await next_alert(resp, vm_id)
        scratch_dbs.append(copy := await snapshot(database_url))
        gate = asyncio.Event()
        real_send = analysts._send

        async def slow_client(stream: Any, data: bytes) -> None:
            if b"\nevent: alert\n" in data:
                await gate.wait()
            await real_send(stream, data)

        monkeypatch.setattr(analysts, "_send", slow_client)
        (sub,) = feed.streams.open
        await reuse_alert(api, uid("vm"), uid("scope"))

        def sending_it() -> bool:
            assert sub.position is not None  # the stream sent the first alert
            return feed._pos == sub.position + 1 and sub.queue.empty()

        await until(sending_it, "the stream to be sending it")
        for _ in range(2):
            await reuse_alert(api, uid("vm"), uid("scope"))
        await until(sub.queue.full, "the stream's queue to fill")
        await restore(database_url, copy, scratch_dbs)
        high = feed._pos
        assert high is not None
        listed = await ledger_rollback_noticed(api)

        def went_back() -> bool:
            assert feed._pos is not None
            return feed._pos < high

        await until(went_back, "the feed to go back with the database")
        gate.set()
        alert = await _alert_of_kind(resp, "ledger_rollback")
    finally:
        resp.close()
    assert alert["id"] == listed["id"]


async def test_a_database_gone_back_past_every_remembered_read_sends_open_streams_what_it_numbered_since(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed remembers the last change of its recent reads only (here the last two). A
    database restored to a copy older than all of them, which numbers a change (its
    ``ledger_rollback`` alert) before the feed reads again, holds none of them: where the
    histories part is unknown, so open streams go back to the start, and the
    ``ledger_rollback`` alert reaches them (not only the position of the oldest read
    remembered, which the restored database numbered again)."""
    monkeypatch.setattr(alertfeed, "_RECENT", 2)
    api: Api = await api_factory(database_url=Secret(database_url))
    feed = api.client.app[ANALYSTS].feed
    resp = await open_stream(api)
    try:
        await first_id(resp)
        await reuse_alert(api, uid("vm"), uid("scope"))
        scratch_dbs.append(copy := await snapshot(database_url))

        async def read_by_the_feed() -> None:
            high = await api.client.app[ANALYSTS].alerts.last_change()
            await until(lambda: feed._pos == high, "the feed to read the change")

        for _ in range(3):  # one read each: the feed remembers the last two
            await reuse_alert(api, uid("vm"), uid("scope"))
            await read_by_the_feed()
        held, gate = hold(feed, monkeypatch)
        await until(held.is_set, "the feed to be held back")
        await restore(database_url, copy, scratch_dbs)
        listed = await ledger_rollback_noticed(api)
        gate.set()
        alert = await _alert_of_kind(resp, "ledger_rollback")
    finally:
        resp.close()
    assert alert["id"] == listed["id"]


async def _raise_unledgered(dsn: str, kind: str, dedup: str) -> int:
    """Raises (or joins) an alert that writes no ledger entry, as the continuity guard, a
    witness or the tamper checks do, on a connection of the test's own; returns its id."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT rg_alert($1, 'critical', NULL, NULL, $2, $3, 0, $4, '{}'::jsonb)",
                                       kind, dedup, time.time_ns() // 1000, f"{kind} raised by the test"))
    finally:
        await conn.close()


async def test_a_restore_that_loses_only_alert_changes_is_noticed_though_the_last_alert_read_changed_again(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str, log_buffer: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Alert changes that write no ledger entry (``witness_unreachable``, ``ledger_tamper``,
    ``ledger_rollback``) leave the ledger's head as it was. The database goes back to a copy
    that lacks the last one the feed read (the alert joined again), then numbers another
    alert's change under that number and the same alert's next change after it, before the
    feed reads again: the head is the same, the last change is past the position, and the
    last alert read has changed since, as it would have without a restore. The feed finds
    that the database does not hold its mark as its last read left it, goes back, and the
    open stream gets the other alert, numbered at or below what it had already been sent;
    the leader logs it, and does not log again the alert it had logged."""
    api: Api = await api_factory(database_url=Secret(database_url))
    feed = api.client.app[ANALYSTS].feed
    await until(lambda: feed.leader, "this instance to lead the alert feed", timeout=15)
    resp = await open_stream(api)
    try:
        await first_id(resp)
        joined = uid("witness")
        joined_id = await _raise_unledgered(database_url, "witness_unreachable", joined)
        scratch_dbs.append(copy := await snapshot(database_url))
        await _raise_unledgered(database_url, "witness_unreachable", joined)  # lost by the restore
        high = await api.client.app[ANALYSTS].alerts.last_change()
        await until(lambda: feed._pos == high, "the feed to read every change")
        head = feed._head
        held, gate = hold(feed, monkeypatch)
        await until(held.is_set, "the feed to be held back")
        await restore(database_url, copy, scratch_dbs)
        other = await _raise_unledgered(database_url, "ledger_tamper", uid("tamper"))
        again = await _raise_unledgered(database_url, "witness_unreachable", joined)
        conn = await asyncpg.connect(database_url)
        try:
            numbered = {r["id"]: r["change_seq"] for r in await conn.fetch("SELECT id, change_seq FROM alerts")}
            restored_head = tuple(await conn.fetchrow("SELECT seq, hash FROM ledger_head"))
        finally:
            await conn.close()
        assert numbered[other] <= high < numbered[again]  # numbers alone show nothing
        assert head == (restored_head[0], bytes(restored_head[1]))  # nor does the ledger
        gate.set()
        sent = await _alerts_until(resp, lambda seen: any(a["id"] == str(other) for a in seen))
    finally:
        resp.close()
    assert [a["kind"] for a in sent if a["id"] == str(other)] == ["ledger_tamper"]
    assert len(alert_lines(log_buffer, str(other))) == 1
    assert len(alert_lines(log_buffer, str(joined_id))) == 1


async def test_a_feed_that_reconnects_to_the_same_database_does_not_go_back(
        api_factory: Callable[..., Any], database_url: str, log_buffer: io.StringIO) -> None:
    """No false alarm from the mark: the feed's session is ended under it (a network cut, a
    server restart) while alerts go on changing, the one read last among them; the feed
    reconnects to the same database, finds its mark there, and the open stream gets the
    changes made meanwhile with no go-back frame and no ``alert_feed_database_went_back``."""
    api: Api = await api_factory(database_url=Secret(database_url))
    feed = api.client.app[ANALYSTS].feed
    resp = await open_stream(api)
    try:
        start = await first_id(resp)
        joined = uid("witness")
        await _raise_unledgered(database_url, "witness_unreachable", joined)
        high = await api.client.app[ANALYSTS].alerts.last_change()
        await until(lambda: feed._pos == high, "the feed to read the change")
        session = feed._session_id
        conn = await asyncpg.connect(database_url)
        try:
            assert session is not None and await conn.fetchval("SELECT pg_terminate_backend($1)", session[0])
            await _raise_unledgered(database_url, "witness_unreachable", joined)
            other = await _raise_unledgered(database_url, "ledger_tamper", uid("tamper"))
        finally:
            await conn.close()
        await until(lambda: feed._session_id != session, "the feed to reconnect")
        ids: list[int] = []

        async def read() -> None:
            while True:
                line = (await resp.content.readline()).decode()
                assert line, "the stream ended"
                if line.startswith("id: "):
                    ids.append(change_of(line[4:]))
                elif line.startswith("data: ") and orjson.loads(line[6:])["id"] == str(other):
                    return

        await asyncio.wait_for(read(), 20)
    finally:
        resp.close()
    assert ids == sorted(ids) and ids[0] > start  # never an id below one sent: no go-back frame
    assert "alert_feed_database_went_back" not in log_buffer.getvalue()


async def test_sink_record_ids_stay_unique_after_the_database_went_back(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str, tmp_path: Path) -> None:
    """A sink record's id ends with a digest of its content (``alert-<alert uid>.<change>.<digest>``):
    alert ids and change numbers come from database sequences, which a restore winds back
    while the receivers keep what they got, so the first alerts raised after it (the
    ``ledger_rollback`` alert itself) reuse numbers the SIEM already has. With the digest, one
    id never names two different records, and a deduplicating receiver keeps them all."""
    sink = tmp_path / "siem" / "alerts.jsonl"
    api: Api = await api_factory(database_url=Secret(database_url), sinks=(f"file:{sink}",))

    def records() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in sink.read_bytes().splitlines()] if sink.exists() else []

    # The SIEM gets all 4 alerts; the restore forgets the last 3.
    await _went_back(api, database_url, scratch_dbs, lambda: sum(r.get("kind") == "reuse" for r in records()) >= 4)
    await ledger_rollback_noticed(api)
    await until(lambda: any(r.get("kind") == "ledger_rollback" for r in records()),
                "the ledger_rollback alert in the sink", timeout=30)

    by_id: dict[str, set[bytes]] = {}
    for record in records():
        by_id.setdefault(record["id"], set()).add(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
    clashes = {rid: sorted(orjson.loads(c).get("kind", "?") for c in contents)
               for rid, contents in by_id.items() if len(contents) > 1}
    assert clashes == {}, f"one record id names two different records (a deduplicating SIEM keeps one): {clashes}"


async def test_with_redis_instances_wake_each_other_through_pub_sub(api_factory: Callable[..., Any]) -> None:
    """With Redis configured, an alert raised through one instance is published on Redis and
    reaches the other instance's stream."""
    import redis.asyncio as aioredis

    from replayguard.fanout import ALERT_CHANNEL
    from tests.conftest import REDIS_URL

    one = await api_factory(redis_url=Secret(REDIS_URL))
    other = await api_factory(redis_url=Secret(REDIS_URL))
    spy = aioredis.from_url(REDIS_URL)
    pubsub = spy.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(ALERT_CHANNEL)
    try:
        resp = await open_stream(other)
        vm_id, scope, nonce = uid("vm"), uid("scope"), uid("nonce")
        await one.post("/v1/nonces/consume", {"vm_id": vm_id, "scope": scope, "nonce": nonce})
        # Replayed from another VM: a reuse alert.
        status, replay = await one.post("/v1/nonces/consume", {"vm_id": vm_id + "-b", "scope": scope, "nonce": nonce})
        assert status == 200 and replay["reason"] == "reused" and replay["alert_id"]
        message = await asyncio.wait_for(_next_message(pubsub), 10)
        assert int(message) == int(replay["alert_id"])
        _, alert = await next_alert(resp, vm_id + "-b")
        assert str(alert["id"]) == str(replay["alert_id"])
        resp.close()
    finally:
        await pubsub.aclose()
        await spy.aclose()


async def _next_message(pubsub: Any) -> bytes:
    while True:
        message = await pubsub.get_message(timeout=1.0)
        if message is not None:
            return bytes(message["data"])


async def test_a_half_open_feed_connection_is_dropped_and_the_feed_comes_back(
        api_factory: Callable[..., Any], database_url: str) -> None:
    """The feed's connections stop answering without closing (a peer gone without FIN or
    RST): the query in flight times out on the client, and the feed reconnects, ends the session
    the server still keeps for it (which holds the leader lock), LISTENs and leads again,
    instead of waiting for TCP to give up."""
    async with proxied(database_url) as (proxy, through_proxy):
        api = await api_factory(database_url=Secret(through_proxy), statement_timeout_ms=1000)
        feed = api.client.app[ANALYSTS].feed
        await until(lambda: feed._listen_conn is not None and api.runtime.tokens.listening_now,
                    "the feed to listen")
        old = feed._listen_conn.get_server_pid()
        with capture_logs() as logs:
            assert proxy.freeze() >= 1
            await until(lambda: (feed._listen_conn is not None and feed._listen_conn.get_server_pid() != old
                                 and api.runtime.tokens.listening_now and feed.leader),
                        "the feed to listen and lead on a new connection", timeout=30)
        interrupted = [e for e in logs if e["event"] == "alert_feed_interrupted"]
        # Whichever query is in flight when the proxy freezes times out on the client first:
        # the feed's own (TimeoutError, or the InterfaceError of its read's ROLLBACK with the
        # timeout as the cause; see the next test) or, when it leads, one of its duties'
        # through the pool, which reports the timeout as Unavailable (on a loaded machine,
        # often that one). Through a frozen proxy nothing else can end a query.
        assert interrupted and (interrupted[0]["error"] in {"TimeoutError", "Unavailable"}
                                or (interrupted[0]["error"], interrupted[0].get("cause"))
                                == ("InterfaceError", "TimeoutError")), interrupted
        # The server still saw the frozen session (and its leader lock): the feed ended it.
        assert [e["pid"] for e in logs if e["event"] == "alert_feed_previous_session_ended"] == [old]


async def test_a_read_timed_out_on_a_half_open_connection_is_logged_with_the_timeout_as_its_cause(
        database_url: str) -> None:
    """A query in a transaction times out on a half-open connection. asyncpg cancels it in
    the background and, with no answer within its timeout, closes the connection. When the
    ROLLBACK starts after that cancel (its task was held up, as on a loaded machine), the
    ROLLBACK finds the connection closed: ``InterfaceError``, raised while handling the
    timeout, which ``alert_feed_interrupted`` names as its cause."""
    from replayguard.pg import connections

    async with proxied(database_url) as (proxy, through_proxy):
        conn = await connections.connect(through_proxy, statement_timeout_ms=200)
        try:
            with pytest.raises(asyncpg.InterfaceError) as raised:
                async with conn.transaction():
                    assert proxy.freeze() >= 1
                    try:
                        await conn.fetchval("SELECT 1")
                    finally:
                        await asyncio.sleep(0.3)  # the ROLLBACK's timeout starts after the cancel's
        finally:
            conn.terminate()
    assert alertfeed.interruption(raised.value) == {"error": "InterfaceError", "cause": "TimeoutError"}


async def test_a_feed_whose_new_connections_are_half_open_too_comes_back_when_the_network_does(
        api_factory: Callable[..., Any], database_url: str) -> None:
    """The network half-opens the feed's connections and, for a while, every new one too:
    handshakes that never get an answer. Each attempt (the feed's own, and the pool's for the
    leader's duties) gives up within the client timeout instead of asyncpg's default minute,
    so once the network answers again the feed listens and leads within seconds."""
    async with proxied(database_url) as (proxy, through_proxy):
        api = await api_factory(database_url=Secret(through_proxy), statement_timeout_ms=1000)
        feed = api.client.app[ANALYSTS].feed
        await until(lambda: feed._listen_conn is not None and feed.leader, "the feed to listen and lead")
        old = feed._listen_conn.get_server_pid()
        with capture_logs() as logs:
            proxy.freeze_new = True
            assert proxy.freeze() >= 1
            # The feed's own connection attempts time out: the handshake is bounded.
            await until(lambda: any(e["event"] == "alert_feed_connect_failed" and e["error"] == "TimeoutError"
                                    for e in logs), "a connection attempt to time out", timeout=30)
            # A decision meanwhile fails closed, whichever connection it waits on.
            status, _ = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "s", "nonce": uid("n")})
            assert status == 503
            proxy.freeze_new = False
            await until(lambda: (feed._listen_conn is not None and feed._listen_conn.get_server_pid() != old
                                 and api.runtime.tokens.listening_now and feed.leader),
                        "the feed to listen and lead on a new connection", timeout=30)
        status, _ = await api.post("/v1/nonces/consume", {"vm_id": uid("vm"), "scope": "s", "nonce": uid("n")})
        assert status == 200


async def test_ocsf_finding_uids_name_one_alert_across_a_restore(
        scratch_dbs: list[str], api_factory: Callable[..., Any], database_url: str, tmp_path: Path) -> None:
    """OCSF findings are correlated by ``finding_info.uid``. Alert ids come from a sequence a
    restore winds back, so the ``ledger_rollback`` alert raised on the restored database holds
    the id of a ``reuse`` alert the SIEM already has: its finding uid differs all the same,
    while every record of one alert (raised before the restore, delivered again, then
    acknowledged after it) keeps the uid it was first sent with."""
    sink = tmp_path / "siem" / "findings.jsonl"
    api: Api = await api_factory(database_url=Secret(database_url), sinks=(f"ocsf+file:{sink}",))

    def findings() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in sink.read_bytes().splitlines()] if sink.exists() else []

    def alert_of(doc: dict[str, Any]) -> str:
        return str(doc["unmapped"]["replayguard"]["alert_id"])

    def kind_of(doc: dict[str, Any]) -> str:
        return str(doc["finding_info"]["types"][0])

    # The SIEM gets all 4 reuse alerts; the restore forgets the last 3.
    await _went_back(api, database_url, scratch_dbs, lambda: sum(kind_of(d) == "reuse" for d in findings()) >= 4)
    kept = min(alert_of(d) for d in findings())
    listed = await ledger_rollback_noticed(api)
    status, _ = await api.post(f"/v1/alerts/{kept}/acknowledge", {"note": "seen"}, role="analyst")
    assert status == 200
    await until(lambda: any(kind_of(d) == "ledger_rollback" for d in findings())
                and any(alert_of(d) == kept and d["status"] == "Resolved" for d in findings()),
                "the ledger_rollback finding and the acknowledgement in the sink", timeout=30)

    by_alert: dict[tuple[str, str, str | None], set[str]] = {}
    by_uid: dict[str, set[tuple[str, str, str | None]]] = {}
    for doc in findings():
        raised = (alert_of(doc), kind_of(doc), doc.get("resources", [{}])[0].get("uid"))
        by_alert.setdefault(raised, set()).add(doc["finding_info"]["uid"])
        by_uid.setdefault(doc["finding_info"]["uid"], set()).add(raised)
    shared = {uid_: alerts for uid_, alerts in by_uid.items() if len(alerts) > 1}
    assert shared == {}, f"one finding uid names two different alerts (a SIEM merges them): {shared}"
    split = {alert: uids for alert, uids in by_alert.items() if len(uids) > 1}
    assert split == {}, f"one alert's records carry different finding uids: {split}"
    assert any(alert_of(d) == listed["id"] and kind_of(d) == "reuse" for d in findings())  # its id was reused
