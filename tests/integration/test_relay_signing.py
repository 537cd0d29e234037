"""Relays against a real service that requires signed events (``event_hmac_secret`` set).

The service is the in-process app over the run's PostgreSQL, with its clock at the real
time so the relays' signatures (made with the time of sending) are fresh. Without the
secret a relay's events are refused (401) and must stay spooled; with it they arrive.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from replayguard.relay.proxmox import CURSOR_FILE, EX_TEMPFAIL, Outbox, PollerConfig, run_poller
from replayguard.relay.vsphere import MAX_BODY, SERVICE_MAX_BODY, ForwarderConfig, create_app
from replayguard.settings import Secret
from tests.conftest import REPO, Api, FakeClock, RunAppTestServer, uid

SECRET = "relay-signing-secret-for-tests"
PROXMOX = REPO / "tests" / "data" / "proxmox" / "cluster-tasks.json"
VSPHERE = REPO / "tests" / "data" / "hypervisors" / "vsphere"


@pytest_asyncio.fixture
async def signed_api(api_factory: Callable[..., Any]) -> Api:
    """The service with event_hmac_secret set, its clock at the real time."""
    api: Api = await api_factory(clock=FakeClock(now=time.time()), event_hmac_secret=Secret(SECRET))
    return api


def url(api: Api) -> str:
    return str(api.client.make_url("")).rstrip("/")


def listing() -> list[dict[str, Any]]:
    """The recorded PVE task list with fresh UPIDs (another pid field), so no other test met them."""
    tasks: list[dict[str, Any]] = orjson.loads(PROXMOX.read_bytes())
    salt = secrets.randbelow(1 << 20)
    fresh = []
    for task in tasks:
        parts = task["upid"].split(":")
        parts[2] = f"{(int(parts[2], 16) ^ salt):08X}"
        fresh.append({**task, "upid": ":".join(parts)})
    return fresh


def poller(api: Api, spool: Path, secret: str | None) -> PollerConfig:
    return PollerConfig(service_url=url(api), token=Secret(api.tokens["hypervisor"]), spool_dir=spool,
                        event_secret=Secret(secret) if secret else None, once=True, attempts=2,
                        retry_base=0.01, lookup="none", cluster=uid("c"))


async def test_proxmox_once_unsigned_fails_keeps_records_and_cursor(signed_api: Api, tmp_path: Path) -> None:
    """Unsigned records are refused (401): `--once` exits non-zero and keeps every record in
    the spool (none in dead/ but the clone that --lookup none cannot complete), its cursor
    past them; signed, the next run delivers them."""
    tasks = listing()
    assert await run_poller(poller(signed_api, tmp_path, None), tasks) == EX_TEMPFAIL
    outbox = Outbox(tmp_path)
    waiting = len(outbox.pending())
    clones = [t["upid"] for t in tasks if t["type"] == "qmclone"]
    assert waiting > 0 and _dead_upids(outbox) == clones and (tmp_path / CURSOR_FILE).exists()
    assert await run_poller(poller(signed_api, tmp_path, "wrong-secret"), tasks) == EX_TEMPFAIL
    assert len(outbox.pending()) == waiting  # the same records, not spooled twice
    assert await run_poller(poller(signed_api, tmp_path, SECRET), tasks) == 0
    assert not outbox.pending() and _dead_upids(outbox) == clones


def _dead_upids(outbox: Outbox) -> list[str]:
    return [orjson.loads(p.read_bytes())["upid"] for p in outbox.dead_letters()]


@pytest_asyncio.fixture
async def forwarder(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts VEBA forwarder apps on loopback; closes them after."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(api: Api, secret: str | None) -> TestClient[web.Request, web.Application]:
        config = ForwarderConfig(url(api), Secret(api.tokens["hypervisor"]), tmp_path / f"spool-{len(clients)}",
                                 retry_base=0.01, event_secret=Secret(secret) if secret else None)
        client = TestClient(RunAppTestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


def revert(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads((VSPHERE / "revert_knative_type.json").read_bytes())
    event["id"] = uid("ce")
    event["data"]["Vm"]["Name"] = uid("vm")
    event["data"].update(extra or {})
    return event


STRUCTURED = {"Content-Type": "application/cloudevents+json"}


async def test_vsphere_unsigned_event_is_a_5xx_to_veba_and_stays_spooled(
    signed_api: Api, forwarder: Callable[..., Any], tmp_path: Path
) -> None:
    """An event the service refuses as unsigned (401) is answered 502 to VEBA and kept in the spool, not dead/."""
    client = await forwarder(signed_api, None)
    resp = await client.post("/", data=orjson.dumps(revert()), headers=STRUCTURED)
    body = await resp.json()
    assert resp.status == 502 and body["status"] == 401 and body["spooled"] is True
    outbox = Outbox(tmp_path / "spool-0")
    assert len(outbox.pending()) == 1 and not outbox.dead_letters()


async def test_vsphere_signed_event_is_accepted(signed_api: Api, forwarder: Callable[..., Any]) -> None:
    """With the service's secret the forwarder signs the event and the service accepts it (202)."""
    client = await forwarder(signed_api, SECRET)
    resp = await client.post("/", data=orjson.dumps(revert()), headers=STRUCTURED)
    body = await resp.json()
    assert resp.status == 200 and body["forwarded"] is True and body["status"] == 202, body


async def test_vsphere_event_over_64k_is_trimmed_and_accepted(signed_api: Api, forwarder: Callable[..., Any]) -> None:
    """A genuine revert carrying 200 KiB of fields the service does not read reaches it trimmed, and is acted on."""
    client = await forwarder(signed_api, SECRET)
    event = revert({"ConfigSpec": {"extraConfig": ["x" * 1024] * 200}})
    assert len(orjson.dumps(event)) > SERVICE_MAX_BODY
    resp = await client.post("/", data=orjson.dumps(event), headers=STRUCTURED)
    body = await resp.json()
    assert resp.status == 200 and body["status"] == 202 and body["service"].get("ignored") is not True, body


async def test_vsphere_bodies_the_service_would_refuse_are_refused_at_the_forwarder(
    signed_api: Api, forwarder: Callable[..., Any], tmp_path: Path
) -> None:
    """An event still over 64 KiB after trimming is a 413 at the forwarder, as is a delivery over 1 MiB;
    neither reaches the service nor fills the spool or dead/."""
    client = await forwarder(signed_api, SECRET)
    too_big = revert({"FullFormattedMessage": "m" * (SERVICE_MAX_BODY + 1)})
    resp = await client.post("/", data=orjson.dumps(too_big), headers=STRUCTURED)
    assert resp.status == 413
    huge = revert({"ConfigSpec": "x" * MAX_BODY})
    resp = await client.post("/", data=io.BytesIO(orjson.dumps(huge)), headers=STRUCTURED)
    assert resp.status == 413
    outbox = Outbox(tmp_path / "spool-0")
    assert not outbox.pending() and not outbox.dead_letters()
