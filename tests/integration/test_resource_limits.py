"""Resource exhaustion: slow, greedy and oversized clients cannot starve decisions.

Real ``replayguard serve`` processes with short idle and body timeouts, and raw sockets
that trickle headers byte by byte, send a body slowly, pipeline requests and never read,
hold alert streams open, or open connections up to the cap. Only outcomes are asserted:
decisions keep answering, limits answer with the right status, and held sockets are
eventually closed by the server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from replayguard.http.common import MAX_FIELD_SIZE, MAX_HEADERS, MAX_LINE_SIZE
from tests.conftest import ServiceProcess, cli_env, run_cli, uid
from tests.waiting import until

pytestmark = pytest.mark.slow

IDLE_S = 2
LIMITS = {"REPLAYGUARD_IDLE_TIMEOUT_S": str(IDLE_S), "REPLAYGUARD_REQUEST_TIMEOUT_S": "2",
          "REPLAYGUARD_DB_POOL_SIZE": "4"}


def _token(data_dir: Path, dsn: str, role: str = "callout") -> str:
    done = run_cli("token", "create", "--role", role, "--name", uid(role), "--data-dir", str(data_dir),
                   "--database-url", dsn)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def _start(tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
                 **env: str) -> tuple[ServiceProcess, dict[str, str]]:
    data_dir = tmp_path / "data"
    tokens = {role: await asyncio.to_thread(_token, data_dir, database_url, role) for role in ("callout", "analyst")}
    service = await service_factory(data_dir=data_dir, database_url=database_url,
                                    env=cli_env(**LIMITS, **env))
    return service, tokens


async def _accepted(service: ServiceProcess, count: int) -> None:
    """Waits until the service process holds ``count`` accepted connections on its port (a socket
    still in the listen backlog is not the process's yet)."""
    port = _host_port(service)[1]

    async def held() -> bool:
        conns = psutil.Process(service.proc.pid).net_connections(kind="tcp")
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port) >= count

    await until(held, f"{count} connections accepted by the service")


def _host_port(service: ServiceProcess) -> tuple[str, int]:
    host, _, port = service.url.removeprefix("http://").partition(":")
    return host, int(port)


async def _decisions(service: ServiceProcess, token: str, count: int) -> list[tuple[int, str]]:
    """``count`` nonce decisions from a well-behaved client, a few at a time."""
    scope = uid("fair")
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async def one(i: int) -> tuple[int, str]:
            async with sem, session.post(f"{service.url}/v1/nonces/consume",
                                         json={"vm_id": "vm-fair", "scope": scope, "nonce": f"n-{i}"},
                                         headers={"Authorization": f"Bearer {token}"}) as resp:
                return resp.status, (await resp.json(content_type=None)).get("decision", "")

        return list(await asyncio.gather(*(one(i) for i in range(count))))


