"""FreeRADIUS 3.2 with deploy/freeradius's rest module and site, asked by `radclient`/`radtest`.

The test writes a minimal radiusd.conf into a private directory that includes the shipped
module, site and ENV files unchanged, listens on a free UDP port of 127.0.0.1, and runs
`freeradius -f -l stdout -d DIR` as an ordinary process against a real `replayguard serve`
(or, where the test needs the service to lie, a stand-in).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from replayguard.settings import Settings
from tests.conftest import REPO, dead_url, front_counts, service_with_tokens, uid

DEPLOY = REPO / "deploy" / "freeradius"
FREERADIUS = shutil.which("freeradius") or shutil.which("radiusd")
REST_MODULE = Path("/usr/lib/freeradius/rlm_rest.so")
PERIOD = 30

pytestmark = pytest.mark.skipif(
    FREERADIUS is None or shutil.which("radclient") is None or shutil.which("radtest") is None
    or not REST_MODULE.exists(),
    reason="needs freeradius, freeradius-utils and freeradius-rest (apt)",
)

RADIUSD_CONF = """\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
confdir = {dir}
raddbdir = {dir}
modconfdir = {dir}/mods-config
logdir = {dir}/log
radacctdir = {dir}/radacct
run_dir = {dir}/run
db_dir = {dir}
libdir = /usr/lib/freeradius
pidfile = {dir}/run/radiusd.pid
name = freeradius
max_request_time = 30
cleanup_delay = 0
max_requests = 1024
hostname_lookups = no

log {{
	destination = stdout
	auth = yes
	auth_badpass = no
	auth_goodpass = no
}}

security {{
	allow_core_dumps = no
	max_attributes = 200
	reject_delay = 0
	status_server = no
	allow_vulnerable_openssl = yes
}}

thread pool {{
	start_servers = 2
	max_servers = 8
	min_spare_servers = 1
	max_spare_servers = 4
	max_requests_per_server = 0
}}

ENV {{
$INCLUDE {deploy}/radiusd-env.conf
}}

client test {{
	ipaddr = 127.0.0.1
	secret = {secret}
	shortname = test
	{vm_id_line}
}}

listen {{
	type = auth
	ipaddr = 127.0.0.1
	port = {port}
	virtual_server = replayguard
}}

modules {{
	always ok {{
		rcode = ok
	}}
	always reject {{
		rcode = reject
	}}
	$INCLUDE {deploy}/mods-available/replayguard
}}

$INCLUDE {deploy}/sites-available/replayguard
"""


@dataclass
class Radius:
    port: int
    secret: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    vm_id: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(directory: Path, port: int, secret: str, vm_id: str | None = "radius-test-vm") -> None:
    for sub in ("log", "run", "radacct", "mods-config"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    vm_id_line = f"vm_id = {vm_id}" if vm_id else ""
    (directory / "radiusd.conf").write_text(RADIUSD_CONF.format(dir=directory, deploy=DEPLOY, port=port, secret=secret,
                                                                vm_id_line=vm_id_line))


def wait_listening(radius: Radius, timeout: float = 30) -> None:
    """Waits until radiusd says it is ready (or died), from its own log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Ready to process requests" in radius.log():
            return
        if radius.proc.poll() is not None:
            raise RuntimeError(f"freeradius exited with {radius.proc.returncode}:\n{radius.log()}")
        time.sleep(0.05)
    raise TimeoutError(f"freeradius not ready:\n{radius.log()}")


