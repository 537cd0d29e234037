"""External sinks against real receivers on 127.0.0.1: file, syslog UDP/TCP, webhook, outbox."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import hmac
import inspect
import multiprocessing
import os
import re
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from replayguard.core.ledger_check import Finding, Problem
from replayguard.core.signatures import verify_signature
from replayguard.errors import ConfigError
from replayguard.http.state import ANALYSTS
from replayguard.services import alertfeed_sinks
from replayguard.services.alertfeed import AlertFeed
from replayguard.settings import Secret
from replayguard.sinks import (
    Backoff,
    SinkConfig,
    SinkDispatcher,
    parse_sink,
    parse_sink_spec,
    webhook_signature_headers,
)
from replayguard.sinks import dispatcher as dispatcher_module
from replayguard.sinks.outbox import Spool
from tests.api.test_analysts import reuse_alert
from tests.conftest import Api, dead_url, seed_keys, uid
from tests.waiting import blocked_by, until

FAST = Backoff(base=0.01, factor=2.0, cap=0.05)
SYSLOG_RE = re.compile(rb"^<(\d+)>1 (\S+) (\S+) replayguard (\d+) (alert|checkpoint) - (CEF:0\|.*)$")


def _dispatcher(feed: AlertFeed) -> SinkDispatcher:
    """The instance's sink delivery: there is one whenever sinks are configured, as here."""
    dispatcher = feed.sinks.dispatcher
    assert dispatcher is not None, "no sinks configured"
    return dispatcher


def alert(i: int, severity: str = "warning") -> dict[str, object]:
    return {
        "type": "alert", "id": f"al-{i}", "kind": "reuse", "severity": severity, "status": "open",
        "vm_id": "web-01", "principal": "alice", "count": 1, "first_seen": "2026-11-29T10:05:00Z",
        "last_seen": "2026-11-29T10:05:00Z", "summary": f"OTP reused #{i}",
    }  # fmt: skip


