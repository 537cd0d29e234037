"""The VEBA forwarder over HTTP: recorded CloudEvents in, a flaky stand-in service or the real one out.

The forwarder app runs on a loopback test server, as VEBA's Knative trigger would call it;
the stand-in replayguard records every body and can be told to fail the first requests or
to refuse; the real service is the ``api`` fixture's in-process server.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from replayguard.relay.proxmox import Outbox
from replayguard.relay.vsphere import ForwarderConfig, create_app
from replayguard.settings import Secret
from tests.conftest import Api, RunAppTestServer, dead_url, uid
from tests.waiting import until

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "hypervisors" / "vsphere"
TOKEN = "hv-token-vsphere-test"
ACTED_ON = ["revert_knative_type.json", "revert_router_eventex.json", "cloned.json", "drs_migrated.json",
            "powered_on.json", "powered_off_envelope_time.json", "task_create_snapshot.json"]
WAIT = 20.0


def recorded(name: str) -> dict[str, Any]:
    return dict(orjson.loads((SAMPLES / name).read_bytes()))


def binary(event: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """A structured event as Knative delivers it in binary mode."""
    headers = {f"ce-{k}": str(v) for k, v in event.items() if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = event["datacontenttype"]
    return headers, orjson.dumps(event["data"])


@dataclass
class StandIn:
    """A stand-in replayguard: records bodies; the first ``fail`` posts get ``fail_status``."""

    fail: int = 0
    fail_status: int = 503
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    calls: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.calls <= self.fail:
            return web.json_response({"error": {"code": "x"}}, status=self.fail_status)
        assert request.query["source"] == "vsphere"
        self.auth.append(request.headers["Authorization"])
        self.bodies.append(await request.json())
        return web.json_response({"accepted": True, "duplicate": False, "events": 1}, status=202)


@pytest_asyncio.fixture
async def forwarder_to(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts forwarder apps pointed at a service URL; closes them after."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(service_url: str, token: str = TOKEN) -> TestClient[web.Request, web.Application]:
        config = ForwarderConfig(service_url, Secret(token), tmp_path / f"spool-{len(clients)}", retry_base=0.01)
        config.spool_dir.mkdir()
        client = TestClient(RunAppTestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def stand_in_server(recorder: StandIn) -> TestServer:
    app = web.Application()
    app.router.add_post("/v1/hypervisor/events", recorder.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest_asyncio.fixture
async def service() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(recorder: StandIn) -> str:
        servers.append(await stand_in_server(recorder))
        return str(servers[-1].make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_binary_event_is_forwarded_as_the_structured_original(
    forwarder_to: Callable[..., Any], service: Callable[..., Any]
) -> None:
    """A binary-mode delivery reaches the service as the recorded
    structured event, with the Bearer token; VEBA gets 200."""
    recorder = StandIn()
    client = await forwarder_to(await service(recorder))
    event = recorded("revert_knative_type.json")
    headers, body = binary(event)
    resp = await client.post("/", data=body, headers=headers)
    assert resp.status == 200 and (await resp.json())["forwarded"] is True
    assert recorder.bodies == [event] and recorder.auth == [f"Bearer {TOKEN}"]


async def test_service_failures_are_spooled_answered_202_and_resent(
    forwarder_to: Callable[..., Any], service: Callable[..., Any], tmp_path: Path
) -> None:
    """While the service answers 503 the event is spooled (202 to VEBA) and resent with backoff until taken."""
    recorder = StandIn(fail=3)
    client = await forwarder_to(await service(recorder))
    event = recorded("cloned.json")
    resp = await client.post("/", data=orjson.dumps(event),
                             headers={"Content-Type": "application/cloudevents+json"})
    assert resp.status == 202 and (await resp.json())["spooled"] is True
    await until(lambda: bool(recorder.bodies), "the event to reach the service", WAIT)
    await until(lambda: not Outbox(tmp_path / "spool-0").pending(), "the outbox to empty", WAIT)
    assert recorder.bodies == [event] and recorder.calls == 4


async def test_a_malformed_event_is_parked_in_dead(
    forwarder_to: Callable[..., Any], service: Callable[..., Any], tmp_path: Path
) -> None:
    """A 400 from the service cannot be cured by retrying: the
    event is kept in dead/ and VEBA is not asked to resend."""
    recorder = StandIn(fail=1, fail_status=400)
    client = await forwarder_to(await service(recorder))
    resp = await client.post("/", data=orjson.dumps(recorded("powered_on.json")),
                             headers={"Content-Type": "application/cloudevents+json"})
    body = await resp.json()
    assert resp.status == 200 and body["forwarded"] is False and body["status"] == 400
    (parked,) = (tmp_path / "spool-0" / "dead").iterdir()
    assert orjson.loads(parked.read_bytes()) == recorded("powered_on.json")
    metrics = await (await client.get("/metrics")).text()
    assert "replayguard_relay_dead_letters 1\n" in metrics


@pytest.mark.parametrize("status", [401, 403, 413])
async def test_an_unauthorised_event_stays_spooled_and_veba_gets_5xx(
    forwarder_to: Callable[..., Any], service: Callable[..., Any], tmp_path: Path, status: int
) -> None:
    """A 401/403/413 is the operator's to fix: VEBA gets a 502,
    the event stays in the spool (never dead/) and is resent."""
    recorder = StandIn(fail=2, fail_status=status)
    client = await forwarder_to(await service(recorder))
    event = recorded("powered_on.json")
    resp = await client.post("/", data=orjson.dumps(event), headers={"Content-Type": "application/cloudevents+json"})
    assert resp.status == 502 and (await resp.json())["spooled"] is True
    assert not list((tmp_path / "spool-0" / "dead").iterdir())
    await until(lambda: bool(recorder.bodies), "the event to reach the service", WAIT)
    await until(lambda: not Outbox(tmp_path / "spool-0").pending(), "the outbox to empty", WAIT)
    assert recorder.bodies == [event]


async def test_an_unwritable_spool_answers_503_so_veba_retries(
    forwarder_to: Callable[..., Any], service: Callable[..., Any], tmp_path: Path
) -> None:
    """If the service is down and the spool is gone, VEBA gets 503 rather than a false 2xx."""
    client = await forwarder_to(await service(StandIn(fail=1)))
    shutil.rmtree(tmp_path / "spool-0")
    headers, body = binary(recorded("powered_on.json"))
    resp = await client.post("/", data=body, headers=headers)
    assert resp.status == 503


async def test_what_is_not_a_cloudevent_is_refused_and_not_forwarded(
    forwarder_to: Callable[..., Any], service: Callable[..., Any]
) -> None:
    """A body without the CloudEvents attributes is a 400 and never reaches the service."""
    recorder = StandIn()
    client = await forwarder_to(await service(recorder))
    resp = await client.post("/", data=b'{"Key": 1}', headers={"Content-Type": "application/json"})
    assert resp.status == 400 and recorder.calls == 0


def isolated(name: str) -> dict[str, Any]:
    """A recorded event with a fresh id and VM name, so it meets nothing else in the test's database."""
    event = recorded(name)
    event["id"] = uid("ce")
    event["data"]["Vm"]["Name"] = uid("vm")
    return event


