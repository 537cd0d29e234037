"""A libvirt revert of a running domain to a shut-off snapshot, through libvirtd (test
driver), the real relay and the real service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest

from tests.conftest import cli_env, uid
from tests.integration.libvirt_support import DOMAIN_XML, libvirt, private_libvirtd, requires_libvirt
from tests.integration.test_libvirt_e2e import Service, _create_token, _eventually, _start_relay

pytestmark = requires_libvirt


@pytest.fixture
def libvirt_uri() -> Iterator[str]:
    with private_libvirtd() as daemon:
        yield daemon.uri


async def test_revert_of_a_running_domain_to_a_shut_off_snapshot_opens_a_window(
    libvirt_uri: str, database_url: str, service_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Reverting a running domain to a snapshot taken while it was shut off makes
    libvirt's test driver emit only STOPPED/FROM_SNAPSHOT (no STARTED or DEFINED follows):
    that event is the revert, so it opens the window, and a login made before it and
    replayed after the next boot is ``replay_after_rollback``."""
    data_dir = tmp_path / "data"
    tokens = {role: await _create_token(role, database_url, data_dir) for role in ("admin", "callout", "hypervisor")}
    proc = await service_factory(data_dir=data_dir, database_url=database_url,
                                 env=cli_env(REPLAYGUARD_TOTP_DRIFT_STEPS="2"))
    conn = libvirt.open(libvirt_uri)
    relay = _start_relay(libvirt_uri, proc.url, tokens["hypervisor"], tmp_path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            service = Service(proc.url, tokens, session)

            def diagnose() -> str:
                return f"relay log:\n{relay.text()}\nservice log:\n{proc.log()}"

            async def connected() -> bool | None:
                assert relay.proc.poll() is None, diagnose()
                return True if "libvirt_connected" in relay.text() else None

            await _eventually(connected, "the relay did not connect", diagnose)
            principal = uid("alice")
            status, enrolled = await service.call("POST", f"/v1/principals/{principal}/tokens", "admin",
                                                  {"type": "totp"})
            assert status == 201, enrolled
            totp = pyotp.TOTP(enrolled["secret"])

            vm_id = uid("rg-off")
            dom = conn.defineXML(DOMAIN_XML.format(name=vm_id))
            snap = dom.snapshotCreateXML("<domainsnapshot><name>cold</name></domainsnapshot>")  # shut off

            def count(event_type: str) -> Callable[[], Awaitable[int | None]]:
                async def probe() -> int | None:
                    status, page = await service.call("GET", f"/v1/vms/{vm_id}/timeline", "admin")
                    if status == 404:
                        return None
                    found = sum(1 for item in page["items"] if item.get("event", {}).get("type") == event_type)
                    return found or None
                return probe

            await _eventually(count("snapshot.created"), "no snapshot.created", diagnose)
            dom.create()
            await _eventually(count("vm.started"), "no vm.started", diagnose)

            code = totp.now()
            login = {"vm_id": vm_id, "principal": principal, "otp": code}
            status, first = await service.call("POST", "/v1/otp/verify", "callout", login)
            assert (first["decision"], first["reason"]) == ("accept", "ok"), first

            dom.revertToSnapshot(snap)  # running -> the shut-off state of 'cold'
            assert not dom.isActive()
            dom.create()  # boot the reverted disk
            # Events are delivered in order: once the second boot is in, the revert's events are too.
            async def booted_twice() -> bool | None:
                n = await count("vm.started")()
                return True if n is not None and n >= 2 else None
            await _eventually(booted_twice, "no second vm.started", diagnose)

            status, replay = await service.call("POST", "/v1/otp/verify", "callout", login)
            assert status == 200, replay
            assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay
    finally:
        relay.stop()
        conn.close()