def bound_socket() -> socket.socket:
    """A TCP socket bound to a port the kernel chose and kept: connections are refused until the
    server listens on it, and no other process can take the port in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def ids_of(records: list[dict[str, Any]]) -> list[str]:
    return [str(r["id"]) for r in records]


def file_ids(path: Path) -> list[str]:
    return [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()] if path.exists() else []


class WebhookServer:
    """An aiohttp receiver that can be down, fail its first N requests, hang, or refuse ids."""

    def __init__(self, *, fail_first: int = 0, hang: bool = False, refuse: str = "") -> None:
        self.sock = bound_socket()
        self.port: int = self.sock.getsockname()[1]
        self.fail_left, self.hang, self.refuse = fail_first, hang, refuse
        self.failing = False
        self.received: list[dict[str, Any]] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.hang:
            await self.release.wait()
        if self.failing or self.fail_left > 0:
            self.fail_left -= 1
            return web.Response(status=500)
        if orjson.loads(body)["id"] == self.refuse:
            return web.Response(status=422)
        self.received.append(orjson.loads(body))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        self.sock.close()

    @property
    def spec(self) -> str:
        return f"webhook:http://127.0.0.1:{self.port}/hook"


class TcpSyslog:
    """A syslog receiver with RFC 6587 octet-counting framing."""

    def __init__(self) -> None:
        self.sock = bound_socket()
        self.port: int = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                length = await reader.readuntil(b" ")
                self.messages.append(await reader.readexactly(int(length[:-1])))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
        self.sock.close()


class UdpSyslog(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.messages.append(data)


def syslog_ids(messages: list[bytes]) -> list[str]:
    """The externalId of every message, checking each is a well-formed RFC 5424 + CEF message."""
    ids = []
    for message in messages:
        match = SYSLOG_RE.match(message)
        assert match is not None, message
        found = re.search(rb"externalId=(\S+)", match.group(6))
        assert found is not None
        ids.append(found.group(1).decode())
    return ids


@pytest.fixture
async def dispatchers() -> AsyncIterator[list[SinkDispatcher]]:
    made: list[SinkDispatcher] = []
    yield made
    for dispatcher in made:
        await dispatcher.stop(timeout=0.2)


@pytest.fixture
async def servers() -> AsyncIterator[list[WebhookServer | TcpSyslog]]:
    made: list[WebhookServer | TcpSyslog] = []
    yield made
    for server in made:
        await server.stop()


async def started(made: list[SinkDispatcher], specs: list[str | SinkConfig], spool: Path,
                  **options: Any) -> SinkDispatcher:  # fmt: skip
    configs = [s if isinstance(s, SinkConfig) else parse_sink_spec(s) for s in specs]
    options.setdefault("backoff", FAST)
    dispatcher = SinkDispatcher(configs, spool_dir=spool, hostname="hv-test", **options)
    made.append(dispatcher)
    await dispatcher.start()
    return dispatcher


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("file:/var/log/replayguard/alerts.jsonl", {"kind": "file", "path": Path("/var/log/replayguard/alerts.jsonl")}),
        ("file:///var/log/x.jsonl", {"kind": "file", "path": Path("/var/log/x.jsonl")}),
        ("syslog+udp://127.0.0.1:514", {"transport": "udp", "host": "127.0.0.1", "port": 514, "facility": 10}),
        ("syslog+udp://127.0.0.1", {"transport": "udp", "port": 514}),
        ("syslog+tcp://127.0.0.1", {"transport": "tcp", "port": 601}),
        ("syslog+tcp://127.0.0.1:601?facility=authpriv", {"transport": "tcp", "facility": 10}),
        ("syslog+tcp://localhost:6514?facility=local3", {"host": "localhost", "port": 6514, "facility": 19}),
        ("syslog+udp://[::1]:514?facility=4", {"host": "::1", "facility": 4}),
        ("webhook:https://127.0.0.1:8443/hook?a=1", {"kind": "webhook", "url": "https://127.0.0.1:8443/hook?a=1"}),
        ("  webhook:http://localhost/h  ", {"kind": "webhook", "url": "http://localhost/h"}),
    ],
)
def test_parse_sink_spec(spec: str, expected: dict[str, object]) -> None:
    """Each spec form yields a config with these fields and a stable generated name."""
    config = parse_sink_spec(spec)
    for key, value in expected.items():
        assert getattr(config, key) == value
    assert config.name.startswith(config.kind + "-") and config.name == parse_sink_spec(spec).name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected file:, syslog"),
        ("ftp://127.0.0.1/x", "expected file:, syslog"),
        ("syslog://127.0.0.1", "syslog\\+udp:// or syslog\\+tcp://"),
        ("file:", "absolute path"),
        ("file:relative/alerts.jsonl", "must be absolute"),
        ("file:/var/log/", "names a directory"),
        ("syslog+udp://:514", "host is required"),
        ("syslog+tcp://127.0.0.1:99999", "port must be"),
        ("syslog+tcp://127.0.0.1:abc", "port must be"),
        ("syslog+tcp://127.0.0.1:0", "port must be"),
        ("syslog+tcp://127.0.0.1/path", "only host, port"),
        ("syslog+tcp://127.0.0.1?facility=bogus", "unknown facility 'bogus'"),
        ("syslog+tcp://127.0.0.1?facility=24", "unknown facility '24'"),
        ("syslog+tcp://127.0.0.1?fac=1", "unknown option 'fac'"),
        ("webhook:ftp://127.0.0.1/x", "http:// or https://"),
        ("webhook:", "http:// or https://"),
        ("webhook:https://127.0.0.1:70000/h", "port must be"),
        ("webhook:https://user:hunter2@127.0.0.1/h", "credentials do not belong"),
        ("https://user:hunter2@127.0.0.1/h", "expected file:, syslog"),
        ("syslog+tcp://user:hunter2@127.0.0.1", "only host, port"),
        ("syslog+tcp://user:hunter2@127.0.0.1:x", "port must be"),
    ],
)
def test_parse_sink_spec_errors(spec: str, message: str) -> None:
    """Bad specs raise ValueError with an actionable message that never echoes a URL password."""
    with pytest.raises(ValueError, match=message) as info:
        parse_sink_spec(spec)
    assert "hunter2" not in str(info.value)


TOKEN_IN_URL = "SECRET0f3a9c2e7b"


@pytest.mark.parametrize("spec", [
    f"splunk+https://splunk.example:8088?token={TOKEN_IN_URL}",  # the HEC token in the URL, not ?token_file=
    f"webhok:https://hooks.slack.com/services/T0/B0/{TOKEN_IN_URL}",  # a misspelt scheme; the path is the secret
    f"ecs+splunk+https://splunk.example:8088?token_file=/t&x={TOKEN_IN_URL}",
    f"syslog+tcp://127.0.0.1/{TOKEN_IN_URL}",
    f"syslog://127.0.0.1/x#{TOKEN_IN_URL}",
])
def test_a_refused_spec_is_named_without_its_path_or_query(spec: str) -> None:
    """A refused sink is named by scheme and host alone, as describe() names a sink: a URL's path or query may hold a
    token."""
    with pytest.raises(ValueError, match="sink '") as info:
        parse_sink_spec(spec)
    assert TOKEN_IN_URL not in str(info.value)


def test_parse_sink_secret_and_name() -> None:
    """A dict carries the webhook secret and a name; the config's repr never shows the secret."""
    config = parse_sink({"spec": "webhook:https://127.0.0.1/h", "secret": "s3cr3t-value", "name": "soc"})
    assert config.name == "soc" and config.secret == Secret("s3cr3t-value")
    assert "s3cr3t-value" not in repr(config) and "s3cr3t-value" not in config.describe()
    with pytest.raises(ValueError, match="only webhook"):
        parse_sink_spec("file:/x.jsonl", secret=Secret("x"))
    with pytest.raises(ValueError, match="sink name"):
        parse_sink({"spec": "file:/x.jsonl", "name": "../etc"})
    with pytest.raises(ValueError, match="needs a 'spec'"):
        parse_sink({"url": "file:/x.jsonl"})