@dataclass
class Held:
    """A raw connection a hostile client holds; ``received`` is what the server sent it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    closed_by_server: bool = False

    async def drain_until_closed(self, limit_s: float) -> None:
        try:
            async with asyncio.timeout(limit_s):
                while chunk := await self.reader.read(65536):
                    self.received += chunk
            self.closed_by_server = True
        except (ConnectionError, OSError):
            self.closed_by_server = True
        except TimeoutError:
            pass

    def close(self) -> None:
        self.writer.close()


async def _open(service: ServiceProcess) -> Held:
    reader, writer = await asyncio.open_connection(*_host_port(service))
    return Held(reader, writer)


async def _trickle(held: Held, data: bytes, every_s: float, stop: asyncio.Event) -> None:
    """Sends ``data`` one byte at a time until done, stopped, or the server hangs up."""
    for byte in data:
        if stop.is_set() or held.writer.is_closing():
            return
        try:
            held.writer.write(bytes([byte]))
            await held.writer.drain()
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(every_s)


async def test_slow_and_greedy_clients_do_not_starve_decisions(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> None:
    """With 40 header tricklers, 10 slow bodies and 10 non-readers connected, 60 decisions all answer and accept."""
    service, tokens = await _start(tmp_path, database_url, service_factory)
    auth = f"Authorization: Bearer {tokens['callout']}\r\n".encode()
    stop = asyncio.Event()
    header_tricklers = [await _open(service) for _ in range(40)]
    body_tricklers = [await _open(service) for _ in range(10)]
    non_readers = [await _open(service) for _ in range(10)]
    slow_headers = b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Pad: " + b"a" * 400
    tasks = [asyncio.create_task(_trickle(h, slow_headers, 0.05, stop)) for h in header_tricklers]
    for held in body_tricklers:
        held.writer.write(b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\n" + auth +
                          b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n")
        tasks.append(asyncio.create_task(_trickle(held, b"{" + b" " * 59_999, 0.05, stop)))
    pipelined = (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") * 500
    for held in non_readers:
        held.writer.write(pipelined)  # and never read the answers
    try:
        answers = await _decisions(service, tokens["callout"], 60)
        assert answers == [(200, "accept")] * 60
        # The tricklers are cut off by the idle and body timeouts, not left to hold sockets.
        await asyncio.gather(*(h.drain_until_closed(IDLE_S + 8) for h in header_tricklers + body_tricklers))
        assert all(h.closed_by_server for h in header_tricklers)
        assert all(h.received.startswith(b"HTTP/1.1 408") for h in body_tricklers), \
            {bytes(h.received[:40]) for h in body_tricklers}
        assert service.proc.poll() is None
        assert await _decisions(service, tokens["callout"], 10) == [(200, "accept")] * 10
    finally:
        stop.set()
        for held in header_tricklers + body_tricklers + non_readers:
            held.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _raw_status(service: ServiceProcess, request: bytes) -> bytes:
    held = await _open(service)
    try:
        held.writer.write(request)
        await held.writer.drain()
        await held.drain_until_closed(10)
    finally:
        held.close()
    return bytes(held.received.split(b"\r\n", 1)[0])


async def test_header_and_body_limits(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> None:
    """An over-long request line, header field or header count is 400, a body over 64 KiB 413, and decisions go on."""
    service, tokens = await _start(tmp_path, database_url, service_factory)
    close = b"Connection: close\r\n"
    long_line = b"GET /healthz?" + b"a" * (MAX_LINE_SIZE + 10) + b" HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n"
    long_field = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_FIELD_SIZE + 10) + b"\r\n"
                  + close + b"\r\n")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 10))
    many_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + close + b"\r\n"
    for name, request in [("line", long_line), ("field", long_field), ("count", many_headers)]:
        status = await _raw_status(service, request)
        assert re.match(rb"HTTP/1\.[01] 4(0[0-7]|1\d|31) ", status), (name, status)
    async with aiohttp.ClientSession() as session, session.post(
            f"{service.url}/v1/nonces/consume", data=b"{" + b" " * (70 * 1024) + b"}",
            headers={"Authorization": f"Bearer {tokens['callout']}", "Content-Type": "application/json"}) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"
    assert await _decisions(service, tokens["callout"], 5) == [(200, "accept")] * 5


async def test_connection_cap_refuses_extra_connections_then_recovers(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> None:
    """At max_connections idle sockets a new connection gets 503; once the idle ones time out, decisions accept."""
    cap = 20
    service, tokens = await _start(tmp_path, database_url, service_factory, REPLAYGUARD_MAX_CONNECTIONS=str(cap))
    idle = [await _open(service) for _ in range(cap)]
    try:
        await _accepted(service, cap)
        status = await _raw_status(service, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == b"HTTP/1.1 503 Service Unavailable"
        recovered = None
        for _ in range(100):  # bounded: the idle sockets are closed after IDLE_S
            try:
                recovered = await _decisions(service, tokens["callout"], 1)
            except aiohttp.ClientError:
                recovered = None
            if recovered == [(200, "accept")]:
                break
            await asyncio.sleep(0.2)
        assert recovered == [(200, "accept")]
        await asyncio.gather(*(h.drain_until_closed(IDLE_S + 8) for h in idle))
        assert all(h.closed_by_server for h in idle)
    finally:
        for held in idle:
            held.close()


async def test_alert_stream_subscribers_are_capped(
    tmp_path: Path, database_url: str, service_factory: Callable[..., Any],
) -> None:
    """With max_sse_subscribers streams open and never read, one more is 503 and decisions still answer."""
    service, tokens = await _start(tmp_path, database_url, service_factory, REPLAYGUARD_MAX_SSE_SUBSCRIBERS="3")
    request = (b"GET /v1/alerts/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
               b"Authorization: Bearer " + tokens["analyst"].encode() + b"\r\n\r\n")
    streams = []
    try:
        for _ in range(3):
            held = await _open(service)
            held.writer.write(request)
            first = await asyncio.wait_for(held.reader.readline(), 10)
            assert first.startswith(b"HTTP/1.1 200"), first
            streams.append(held)
        extra = await _open(service)
        extra.writer.write(request)
        first = await asyncio.wait_for(extra.reader.readline(), 10)
        extra.close()
        assert first.startswith(b"HTTP/1.1 503"), first
        assert await _decisions(service, tokens["callout"], 20) == [(200, "accept")] * 20
    finally:
        for held in streams:
            held.close()