@pytest.mark.parametrize("name", ACTED_ON)
async def test_real_service_accepts_the_forwarded_event_and_flags_the_repeat(
    api: Api, forwarder_to: Callable[..., Any], name: str
) -> None:
    """Through the forwarder, replayguard accepts the recorded
    event (202) and answers a second delivery duplicate:true."""
    client = await forwarder_to(str(api.client.make_url("")).rstrip("/"), api.tokens["hypervisor"])
    headers, body = binary(isolated(name))
    first = await (await client.post("/", data=body, headers=headers)).json()
    assert (first["forwarded"], first["status"], first["service"]["duplicate"]) == (True, 202, False), first
    again = await (await client.post("/", data=body, headers=headers)).json()
    assert (again["status"], again["service"]["duplicate"]) == (202, True), again


async def test_deeply_nested_cloudevent_data_is_a_400_not_a_500(tmp_path: Path) -> None:
    """A structured CloudEvent whose data nests 300 levels deep (JSON the relay reads, but
    cannot write again) is refused with 400 and not spooled, not answered 500."""
    head = orjson.dumps({"specversion": "1.0", "id": "deep-1", "source": "/vcenter",
                         "type": "com.vmware.event.router/event"})
    body = head[:-1] + b',"data":' + b"[" * 300 + b"1" + b"]" * 300 + b"}"
    with dead_url() as url:
        config = ForwarderConfig(url, Secret("hv-token"), tmp_path / "spool", retry_base=0.01)
        config.spool_dir.mkdir()
        client = TestClient(RunAppTestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        try:
            resp = await client.post("/", data=body, headers={"Content-Type": "application/cloudevents+json"})
            status = resp.status
        finally:
            await client.close()
    assert status == 400, status
    assert not [p for p in config.spool_dir.rglob("*") if p.is_file()]