def test_duplicate_sink_names_refused(tmp_path: Path) -> None:
    """Two sinks with one name would share a spool, so the dispatcher refuses them."""
    with pytest.raises(ValueError, match="unique"):
        SinkDispatcher([parse_sink_spec("file:/a.jsonl")] * 2, spool_dir=tmp_path)


@pytest.mark.parametrize(
    ("attempt", "rand", "delay"),
    [(0, 0.0, 0.25), (0, 1.0, 0.5), (1, 0.0, 0.5), (3, 0.5, 3.0), (6, 1.0, 30.0), (10_000, 0.0, 15.0)],
)
def test_backoff_delay(attempt: int, rand: float, delay: float) -> None:
    """Backoff doubles per attempt from 0.5 s, is capped at 30 s, and jitters within the upper half."""
    assert Backoff().delay(attempt, rand) == pytest.approx(delay)


def test_webhook_signature_vector() -> None:
    """A webhook is signed like a hypervisor event: timestamp header, v1=HMAC-SHA256 over "<t>.<body>" in hex."""
    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    headers = webhook_signature_headers(b"k", 1700000000, b"{}")
    assert headers == {"X-Replayguard-Timestamp": "1700000000", "X-Replayguard-Signature": f"v1={expected}"}
    verify_signature(b"k", headers["X-Replayguard-Timestamp"], b"{}", headers["X-Replayguard-Signature"],
                     now=1700000010, tolerance_s=300)  # the events' own check accepts it


# --------------------------------------------------------------------------- sinks


