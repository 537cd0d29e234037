"""What the relays do with answers that do not come from the events endpoint itself: a
redirect or a 404/405 means the relay was pointed at the wrong URL (the service answers
its events endpoint with 202, 400, 401, 403, 409, 413, 415 or 503), which the operator
fixes; until then the events must wait in the spool, not be parked in dead/ and dropped."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from replayguard.relay.spool import Answer, Outcome, Retry, Spool, classify_status, deliver_file, drain, post_json
from replayguard.settings import Secret


@contextlib.asynccontextmanager
async def events_endpoint(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """A loopback server answering POST /v1/hypervisor/events with ``handler``; yields its URL."""
    app = web.Application()
    app.router.add_post("/v1/hypervisor/events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/hypervisor/events"
    finally:
        await runner.cleanup()


@pytest.fixture
async def answering() -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server answering POST / with the status at the head of the list it yields."""
    statuses: list[int] = []

    async def handler(_request: web.Request) -> web.Response:
        status = statuses[0]
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "https://elsewhere.invalid/"})
        return web.json_response({"accepted": True, "duplicate": False}, status=status)

    async with events_endpoint(handler) as url:
        yield url, statuses


@pytest.mark.parametrize("status", [301, 302, 307, 308, 404, 405])
def test_a_wrong_url_keeps_the_event(status: int) -> None:
    """A redirect, a 404 or a 405 is the operator's to fix, like a wrong token: keep and retry."""
    assert classify_status(status) is Outcome.REFUSED


@pytest.mark.parametrize("status", [308, 404])
async def test_events_wait_in_the_spool_until_the_url_is_fixed(
    tmp_path: Path, answering: tuple[str, list[int]], status: int
) -> None:
    """A relay whose --service-url is answered by a redirect (http:// behind a proxy that
    sends clients to https://) or a 404 (a path prefix left out) keeps its revert in the
    spool; once the URL answers, the revert is delivered. (Each such answer parked the
    event in dead/, which is never resent and drops its oldest letters: the revert, and
    the rollback window it opens, were lost.)"""
    url, statuses = answering
    statuses.append(status)
    spool = Spool(tmp_path)
    spool.put({"event_id": "hv-03:revert-1", "kind": "lifecycle"})
    async with aiohttp.ClientSession() as session:

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, Secret("t0ken"), data)

        left = await drain(spool, post, "event_id", Retry(attempts=2, base=0.001))
        assert left == 1 and not spool.dead_letters()
        statuses[0] = 202
        assert await drain(spool, post, "event_id", Retry(attempts=2, base=0.001)) == 0
    assert not spool.pending() and not spool.dead_letters()


async def test_a_refusal_logs_the_services_reason(tmp_path: Path) -> None:
    """A 401 for a signature whose timestamp the service finds stale (the relay host's
    clock is off) is logged with the service's own reason, so the operator fixes the clock
    rather than the token; an answer without one logs none, and the token never appears."""
    spool = Spool(tmp_path)
    path = spool.put({"event_id": "hv-03:revert-1", "kind": "lifecycle"})
    reason = "the event's signature timestamp is outside the tolerance"

    async def stale(_data: bytes) -> Answer:
        return Answer(401, {"error": {"code": "unauthorized", "message": reason}})

    async def bare(_data: bytes) -> Answer:
        return Answer(403, ["t0ken"])

    with capture_logs() as logs:
        assert (await deliver_file(spool, path, stale))[0] is Outcome.REFUSED
        assert (await deliver_file(spool, path, bare))[0] is Outcome.REFUSED
    refused = [e for e in logs if e["event"] == "event_refused"]
    assert [e.get("service_error") for e in refused] == [reason, None]
    assert "t0ken" not in repr(logs)