@pytest.fixture
def start_radius(tmp_path: Path) -> Iterator[Callable[..., Radius]]:
    """Starts freeradius on a private config dir; stops it by its pid afterwards."""
    started: list[Radius] = []

    def start(service_url: str, token: str, *, vm_id: str | None = "", env: dict[str, str] | None = None) -> Radius:
        directory = tmp_path / f"raddb-{len(started)}"
        port, secret = free_port_udp(), secrets.token_hex(12)
        vm_id = uid("radvm") if vm_id == "" else vm_id
        write_config(directory, port, secret, vm_id)
        log_path = directory / "radiusd.out"
        environment = {"REPLAYGUARD_URL": service_url, "REPLAYGUARD_TOKEN": token,
                       "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})}
        assert FREERADIUS is not None
        with log_path.open("wb") as out:
            proc = subprocess.Popen([FREERADIUS, "-f", "-l", "stdout", "-d", str(directory)], env=environment,
                                    stdout=out, stderr=subprocess.STDOUT)
        radius = Radius(port, secret, proc, log_path, vm_id)
        started.append(radius)
        wait_listening(radius)
        return radius

    yield start
    for radius in started:
        if radius.proc.poll() is None:
            radius.proc.terminate()
            radius.proc.wait(timeout=15)


def free_port_udp() -> int:
    """A port free for UDP on 127.0.0.1 (free_port checks TCP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Host:
    url: str
    tokens: dict[str, str]

    async def enroll(self, principal: str) -> pyotp.TOTP:
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.url}/v1/principals/{principal}/tokens", json={"type": "totp"},
                headers={"Authorization": f"Bearer {self.tokens['admin']}"}) as resp:
            data: dict[str, Any] = await resp.json()
            assert resp.status == 201, data
        return pyotp.TOTP(data["secret"])

    async def ledger_vms(self, *vm_ids: str) -> dict[str, int]:
        """How many ledger entries each VM has."""
        counts = {}
        async with aiohttp.ClientSession() as session:
            for vm_id in vm_ids:
                async with session.get(f"{self.url}/v1/ledger", params={"vm_id": vm_id},
                                       headers={"Authorization": f"Bearer {self.tokens['analyst']}"}) as resp:
                    data: dict[str, Any] = await resp.json()
                    assert resp.status == 200, data
                counts[vm_id] = len(data["items"])
        return counts


@pytest.fixture
async def host(make_settings: Callable[..., Settings], service_factory: Callable[..., Any]) -> Host:
    """A real service process, with tokens made over its own data dir's keys."""
    return Host(*await service_with_tokens(make_settings(), service_factory, ("admin", "callout", "analyst")))


def radclient(radius: Radius, **attributes: str) -> subprocess.CompletedProcess[str]:
    """One Access-Request through `radclient` (text in UTF-8); exit 0 on Access-Accept, 1 on Access-Reject."""
    lines = ", ".join(f'{name.replace("_", "-")} = "{value}"' for name, value in attributes.items())
    return subprocess.run(["radclient", "-x", "-r", "1", "-t", "10", f"127.0.0.1:{radius.port}", "auth",
                           radius.secret], input=lines + "\n", capture_output=True, text=True, timeout=60)


def wait_for_fresh_step() -> None:
    """Waits, when a TOTP step is about to end, so a test's code stays inside the drift window."""
    left = PERIOD - time.time() % PERIOD
    if left < 5:
        time.sleep(left + 0.2)


async def test_accept_then_replay_refused(host: Host, start_radius: Callable[..., Radius]) -> None:
    """A valid code is an Access-Accept once; the same code again is an Access-Reject saying
    it was used. rlm_rest's requests are answered by the fast front, not handed to aiohttp."""
    radius = start_radius(host.url, host.tokens["callout"])
    user = uid("alice")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    code = totp.now()
    before = await front_counts(host.url)
    first = radclient(radius, User_Name=user, User_Password=code, NAS_Identifier=uid("nas"))
    assert first.returncode == 0 and "Access-Accept" in first.stdout, first.stdout + radius.log()
    second = radclient(radius, User_Name=user, User_Password=code, NAS_Identifier=uid("nas"))
    assert second.returncode == 1 and "Access-Reject" in second.stdout
    assert "One-time password already used" in second.stdout
    after = await front_counts(host.url)
    assert {name: after[name] - before[name] for name in after} == {
        "replayguard_http_fast_answers_total": 2,
        'replayguard_http_front_handoffs_total{outcome="aiohttp"}': 1,  # the second scrape
        'replayguard_http_front_handoffs_total{outcome="closed"}': 0}


async def test_wrong_code_rejected_with_reply_message(host: Host, start_radius: Callable[..., Radius]) -> None:
    """A wrong code is an Access-Reject carrying the service's Reply-Message and not the code."""
    radius = start_radius(host.url, host.tokens["callout"])
    user = uid("bob")
    totp = await host.enroll(user)
    near = {totp.at(time.time() + k * PERIOD) for k in range(-3, 4)}
    wrong = next(code for code in ("000000", "111111", "222222", "333333") if code not in near)
    result = radclient(radius, User_Name=user, User_Password=wrong, NAS_Identifier=uid("nas"))
    assert result.returncode == 1 and "Access-Reject" in result.stdout
    assert "Invalid one-time password" in result.stdout


async def test_radtest_is_recorded_against_the_clients_vm_id(host: Host, start_radius: Callable[..., Radius]) -> None:
    """`radtest` (which sends NAS-IP-Address, no NAS-Identifier) is accepted once, then refused,
    both recorded against the client's vm_id."""
    radius = start_radius(host.url, host.tokens["callout"])
    user = uid("carol")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    code = totp.now()
    args = ["radtest", user, code, f"127.0.0.1:{radius.port}", "0", radius.secret]
    first = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "Access-Accept" in first.stdout, first.stdout + radius.log()
    second = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "Access-Reject" in second.stdout
    assert radius.vm_id is not None and (await host.ledger_vms(radius.vm_id))[radius.vm_id] >= 2


async def test_bad_token_and_dead_service_reject(host: Host, start_radius: Callable[..., Radius]) -> None:
    """A wrong callout token (401) and an unreachable service (fail) are both Access-Reject."""
    user = uid("dave")
    totp = await host.enroll(user)
    with dead_url() as dead:
        for url, token in ((host.url, "rgt_not-a-token"), (dead, host.tokens["callout"])):
            radius = start_radius(url, token)
            result = radclient(radius, User_Name=user, User_Password=totp.now(), NAS_Identifier=uid("nas"))
            assert result.returncode == 1 and "Access-Reject" in result.stdout, result.stdout + radius.log()


def test_shipped_clients_example_is_valid_config(tmp_path: Path) -> None:
    """`freeradius -C` accepts the module, the site and the clients example together."""
    write_config(tmp_path, free_port_udp(), secrets.token_hex(12))
    conf = tmp_path / "radiusd.conf"
    conf.write_text(conf.read_text() + f"\n$INCLUDE {DEPLOY}/clients.conf.example\n")
    assert FREERADIUS is not None
    result = subprocess.run([FREERADIUS, "-C", "-d", str(tmp_path)], capture_output=True, text=True, timeout=60,
                            env={"REPLAYGUARD_URL": "http://127.0.0.1:9", "REPLAYGUARD_TOKEN": "rgt_x",
                                 "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


async def test_nas_identifier_of_the_request_cannot_name_another_vm(
    host: Host, start_radius: Callable[..., Radius],
) -> None:
    """A client whose vm_id is web-01 claiming NAS-Identifier web-02 is recorded against web-01, never web-02."""
    radius = start_radius(host.url, host.tokens["callout"])
    user, claimed = uid("erin"), uid("web-02")
    totp = await host.enroll(user)
    wait_for_fresh_step()
    result = radclient(radius, User_Name=user, User_Password=totp.now(), NAS_Identifier=claimed)
    assert result.returncode == 0, result.stdout + radius.log()
    assert radius.vm_id is not None
    assert await host.ledger_vms(radius.vm_id, claimed) == {radius.vm_id: 1, claimed: 0}


async def test_a_client_without_vm_id_is_refused(host: Host, start_radius: Callable[..., Radius]) -> None:
    """A RADIUS client defined without vm_id gets Access-Reject, even with a valid code and a NAS-Identifier."""
    radius = start_radius(host.url, host.tokens["callout"], vm_id=None)
    user = uid("frank")
    totp = await host.enroll(user)
    result = radclient(radius, User_Name=user, User_Password=totp.now(), NAS_Identifier=uid("nas"))
    assert result.returncode == 1 and "no vm_id" in result.stdout, result.stdout + radius.log()


@dataclass
class StandIn:
    """An HTTP server that answers every POST the same way (a liar on the service's URL or a proxy)."""

    answer: Callable[[], web.Response]
    calls: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.read()
        return self.answer()


@pytest.fixture
async def stand_in() -> AsyncIterator[Callable[[Callable[[], web.Response]], Any]]:
    """Starts stand-in servers on loopback; closes them after."""
    servers: list[TestServer] = []

    async def start(answer: Callable[[], web.Response]) -> tuple[StandIn, str]:
        liar = StandIn(answer)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", liar.handle)
        servers.append(TestServer(app, host="127.0.0.1"))
        await servers[-1].start_server()
        return liar, str(servers[-1].make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


LIES: dict[str, Callable[[], web.Response]] = {
    "204": lambda: web.Response(status=204),
    "empty 200": lambda: web.Response(status=200),
    "html 200": lambda: web.Response(status=200, text="<html><body>Welcome</body></html>", content_type="text/html"),
    "empty json 200": lambda: web.json_response({}),
    "reply attribute 200": lambda: web.json_response({"reply:Reply-Message": "ok"}),
    "wrong marker 200": lambda: web.json_response({"control:Tmp-String-0": "accept"}),
}


@pytest.mark.parametrize("lie", list(LIES))
async def test_anything_but_the_explicit_accept_is_a_reject(
    stand_in: Callable[..., Any], start_radius: Callable[..., Radius], lie: str
) -> None:
    """A 2xx that is not the service's explicit accept (status and marker) is Access-Reject."""
    liar, url = await stand_in(LIES[lie])
    radius = start_radius(url, "rgt_any")
    # in a thread: the stand-in answers from this test's event loop
    result = await asyncio.to_thread(radclient, radius, User_Name="mallory", User_Password="000000")
    assert liar.calls == 1, radius.log()
    assert result.returncode == 1 and "Access-Reject" in result.stdout, result.stdout + radius.log()


async def test_a_proxy_in_radiusds_environment_is_not_used(
    host: Host, stand_in: Callable[..., Any], start_radius: Callable[..., Radius]
) -> None:
    """http_proxy/HTTP_PROXY/all_proxy in radiusd's environment are ignored: a proxy that would
    accept everything sees nothing, and a wrong code stays rejected by the real service."""
    proxy, proxy_url = await stand_in(lambda: web.json_response({"control:Tmp-String-0": "replayguard-accept"}))
    env = dict.fromkeys(("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy", "ALL_PROXY"), proxy_url)
    radius = start_radius(host.url, host.tokens["callout"], env=env)
    user = uid("grace")
    totp = await host.enroll(user)
    near = {totp.at(time.time() + k * PERIOD) for k in range(-3, 4)}
    wrong = next(code for code in ("000000", "111111", "222222", "333333") if code not in near)
    # in a thread: the stand-in proxy would answer from this test's event loop
    result = await asyncio.to_thread(radclient, radius, User_Name=user, User_Password=wrong)
    assert result.returncode == 1 and "Invalid one-time password" in result.stdout, result.stdout + radius.log()
    wait_for_fresh_step()
    assert (await asyncio.to_thread(radclient, radius, User_Name=user, User_Password=totp.now())).returncode == 0
    assert proxy.calls == 0


@pytest.mark.parametrize("name", ["jürgen", "用户", "u\u0308ber"])
async def test_utf8_user_names_reach_the_service_intact(
    host: Host, start_radius: Callable[..., Radius], name: str
) -> None:
    """A UTF-8 user name through real radclient and rlm_rest is the enrolled principal: accepted once, then refused."""
    radius = start_radius(host.url, host.tokens["callout"])
    user = f"{name}-{uid('u')}"
    totp = await host.enroll(user)
    wait_for_fresh_step()
    code = totp.now()
    first = radclient(radius, User_Name=user, User_Password=code)
    assert first.returncode == 0, first.stdout + radius.log()
    second = radclient(radius, User_Name=user, User_Password=code)
    assert second.returncode == 1 and "One-time password already used" in second.stdout


async def test_precomposed_and_decomposed_names_stay_apart(host: Host, start_radius: Callable[..., Radius]) -> None:
    """No normalisation: the code of 'ü' (U+00FC) is refused for 'u'+U+0308, and 'Ã¼' is not 'ü'."""
    radius = start_radius(host.url, host.tokens["callout"])
    suffix = uid("n")
    totp = await host.enroll(f"\u00fc-{suffix}")
    wait_for_fresh_step()
    code = totp.now()
    for other in (f"u\u0308-{suffix}", f"\u00c3\u00bc-{suffix}"):
        result = radclient(radius, User_Name=other, User_Password=code)
        assert result.returncode == 1 and "Invalid one-time password" in result.stdout, result.stdout + radius.log()
    assert radclient(radius, User_Name=f"\u00fc-{suffix}", User_Password=code).returncode == 0