async def test_file_sink_appends_lines_mode_0600(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """The file sink creates the file 0600 and appends one JSON line per record after existing content."""
    target = tmp_path / "log" / "alerts.jsonl"
    dispatcher = await started(dispatchers, [f"file:{target}"], tmp_path / "spool")
    for i in range(5):
        dispatcher.submit(alert(i))
    await until(lambda: len(file_ids(target)) == 5, "5 records in the file sink")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert orjson.loads(target.read_bytes().splitlines()[0]) == alert(0)
    dispatcher.submit(alert(5))
    await until(lambda: len(file_ids(target)) == 6, "6 records in the file sink")
    assert file_ids(target) == [f"al-{i}" for i in range(6)]


async def test_udp_syslog_delivers_cef(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """Each record reaches a UDP syslog receiver as one RFC 5424 datagram carrying CEF."""
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(UdpSyslog, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        spec = f"syslog+udp://127.0.0.1:{port}?facility=local0"
        dispatcher = await started(dispatchers, [spec], tmp_path)
        dispatcher.submit(alert(0, "critical"))
        dispatcher.submit(alert(1, "info"))
        await until(lambda: len(receiver.messages) == 2, "2 syslog messages")
    finally:
        transport.close()
    assert syslog_ids(receiver.messages) == ["al-0", "al-1"]
    assert receiver.messages[0].startswith(b"<130>1 ") and receiver.messages[1].startswith(b"<134>1 ")
    assert b" hv-test replayguard " in receiver.messages[0]
    assert b"|reuse|One-time credential reused|9|" in receiver.messages[0]


async def test_tcp_syslog_down_then_up(tmp_path: Path, dispatchers: list[SinkDispatcher],
                                       servers: list[WebhookServer | TcpSyslog]) -> None:  # fmt: skip
    """Records submitted while the TCP receiver refuses connections arrive framed, in order, once it listens."""
    receiver = TcpSyslog()
    servers.append(receiver)
    dispatcher = await started(dispatchers, [f"syslog+tcp://127.0.0.1:{receiver.port}"], tmp_path)
    for i in range(5):
        dispatcher.submit(alert(i))
    await until(lambda: dispatcher.stats()[dispatcher_name(dispatcher)].failed_attempts >= 2,
                "2 failed delivery attempts")
    await receiver.start()
    await until(lambda: len(receiver.messages) >= 5, "5 syslog messages")
    for i in range(5, 8):
        dispatcher.submit(alert(i))
    await until(lambda: len(receiver.messages) >= 8, "8 syslog messages")
    assert syslog_ids(receiver.messages) == [f"al-{i}" for i in range(8)]
    assert all(m.startswith(b"<84>1 ") for m in receiver.messages)


def dispatcher_name(dispatcher: SinkDispatcher) -> str:
    (name,) = dispatcher.stats()
    return name


async def test_webhook_fails_then_delivers_in_order_once(tmp_path: Path, dispatchers: list[SinkDispatcher],
                                                         servers: list[WebhookServer | TcpSyslog]) -> None:  # fmt: skip
    """A webhook refused (not started) then answering 500 three times gets every record, in order, once."""
    server = WebhookServer(fail_first=3)
    servers.append(server)
    dispatcher = await started(dispatchers, [server.spec], tmp_path)
    for i in range(10):
        dispatcher.submit(alert(i))
    name = dispatcher_name(dispatcher)
    await until(lambda: dispatcher.stats()[name].failed_attempts >= 2, "2 failed delivery attempts")
    assert dispatcher.stats()[name].backlog == 10
    await server.start()
    await until(lambda: dispatcher.stats()[name].backlog == 0, "the sink's backlog to drain")
    await dispatcher.stop(timeout=5)  # nothing is in flight after this: every delivery has happened
    assert ids_of(server.received) == [f"al-{i}" for i in range(10)]
    assert server.received[3] == alert(3)
    stats = dispatcher.stats()[name]
    assert (stats.delivered, stats.backlog, stats.rejected) == (10, 0, 0)
    assert stats.failed_attempts >= 5


async def test_webhook_signature_and_no_secret_in_logs(tmp_path: Path, dispatchers: list[SinkDispatcher],
                                                       servers: list[WebhookServer | TcpSyslog]) -> None:  # fmt: skip
    """Each POST is signed over "<t>.<body>" with the secret, and no log event contains the secret."""
    secret = "whsec-do-not-log-7f3a"
    server = WebhookServer(fail_first=1)
    servers.append(server)
    await server.start()
    config = parse_sink_spec(server.spec, secret=Secret(secret))
    with capture_logs() as logs:
        dispatcher = await started(dispatchers, [config], tmp_path)
        dispatcher.submit(alert(0))
        await until(lambda: len(server.received) == 1, "1 record at the webhook")
        await dispatcher.stop(timeout=1)
    assert len(server.requests) == 2
    for headers, body in server.requests:
        match = re.fullmatch(r"v1=([0-9a-f]{64})", headers["X-Replayguard-Signature"])
        assert match is not None and headers["X-Replayguard-Timestamp"].isdigit()
        expected = hmac.new(secret.encode(), headers["X-Replayguard-Timestamp"].encode() + b"." + body,
                            hashlib.sha256)
        assert hmac.compare_digest(match.group(1), expected.hexdigest())
    assert any(event["event"] == "sink_delivery_failed" for event in logs)
    assert secret not in repr(logs)


async def test_webhook_refused_record_is_skipped(tmp_path: Path, dispatchers: list[SinkDispatcher],
                                                 servers: list[WebhookServer | TcpSyslog]) -> None:  # fmt: skip
    """A record the receiver refuses with 422 is counted as rejected and does not block the ones after it."""
    server = WebhookServer(refuse="al-1")
    servers.append(server)
    await server.start()
    dispatcher = await started(dispatchers, [server.spec], tmp_path)
    for i in range(3):
        dispatcher.submit(alert(i))
    name = dispatcher_name(dispatcher)
    await until(lambda: dispatcher.stats()[name].backlog == 0, "the sink's backlog to drain")
    assert ids_of(server.received) == ["al-0", "al-2"]
    assert dispatcher.stats()[name].rejected == 1


# --------------------------------------------------------------------------- outbox and dispatcher


async def test_restart_resumes_without_loss_or_duplicates(
    tmp_path: Path, dispatchers: list[SinkDispatcher], servers: list[WebhookServer | TcpSyslog],
) -> None:
    """Records a down sink missed before a stop are delivered by a new dispatcher on the same spool, once."""
    server = WebhookServer()
    servers.append(server)
    await server.start()
    target = tmp_path / "alerts.jsonl"
    specs: list[str | SinkConfig] = [server.spec, f"file:{target}"]
    first = await started(dispatchers, specs, tmp_path / "spool")
    for i in range(3):
        first.submit(alert(i))
    await until(lambda: len(server.received) == 3, "3 records at the webhook")
    server.failing = True
    for i in range(3, 6):
        first.submit(alert(i))
    await until(lambda: len(file_ids(target)) == 6 and len(server.requests) >= 5,
                "6 records in the file sink and 5 webhook requests")
    await first.stop(timeout=30)  # returns once the send in flight is answered (500): none is abandoned
    assert first.stats()[parse_sink_spec(server.spec).name].backlog == 3
    server.failing = False
    second = await started(dispatchers, specs, tmp_path / "spool")
    second.submit(alert(6))
    await until(lambda: len(server.received) == 7 and len(file_ids(target)) == 7,
                "7 records at the webhook and 7 in the file sink")
    await until(lambda: all(lane.backlog == 0 for lane in second.stats().values()), "every sink's backlog to drain")
    await second.stop(timeout=5)  # nothing is in flight after this: every delivery has happened
    assert ids_of(server.received) == [f"al-{i}" for i in range(7)]
    assert file_ids(target) == [f"al-{i}" for i in range(7)]


async def test_stop_does_not_wait_out_a_failing_sinks_backoff(
    tmp_path: Path, dispatchers: list[SinkDispatcher], servers: list[WebhookServer | TcpSyslog],
) -> None:
    """A lane backing off from a failing sink ends at stop; its record stays spooled, not retried."""
    server = WebhookServer(fail_first=1_000)
    servers.append(server)
    await server.start()
    dispatcher = await started(dispatchers, [server.spec], tmp_path, backoff=Backoff(base=3_600, cap=3_600))
    dispatcher.submit(alert(0))
    name = dispatcher_name(dispatcher)
    await until(lambda: dispatcher.stats()[name].failed_attempts == 1, "1 failed delivery attempt")
    await asyncio.wait_for(dispatcher.stop(timeout=3_600), 30)  # the bound only fails a hanging stop
    assert len(server.requests) == 1
    assert dispatcher.stats()[name].backlog == 1


async def test_torn_spool_tail_is_cut(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """A half-written last spool line (a crash mid-append) is dropped and later records stay intact."""
    target = tmp_path / "out" / "alerts.jsonl"
    config = parse_sink_spec(f"file:{target}", name="audit")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "audit.jsonl").write_bytes(orjson.dumps(alert(0)) + b"\n" + b'{"type": "al')
    dispatcher = await started(dispatchers, [config], spool)
    assert dispatcher.stats()["audit"].backlog == 1
    dispatcher.submit(alert(1))
    await until(lambda: len(file_ids(target)) == 2, "2 records in the file sink")
    assert file_ids(target) == ["al-0", "al-1"]


async def test_corrupt_spool_lines_are_skipped(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """Corrupt spool lines are counted as dropped and skipped; the records around them are delivered."""
    target = tmp_path / "alerts.jsonl"
    spool = tmp_path / "spool"
    spool.mkdir()
    lines = [orjson.dumps(alert(0)), b"garbage", orjson.dumps(alert(1)), b"{not json"]
    (spool / "audit.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    dispatcher = await started(dispatchers, [parse_sink_spec(f"file:{target}", name="audit")], spool)
    await until(lambda: dispatcher.stats()["audit"].backlog == 0, "the sink's backlog to drain")
    assert file_ids(target) == ["al-0", "al-1"]
    assert dispatcher.stats()["audit"].dropped == 2


async def test_memory_overflow_reads_back_from_spool(tmp_path: Path, dispatchers: list[SinkDispatcher],
                                                     servers: list[WebhookServer | TcpSyslog]) -> None:  # fmt: skip
    """With a 2-record memory queue, a long outage is replayed from the spool file, in order."""
    server = WebhookServer()
    servers.append(server)
    dispatcher = await started(dispatchers, [server.spec], tmp_path, memory_limit=2, batch_size=3)
    for i in range(20):
        dispatcher.submit(alert(i))
    await server.start()
    await until(lambda: len(server.received) == 20, "20 records at the webhook")
    assert ids_of(server.received) == [f"al-{i}" for i in range(20)]


async def test_hanging_sink_never_delays_submit(tmp_path: Path, dispatchers: list[SinkDispatcher],
                                                servers: list[WebhookServer | TcpSyslog]) -> None:  # fmt: skip
    """While a webhook hangs, submit stays synchronous, its backlog grows, and the file sink still delivers."""
    server = WebhookServer(hang=True)
    servers.append(server)
    await server.start()
    target = tmp_path / "alerts.jsonl"
    dispatcher = await started(dispatchers, [server.spec, f"file:{target}"], tmp_path / "spool", send_timeout=60)
    assert not inspect.iscoroutinefunction(dispatcher.submit)
    webhook = parse_sink_spec(server.spec).name
    for i in range(20):
        dispatcher.submit(alert(i))
        assert dispatcher.stats()[webhook].backlog == i + 1
    await until(lambda: len(file_ids(target)) == 20, "20 records in the file sink")
    await until(lambda: len(server.requests) == 1, "1 webhook request")
    assert dispatcher.stats()[webhook].delivered == 0
    assert dispatcher.stats()[webhook].backlog == 20
    await dispatcher.stop(timeout=0.1)


async def test_submit_never_raises(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """submit swallows records that are not JSON and calls before start or after stop."""
    target = tmp_path / "alerts.jsonl"
    dispatcher = SinkDispatcher([parse_sink_spec(f"file:{target}")], spool_dir=tmp_path / "spool")
    dispatchers.append(dispatcher)
    dispatcher.submit(alert(0))
    await dispatcher.start()
    dispatcher.submit({"type": "alert", "id": "bad", "when": object()})
    dispatcher.submit(alert(1))
    await until(lambda: len(file_ids(target)) == 1, "1 record in the file sink")
    await dispatcher.stop(timeout=1)
    dispatcher.submit(alert(2))
    assert file_ids(target) == ["al-1"]


async def test_spool_compacts_when_drained(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """Once everything is delivered the spool file is emptied and the cursor reset, so it never grows unbounded."""
    target = tmp_path / "alerts.jsonl"
    config = parse_sink_spec(f"file:{target}", name="audit")
    spool = tmp_path / "spool"
    dispatcher = await started(dispatchers, [config], spool, compact_bytes=1)
    for i in range(3):
        dispatcher.submit(alert(i))
    await until(lambda: dispatcher.stats()["audit"].backlog == 0, "the sink's backlog to drain")
    assert (spool / "audit.jsonl").stat().st_size == 0
    assert (spool / "audit.cursor").read_text() == "0\n"
    assert stat.S_IMODE((spool / "audit.jsonl").stat().st_mode) == 0o600
    dispatcher.submit(alert(3))
    await until(lambda: len(file_ids(target)) == 4, "4 records in the file sink")
    assert file_ids(target) == [f"al-{i}" for i in range(4)]


async def test_a_transient_disk_full_on_the_outbox_cursor_does_not_stop_the_sink_for_good(
        tmp_path: Path, dispatchers: list[SinkDispatcher], monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError from the outbox's own files (here ``Spool.commit`` of the delivered cursor
    on a full disk; equally ``Spool.sync`` or ``Spool.read``) is a failed attempt of the
    lane: it is counted and logged, and the lane backs off and goes on from the cursor, so a
    record submitted once the disk has room again reaches the sink."""
    target = tmp_path / "sink" / "alerts.jsonl"
    real_commit = Spool.commit
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def commit(self: Spool, offset: int) -> None:
        if failures:
            raise failures.pop()
        real_commit(self, offset)

    monkeypatch.setattr(Spool, "commit", commit)
    dispatcher = await started(dispatchers, [f"file:{target}"], tmp_path / "spool")
    (name,) = dispatcher.stats()
    dispatcher.submit(alert(0))
    await until(lambda: "al-0" in file_ids(target), "the first record in the file sink")
    await until(lambda: not failures, "the cursor commit to fail once")
    dispatcher.submit(alert(1))  # the disk has room again
    await until(lambda: "al-1" in file_ids(target), "a record submitted after the disk had room again")
    assert set(file_ids(target)) == {"al-0", "al-1"}  # al-0 perhaps twice: its cursor commit failed
    stats = dispatcher.stats()[name]
    assert stats.failed_attempts >= 1 and stats.last_error is not None and "No space" in stats.last_error
    await until(lambda: dispatcher.stats()[name].backlog == 0, "the lane's backlog to drain")


async def test_a_start_cancelled_while_a_spool_opens_leaves_no_spool_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service stops (its alert feed cancelled) while the sinks start: every spool the
    start opened or is still opening in its thread is closed, so the next start in the same
    process, by a new leader or a restarted app, gets them (it used to find them "in use"
    for good: the open finished in its thread after the cancel and nobody closed it)."""
    real_open, real_close = Spool.open, Spool.close
    opening = asyncio.Event()
    loop = asyncio.get_running_loop()
    opened: list[Spool] = []  # every spool whose open began (appended in the open's thread)
    closed: list[Spool] = []

    def slow_open(self: Spool) -> int:
        opened.append(self)
        loop.call_soon_threadsafe(opening.set)
        time.sleep(0.3)
        return real_open(self)

    def noted_close(self: Spool) -> None:
        real_close(self)
        closed.append(self)

    def all_closed() -> bool:
        return all(any(spool is done for done in closed) for spool in opened)

    specs = [f"file:{tmp_path / 'a.jsonl'}", f"file:{tmp_path / 'b.jsonl'}"]
    for cancel_at in range(2):  # in the first spool's open, or in the second's after the first is open
        spool_dir = tmp_path / f"spool-{cancel_at}"
        first = SinkDispatcher([parse_sink_spec(spec) for spec in specs], spool_dir=spool_dir)
        opened.clear()
        closed.clear()
        monkeypatch.setattr(Spool, "open", slow_open)
        monkeypatch.setattr(Spool, "close", noted_close)
        start = asyncio.create_task(first.start())
        for _ in range(cancel_at + 1):
            opening.clear()
            await opening.wait()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        # The open left running in its thread closes its spool once it is done.
        await until(all_closed, "every spool the cancelled start began to open to be closed")
        monkeypatch.setattr(Spool, "open", real_open)
        again = SinkDispatcher([parse_sink_spec(spec) for spec in specs], spool_dir=spool_dir)
        await again.start()
        await again.stop(timeout=1)


async def test_spool_locked_against_second_process(tmp_path: Path, dispatchers: list[SinkDispatcher]) -> None:
    """A second dispatcher on a spool in use fails at start instead of delivering the same outbox twice."""
    spec = f"file:{tmp_path / 'alerts.jsonl'}"
    await started(dispatchers, [spec], tmp_path / "spool")
    second = SinkDispatcher([parse_sink_spec(spec)], spool_dir=tmp_path / "spool")
    with pytest.raises(ConfigError, match="in use"):
        await second.start()
    assert os.listdir(tmp_path / "spool")


@pytest.mark.skipif(os.geteuid() != 0, reason="what root creates in a service user's data dir")
async def test_root_run_leaves_an_outbox_the_data_dirs_owner_can_open(
    dispatchers: list[SinkDispatcher], servers: list[WebhookServer | TcpSyslog],
) -> None:
    """Root delivers through a spool inside a data dir owned by `nobody`: the spool dir, outbox and
    cursor it creates belong to `nobody`, who can then open the same outbox (a later non-root run)."""
    server = WebhookServer()
    servers.append(server)
    await server.start()
    nobody = 65534
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o711)  # noqa: S103 - `nobody` must pass through to its data dir
        data_dir = Path(top) / "data"
        data_dir.mkdir(mode=0o700)
        os.chown(data_dir, nobody, nobody)
        spool = data_dir / "outbox"
        dispatcher = await started(dispatchers, [server.spec], spool)
        dispatcher.submit(alert(0))
        await until(lambda: len(server.received) == 1, "1 record at the webhook")
        await until(lambda: all(lane.backlog == 0 for lane in dispatcher.stats().values()),
                    "every sink's backlog to drain")
        await dispatcher.stop(timeout=5)
        made = [spool, *spool.iterdir()]
        assert {p.name: (p.stat().st_uid, p.stat().st_gid) for p in made} == {p.name: (nobody, nobody) for p in made}
        reader = multiprocessing.get_context("fork").Pool(1, initializer=_become, initargs=(nobody,))
        try:
            backlog = reader.apply(_open_and_commit, (str(spool), parse_sink_spec(server.spec).name))
        finally:
            reader.terminate()
        assert backlog == 0


def _become(uid: int) -> None:
    os.setgid(uid)
    os.setgroups([])
    os.setuid(uid)


def _open_and_commit(directory: str, name: str) -> int:
    spool = Spool(Path(directory), name)
    backlog = spool.open()
    spool.commit(spool.cursor)
    spool.close()
    return backlog


class _GatedSink:
    """A sink whose sends each wait for a permit until it is opened."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.received: list[str] = []
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.open = False

    async def send(self, records: Any) -> None:
        ids = [str(r["id"]) for r in records]
        self.calls.append(ids)
        if not self.open:
            await self.permits.get()
        self.received.extend(ids)

    async def close(self) -> None:
        return None


async def test_records_spooled_past_a_full_memory_queue_are_delivered_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory holds 5 records, batches are 2: al-5..al-9 go to the spool alone, then al-10,
    submitted while the backlog drains, to memory again. Every record is delivered once, in
    order (a batch from memory ran from al-4 straight to al-10, and al-5..al-9 were lost)."""
    sink = _GatedSink()
    monkeypatch.setattr(dispatcher_module, "build_sink", lambda config, **kw: sink)
    dispatcher = SinkDispatcher([parse_sink_spec(f"file:{tmp_path / 'unused.jsonl'}", name="lane")],
                                spool_dir=tmp_path / "spool", memory_limit=5, batch_size=2)
    await dispatcher.start()
    try:
        for i in range(10):
            dispatcher.submit(alert(i))
        await until(lambda: len(sink.calls) == 1, "the first batch sent")
        sink.permits.put_nowait(None)
        await until(lambda: len(sink.calls) == 2, "the second batch sent")
        dispatcher.submit(alert(10))
        sink.open = True
        sink.permits.put_nowait(None)
        await until(lambda: len(sink.received) >= 11, "eleven records delivered")
        assert sink.received == [f"al-{i}" for i in range(11)], sink.calls
    finally:
        await dispatcher.stop(timeout=1)


async def test_an_alert_change_numbered_before_another_reaches_the_sinks_though_it_commits_later(
        fresh_database: Callable[[], Any], api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A replayed nonce's decision takes alert change N and is held before its commit (a
    lock on the ledger, as a slow commit); a ledger_tamper alert is written meanwhile. It
    waits for the decision's head lock and takes N+1 after it: both reach the sink. (It
    committed N+1 first, the feeder moved its position past N, and the reuse alert never
    reached any sink.)"""
    out = tmp_path / "siem" / "alerts.jsonl"
    dsn = await fresh_database()
    api = await api_factory(database_url=Secret(dsn), sinks=(f"file:{out}",), statement_timeout_ms=60_000)
    feed = api.client.app[ANALYSTS].feed
    await until(lambda: feed.leader, "the instance to lead the feed", timeout=20)

    def sunk() -> list[str]:
        return [orjson.loads(line).get("alert_id") for line in out.read_bytes().splitlines()] if out.exists() else []

    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": secrets.token_hex(16)}
    assert (await api.post("/v1/nonces/consume", body))[1]["decision"] == "accept"
    blocker, monitor = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE ledger IN SHARE MODE")
            replay = asyncio.create_task(api.post("/v1/nonces/consume", body))
            [decision] = await blocked_by(monitor, blocker.get_server_pid())
            ledger = api.client.app[ANALYSTS].ledger
            tamper = asyncio.create_task(ledger.raise_tamper_alert(Finding(1, Problem.MODIFIED, "a test"),
                                                                   api.runtime.now_us()))

            async def tamper_waits_or_sunk() -> bool:
                if tamper.done():
                    return str(tamper.result()) in sunk()
                return bool(await monitor.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", decision))

            await until(tamper_waits_or_sunk, "the tamper alert waiting for the decision, or in the sink")
        status, second = await replay
        tamper_id = await tamper
    finally:
        await blocker.close()
        await monitor.close()
    assert (status, second["reason"]) == (200, "reused"), second
    await until(lambda: {second["alert_id"], str(tamper_id)} <= set(sunk()), "both alerts in the sink", timeout=30)


async def test_the_sinks_position_never_passes_an_alert_the_outbox_has_not_made_durable(
        api_factory: Callable[..., Any], database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed leader hands alert changes to the outbox and fsyncs its spools (in a thread)
    before it commits ``sink_feed`` past them, so a power loss or a kernel crash cannot leave
    the database saying "handed over" and the outbox without the record, even while the SIEM
    is down and the lane itself waits out a long backoff before its next attempt."""
    durable: dict[str, int] = {}  # file path: bytes fsynced (whoever syncs it, however)

    def tracked(real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            real(fd)
            with contextlib.suppress(OSError):
                durable[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size
        return call

    monkeypatch.setattr(os, "fsync", tracked(os.fsync))
    monkeypatch.setattr(os, "fdatasync", tracked(os.fdatasync))
    # A SIEM that has been down a while: the lane waits out a long backoff between attempts.
    monkeypatch.setattr(alertfeed_sinks, "SinkDispatcher",
                        functools.partial(SinkDispatcher, backoff=Backoff(base=120.0, cap=120.0)))
    with dead_url() as url:
        api: Api = await api_factory(database_url=Secret(database_url), sinks=(f"webhook:{url}/siem",))
        feed = api.client.app[ANALYSTS].feed
        await until(lambda: feed.leader and _dispatcher(feed).stats(), "the instance to lead and start its sinks",
                    timeout=20)
        (name,) = _dispatcher(feed).stats()
        await reuse_alert(api, uid("vm"), uid("scope"))
        await until(lambda: _dispatcher(feed).stats()[name].failed_attempts >= 1, "the SIEM refusing the first")

        alert_id, _ = await reuse_alert(api, uid("vm"), uid("scope"))
        _, alert = await api.get(f"/v1/alerts/{alert_id}")
        conn = await asyncpg.connect(database_url)
        try:
            async def handed_over() -> bool:
                return bool(await conn.fetchval("SELECT alert_change_seq >= $1 FROM sink_feed", alert["change"]))

            await until(handed_over, "the sinks' position to pass the second alert", timeout=20)
        finally:
            await conn.close()
        spool = tmp_path / "data" / "outbox" / f"{name}.jsonl"
        on_disk = spool.read_bytes()
        assert f'"alert_id":"{alert_id}"'.encode() in on_disk  # written...
        survives = on_disk[: durable.get(str(spool), 0)]
        assert f'"alert_id":"{alert_id}"'.encode() in survives, (
            "the database says the alert was handed to the sinks, but the outbox has not fsynced it: "
            "a power loss now loses it for good")


async def test_alerts_spooled_by_a_leader_that_stopped_reach_the_sink(
        api_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Each instance's outbox is a spool in its own data dir, and every instance delivers its
    own spool whether or not it leads the feed (only the leader hands it new records). An
    alert spooled by a leader that stopped while the SIEM was down (the next leader goes on
    from ``sink_feed``, past it) is delivered when that instance starts again, though it
    does not lead then: its records wait in the spool for the next start."""
    siem = tmp_path / "siem"
    siem.write_text("not a directory yet: the SIEM is down")
    target = siem / "alerts.jsonl"
    sinks = (f"file:{target}",)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    one: Api = await api_factory(data_dir=a_dir, sinks=sinks)
    feed_one = one.client.app[ANALYSTS].feed
    await until(lambda: feed_one.leader and _dispatcher(feed_one).stats(), "the first instance to lead", timeout=20)
    seed_keys(b_dir, a_dir / "keys")  # one deployment: the same keys on every host
    other: Api = await api_factory(data_dir=b_dir, sinks=sinks)
    feed_other = other.client.app[ANALYSTS].feed

    stranded, _ = await reuse_alert(one, uid("vm"), uid("scope"))
    (name,) = _dispatcher(feed_one).stats()
    await until(lambda: _dispatcher(feed_one).stats()[name].failed_attempts >= 1,
                "the first instance to try the SIEM")
    await one.client.close()  # a restart, an upgrade, a host going down
    await until(lambda: feed_other.leader, "the other instance to lead", timeout=20)

    siem.unlink()  # the SIEM is back
    later, _ = await reuse_alert(other, uid("vm"), uid("scope"))

    def sunk() -> set[str]:
        return {orjson.loads(line).get("alert_id") for line in target.read_bytes().splitlines()} \
            if target.exists() else set()

    await until(lambda: later in sunk(), "the other instance to deliver what it spooled", timeout=20)
    again: Api = await api_factory(data_dir=a_dir, sinks=sinks)  # the first instance starts again
    assert not again.client.app[ANALYSTS].feed.leader
    await until(lambda: stranded in sunk(), "the alert spooled before the first instance stopped", timeout=20)