@pytest.mark.parametrize("relay", ["libvirt", "proxmox", "vsphere"])
def test_credentials_in_a_url_are_refused_and_never_echoed(relay: str, tmp_path: Path) -> None:
    """A --service-url (or Proxmox --api-url) with a user and password is refused at start
    with a message that does not repeat the password: the relay would log the URL
    (``relay_started``) and the service URL's credentials would sit in every log line."""
    from replayguard.errors import ConfigError
    from replayguard.relay import cli, proxmox, vsphere

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    good, bad = "https://replayguard.example:8080", "https://ops:hunter2@replayguard.example:8080"
    common = ["--token-file", str(token), "--spool-dir", str(tmp_path / "spool")]
    cases: list[list[str]] = [["--service-url", bad, *common]]
    if relay == "proxmox":
        cases.append(["--service-url", good, "--api-url", "https://root:hunter2@pve1:8006",
                      "--api-token-file", str(token), *common])
    for argv in cases:
        with pytest.raises(ConfigError) as caught:
            if relay == "libvirt":
                cli.load_config(["libvirt", "--uri", "test:///default", *argv], {}, "h")
            elif relay == "proxmox":
                proxmox.load_config([*argv, "--api-url", "https://pve1:8006", "--api-token-file", str(token)]
                                    if "--api-url" not in argv else argv, {})
            else:
                vsphere.load_config(argv, {})
        assert "hunter2" not in caught.value.message and "URL" in caught.value.message


@pytest.fixture
async def proxy_refusing() -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback stand-in for a reverse proxy in front of the service: while the list's head
    is 400 it answers as nginx does a plain-HTTP request to its TLS port or a missing client
    certificate (an HTML page), else 202 with the service's body."""
    statuses: list[int] = []

    async def handler(_request: web.Request) -> web.Response:
        if statuses[0] == 400:
            return web.Response(status=400, content_type="text/html",
                                text="<html><center>No required SSL certificate was sent</center></html>")
        return web.json_response({"accepted": True, "duplicate": False}, status=statuses[0])

    async with events_endpoint(handler) as url:
        yield url, statuses


async def test_a_client_error_that_is_not_the_services_keeps_the_event(
    tmp_path: Path, proxy_refusing: tuple[str, list[int]]
) -> None:
    """A 4xx without the service's error body (CONTRACT: every error of the service has one)
    comes from something between the relay and the service, a proxy wanting a client
    certificate or TLS: the operator's to fix, so the revert waits in the spool and is
    delivered once the path is fixed. (Such a 400 parked it in dead/, never resent.)"""
    url, statuses = proxy_refusing
    statuses.append(400)
    spool = Spool(tmp_path)
    spool.put({"event_id": "hv-03:revert-1", "kind": "lifecycle"})
    async with aiohttp.ClientSession() as session:

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, Secret("t0ken"), data)

        with capture_logs() as logs:
            assert await drain(spool, post, "event_id", Retry(attempts=2, base=0.001)) == 1
        assert not spool.dead_letters()
        (refused, *_) = [e for e in logs if e["event"] == "event_refused"]
        assert refused["status"] == 400 and "not the service's" in refused["hint"]
        statuses[0] = 202
        assert await drain(spool, post, "event_id", Retry(attempts=2, base=0.001)) == 0
    assert not spool.pending() and not spool.dead_letters()


@pytest.mark.parametrize("body", [None, ["bad"], {"error": "bad"}, {"error": {"message": "bad"}}])
async def test_only_the_services_own_rejection_parks_an_event(tmp_path: Path, body: object) -> None:
    """A 400 with the service's error body parks the event in dead/ (resending cannot help);
    the same status with any other body keeps it."""
    spool = Spool(tmp_path)
    path = spool.put({"event_id": "hv-03:revert-1", "kind": "lifecycle"})

    async def other(_data: bytes) -> Answer:
        return Answer(400, body)

    async def service(_data: bytes) -> Answer:
        return Answer(400, {"error": {"code": "invalid_payload", "message": "domain.uuid is required"}})

    assert (await deliver_file(spool, path, other))[0] is Outcome.REFUSED
    assert spool.pending() == [path]
    assert (await deliver_file(spool, path, service))[0] is Outcome.DEAD
    assert not spool.pending() and len(spool.dead_letters()) == 1


@pytest.mark.parametrize("url", [
    "ops:hunter2@replayguard.example:8080",  # the scheme left out
    "https//ops:hunter2@replayguard.example:8080",
    "http:/ops:hunter2@replayguard.example",
    "https://replayguard.example:8080/?api_key=hunter2",  # a proxy's key in the query
    "https://replayguard.example:8080/#hunter2",
])
def test_a_url_the_relay_refuses_is_never_echoed(url: str) -> None:
    """A --service-url refused for any reason is not repeated in the error: a malformed one
    may still hold a password (the error went to stderr and the journal with it), and one
    with a query or fragment is refused, since the relay appends the events path to it
    (the request would miss the endpoint) and logs it at start."""
    from replayguard.errors import ConfigError
    from replayguard.relay.options import checked_service_url

    with pytest.raises(ConfigError) as caught:
        checked_service_url(url)
    assert "hunter2" not in caught.value.message and "URL" in caught.value.message


