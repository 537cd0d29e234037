"""FreeRADIUS 3.2 with deploy/freeradius's rest module and site, asked by `radclient`/`radtest`.

The test writes a minimal radiusd.conf into a private directory that includes the shipped
module and site files unchanged, listens on a free UDP port of 127.0.0.1, and runs
`freeradius -f -l stdout -d DIR` as an ordinary process against a real `replayguard serve`.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest

from replayguard.runtime import open_runtime
from replayguard.settings import Settings
from tests.conftest import REPO, free_port, front_counts, uid

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

client test {{
	ipaddr = 127.0.0.1
	secret = {secret}
	shortname = test
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_config(directory: Path, port: int, secret: str) -> None:
    for sub in ("log", "run", "radacct", "mods-config"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "radiusd.conf").write_text(RADIUSD_CONF.format(dir=directory, deploy=DEPLOY, port=port, secret=secret))


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
def start_radius(tmp_path: Path) -> Iterator[Callable[[str, str], Radius]]:
    """Starts freeradius on a private config dir; stops it by its pid afterwards."""
    started: list[Radius] = []

    def start(service_url: str, token: str) -> Radius:
        directory = tmp_path / f"raddb-{len(started)}"
        port, secret = free_port_udp(), secrets.token_hex(12)
        write_config(directory, port, secret)
        log_path = directory / "radiusd.out"
        env = {"REPLAYGUARD_URL": service_url, "REPLAYGUARD_TOKEN": token, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        assert FREERADIUS is not None
        with log_path.open("wb") as out:
            proc = subprocess.Popen([FREERADIUS, "-f", "-l", "stdout", "-d", str(directory)], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        radius = Radius(port, secret, proc, log_path)
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
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/v1/principals/{principal}/tokens", json={"type": "totp"},
                                    headers={"Authorization": f"Bearer {self.tokens['admin']}"}) as resp:
                data: dict[str, Any] = await resp.json()
                assert resp.status == 201, data
        return pyotp.TOTP(data["secret"])


@pytest.fixture
async def host(make_settings: Callable[..., Settings], service_factory: Callable[..., Any]) -> Host:
    """A real service process, with tokens made over its own data dir's keys."""
    settings: Settings = make_settings()
    tokens = {}
    async with open_runtime(settings, migrate=False) as runtime:
        for role in ("admin", "callout"):
            _, tokens[role] = await runtime.api_tokens.create(role, uid(role))
    assert settings.database_url is not None
    service = await service_factory(data_dir=settings.data_dir, database_url=settings.database_url.reveal())
    return Host(service.url, tokens)


def radclient(radius: Radius, **attributes: str) -> subprocess.CompletedProcess[str]:
    """One Access-Request through `radclient`; exit 0 on Access-Accept, 1 on Access-Reject."""
    lines = ", ".join(f'{name.replace("_", "-")} = "{value}"' for name, value in attributes.items())
    return subprocess.run(["radclient", "-x", "-r", "1", "-t", "10", f"127.0.0.1:{radius.port}", "auth",
                           radius.secret], input=lines + "\n", capture_output=True, text=True, timeout=60)


def wait_for_fresh_step() -> None:
    """Waits, when a TOTP step is about to end, so a test's code stays inside the drift window."""
    left = PERIOD - time.time() % PERIOD
    if left < 5:
        time.sleep(left + 0.2)


async def test_accept_then_replay_refused(host: Host, start_radius: Callable[[str, str], Radius]) -> None:
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


async def test_wrong_code_rejected_with_reply_message(host: Host, start_radius: Callable[[str, str], Radius]) -> None:
    """A wrong code is an Access-Reject carrying the service's Reply-Message and not the code."""
    radius = start_radius(host.url, host.tokens["callout"])
    user = uid("bob")
    totp = await host.enroll(user)
    near = {totp.at(time.time() + k * PERIOD) for k in range(-3, 4)}
    wrong = next(code for code in ("000000", "111111", "222222", "333333") if code not in near)
    result = radclient(radius, User_Name=user, User_Password=wrong, NAS_Identifier=uid("nas"))
    assert result.returncode == 1 and "Access-Reject" in result.stdout
    assert "Invalid one-time password" in result.stdout


async def test_radtest_uses_nas_ip_address(host: Host, start_radius: Callable[[str, str], Radius]) -> None:
    """`radtest` (which sends NAS-IP-Address, no NAS-Identifier) is accepted once, then refused."""
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


async def test_bad_token_and_dead_service_reject(host: Host, start_radius: Callable[[str, str], Radius]) -> None:
    """A wrong callout token (401) and an unreachable service (fail) are both Access-Reject."""
    user = uid("dave")
    totp = await host.enroll(user)
    for url, token in ((host.url, "rgt_not-a-token"), (f"http://127.0.0.1:{free_port()}", host.tokens["callout"])):
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
