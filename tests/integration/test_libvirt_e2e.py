"""The seed attack with every part real: libvirtd → the relay process → the replayguard service.

A private libvirtd (test driver, see ``libvirt_support``) holds a domain of a unique name;
the real relay process (``replayguard relay libvirt``) watches it and posts to a real
``replayguard serve`` process on the test's database. The test enrolls a TOTP token,
snapshots the domain, logs in with a code, reverts the domain with libvirt itself and
replays the code: the service, told of the revert only by the relay, refuses it as
``replay_after_rollback`` with a critical alert.

The service runs with ``totp_drift_steps = 2`` so a code stays valid for at least 60 s
after its login, longer than the bounded wait between login and replay: the replay is
refused for being a replay, never for having expired.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pyotp
import pytest

from tests.conftest import REPO, cli_env, run_cli, uid
from tests.integration.libvirt_support import (
    DOMAIN_XML,
    libvirt,
    private_libvirtd,
    requires_libvirt,
)

pytestmark = requires_libvirt

WAIT = 30.0  # every wait is bounded; pytest-timeout is the outer bound
HOST = "hv-e2e"
SNAPSHOT = "pre-login"
T = TypeVar("T")


@dataclass
class Relay:
    """The relay process and its log."""

    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Service:
    """The service process's URL and a token per role, over one HTTP session."""

    url: str
    tokens: dict[str, str]
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, role: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.fixture
def libvirt_uri() -> Iterator[str]:
    """A private libvirtd of this test's own."""
    with private_libvirtd() as daemon:
        yield daemon.uri


async def _create_token(role: str, database_url: str, data_dir: Path) -> str:
    done = await asyncio.to_thread(run_cli, "token", "create", "--role", role, "--name", uid(role),
                                   "--database-url", database_url, "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _start_relay(uri: str, service_url: str, token: str, root: Path) -> Relay:
    token_file = root / "relay-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    log = root / "relay.log"
    cmd = [sys.executable, "-m", "replayguard", "relay", "libvirt", "--uri", uri,
           "--service-url", service_url, "--token-file", str(token_file),
           "--spool-dir", str(root / "spool"), "--poll-interval", "1", "--host", HOST]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=cli_env())
    return Relay(proc, log)


async def _eventually(probe: Callable[[], Awaitable[T | None]], what: str, diagnose: Callable[[], str]) -> T:
    """Call ``probe`` until it returns something; fail with ``diagnose()`` after WAIT seconds."""
    try:
        async with asyncio.timeout(WAIT):
            while (found := await probe()) is None:
                await asyncio.sleep(0.2)
            return found
    except TimeoutError:
        pytest.fail(f"{what} within {WAIT:.0f} s\n{diagnose()}")


async def test_real_revert_through_the_relay_makes_the_replay_replay_after_rollback(
    libvirt_uri: str, database_url: str, service_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """A real libvirt revert, reported by the real relay, makes the replayed TOTP code replay_after_rollback."""
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
                assert relay.proc.poll() is None, f"relay exited with {relay.proc.returncode}\n{diagnose()}"
                return True if "libvirt_connected" in relay.text() else None

            await _eventually(connected, "the relay did not connect to libvirtd", diagnose)

            principal = uid("alice")
            status, enrolled = await service.call("POST", f"/v1/principals/{principal}/tokens", "admin",
                                                  {"type": "totp"})
            assert status == 201, enrolled
            totp = pyotp.TOTP(enrolled["secret"])

            vm_id = uid("rg-e2e")  # the domain's name is the VM id
            dom = conn.defineXML(DOMAIN_XML.format(name=vm_id))
            dom.create()
            snap = dom.snapshotCreateXML(f"<domainsnapshot><name>{SNAPSHOT}</name></domainsnapshot>")

            def recorded(event_type: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
                async def probe() -> dict[str, Any] | None:
                    status, page = await service.call("GET", f"/v1/vms/{vm_id}/timeline", "admin")
                    if status == 404:  # the VM is known once its first event is in the ledger
                        return None
                    assert status == 200, page
                    return next((item["event"] for item in page["items"]
                                 if item.get("event", {}).get("type") == event_type), None)
                return probe

            created = await _eventually(recorded("snapshot.created"), "no snapshot.created in the ledger", diagnose)
            assert created["payload"]["snapshot_id"] == SNAPSHOT, created

            code = totp.now()
            login = {"vm_id": vm_id, "principal": principal, "otp": code}
            status, first = await service.call("POST", "/v1/otp/verify", "callout", login)
            assert status == 200 and (first["decision"], first["reason"]) == ("accept", "ok"), first

            dom.revertToSnapshot(snap)
            reverted = await _eventually(recorded("snapshot.reverted"), "no snapshot.reverted in the ledger", diagnose)
            payload = reverted["payload"]
            assert (payload["source"], payload["host"], payload["snapshot_id"]) == ("libvirt", HOST, SNAPSHOT)
            assert payload["extra"]["domain_uuid"] == dom.UUIDString(), payload

            status, replay = await service.call("POST", "/v1/otp/verify", "callout", login)
            assert status == 200, replay
            assert (replay["decision"], replay["reason"]) == ("reject", "replay_after_rollback"), replay
            assert replay["alert_id"], replay

            status, alert = await service.call("GET", f"/v1/alerts/{replay['alert_id']}", "admin")
            assert status == 200, alert
            assert (alert["kind"], alert["severity"]) == ("replay_after_rollback", "critical"), alert
            assert (alert["vm_id"], alert["principal"]) == (vm_id, principal)
            assert alert["details"]["first_seq"] == first["seq"], "the login before the revert is the one at risk"
            assert [w["event_id"] for w in alert["rollback_windows"]] == [reverted["event_id"]]
    finally:
        relay.stop()
        conn.close()