async def test_an_event_refused_for_itself_is_tried_again_on_its_own_schedule(tmp_path: Path) -> None:
    """Events refused for themselves (403: VMs the token is not bound to) wait in the spool
    while the host's other events keep arriving and are delivered one by one. The refused
    ones are tried again on their own backoff, not at every pass: with the clock standing
    still, 20 deliveries behind 50 refused events post each refused one once. (Each new
    event's pass posted every refused event again: a host with many unbound VMs sent the
    service held x arrivals 403s, about every half second.)"""
    spool = Spool(tmp_path)
    for n in range(50):
        spool.put({"event_id": f"hv-03:unbound-{n}", "kind": "lifecycle"})
    spool.put({"event_id": "hv-03:bound-0", "kind": "lifecycle"})
    posted: dict[str, int] = {}

    async def post(data: bytes) -> Answer:
        event_id = orjson.loads(data)["event_id"]
        posted[event_id] = posted.get(event_id, 0) + 1
        if "unbound" in event_id:
            return Answer(403, {"error": {"code": "forbidden", "message": "not bound to this VM"}})
        n = int(event_id.rsplit("-", 1)[1])
        if n < 19:
            spool.put({"event_id": f"hv-03:bound-{n + 1}", "kind": "lifecycle"})  # the next arrival
        return Answer(202, {"accepted": True, "duplicate": False})

    retry = Retry(attempts=3, base=0.001, clock=lambda: 1000.0)
    assert await drain(spool, post, "event_id", retry) == 50
    assert sum(1 for e in posted if e.startswith("hv-03:bound-")) == 20
    assert {n for e, n in posted.items() if "unbound" in e} == {1}


@pytest.mark.parametrize("status", [403, 413])
async def test_a_run_that_will_not_resend_sets_aside_an_event_refused_for_itself(tmp_path: Path, status: int) -> None:
    """A drain with ``set_aside`` (a Proxmox --once run) moves an event still refused for
    itself when its attempts are spent to dead/, logged with its id and the fix, and
    reports nothing left; the event behind it is delivered. Without ``set_aside`` (a relay
    that keeps running) it stays in the spool."""
    spool = Spool(tmp_path)
    spool.put({"event_id": "hv-03:refused", "kind": "lifecycle"})
    spool.put({"event_id": "hv-03:taken", "kind": "lifecycle"})

    async def post(data: bytes) -> Answer:
        if orjson.loads(data)["event_id"] == "hv-03:refused":
            return Answer(status, {"error": {"code": "forbidden", "message": "no"}})
        return Answer(202, {"accepted": True, "duplicate": False})

    assert await drain(spool, post, "event_id", Retry(attempts=2, base=0.001)) == 1
    assert not spool.dead_letters()
    with capture_logs() as logs:
        assert await drain(spool, post, "event_id", Retry(attempts=2, base=0.001), set_aside=True) == 0
    (letter,) = spool.dead_letters()
    assert orjson.loads(letter.read_bytes())["event_id"] == "hv-03:refused" and not spool.pending()
    (line,) = [e for e in logs if e["event"] == "event_set_aside"]
    assert (line["log_level"], line["event_id"], line["status"]) == ("error", "hv-03:refused", status)
    assert "move the file back" in line["hint"]


@pytest.mark.parametrize("status", [401, 404, 308, 503])
async def test_a_refusal_of_everything_is_never_set_aside(tmp_path: Path, status: int) -> None:
    """A wrong token or signature, a wrong URL or a service that is down concerns every
    event alike: even with ``set_aside`` the event stays in the spool for the next run."""
    spool = Spool(tmp_path)
    spool.put({"event_id": "hv-03:revert-1", "kind": "lifecycle"})

    async def post(_data: bytes) -> Answer:
        return Answer(status, {"error": {"code": "unauthorized", "message": "no"}})

    assert await drain(spool, post, "event_id", Retry(attempts=2, base=0.001), set_aside=True) == 1
    assert not spool.dead_letters() and len(spool.pending()) == 1
