"""What one client can make the fast front hold: written answers it does not read, a head
that never ends, and a pipeline whose writes do not line up with its requests."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from typing import cast

import pytest

from replayguard.http.front import _MAX_HELD, Front
from tests.conftest import Api

pytestmark = pytest.mark.timeout(120)


def _request(api: Api, extra: bytes = b"") -> bytes:
    body = b'{"vm_id": "vm-limits", "scope": "limits", "nonce": "%s"}' % secrets.token_hex(8).encode()
    return (b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + api.tokens["callout"].encode() + b"\r\nContent-Length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)


def _front(api: Api) -> Front:
    runner = api.client.server.runner
    assert runner is not None
    return cast(Front, runner.server)  # FrontRunner's server: the front, typed as aiohttp's


async def test_a_client_that_never_reads_stops_the_front_reading(api: Api) -> None:
    """30,000 pipelined decisions written at once by a client that reads no answer: once the
    transport's buffer is over its mark the front stops reading until it drains, so it
    decides what it had read and no more, and its buffer stays within the mark and one
    read's answers (it held every answer, 5.6 MB, when it read on as its queue emptied)."""
    front = _front(api)
    before = set(front._live)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (api.client.host, api.client.port))
    _, writer = await asyncio.open_connection(sock=sock)
    count = 30_000
    answered = api.runtime.metrics.front.answered
    try:
        writer.write(b"".join(_request(api) for _ in range(count)))  # not drained: the client's buffer holds it
        biggest, still = 0, 0
        while still < 100:  # a second without a new decision: the front has stopped
            decided = api.runtime.metrics.front.answered - answered
            await asyncio.sleep(0.01)
            still = still + 1 if api.runtime.metrics.front.answered - answered == decided else 0
            for connection in front._live - before:
                if connection._transport is not None:
                    biggest = max(biggest, connection._transport.get_write_buffer_size())
        decided = api.runtime.metrics.front.answered - answered
        assert 0 < decided < count // 2, decided
        assert biggest < 1024 * 1024, biggest
    finally:
        writer.close()


async def test_a_head_that_never_ends_is_not_held_past_a_bound(api: Api) -> None:
    """8 MiB of one header value, sent at once: the front hands the request to aiohttp (which
    refuses it) once it holds more than ``_MAX_HELD`` bytes, instead of holding and copying
    everything until its next sweep (17 MB for one connection)."""
    front = _front(api)
    head = b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nX-Big: "

    def client() -> None:
        with socket.create_connection((api.client.host, api.client.port)) as sock:
            sock.settimeout(10)
            try:
                sock.sendall(head + b"a" * (8 * 1024 * 1024))
                sock.recv(1000)
            except OSError:
                pass

    thread = threading.Thread(target=client)
    thread.start()
    held = 0
    while thread.is_alive():
        for connection in list(front._live):
            held = max(held, len(connection._partial))
        await asyncio.sleep(0.002)
    thread.join()
    assert held <= _MAX_HELD, held


async def test_a_steady_pipeline_is_not_taken_for_a_slow_client(api: Api) -> None:
    """200 pipelined decisions in 500-byte writes every 20 ms: every read ends inside a
    request, each completes within a read or two, so none is ever held for long and the
    connection stays with the front (it went to aiohttp after about a second when a held
    request's clock carried over to the next request)."""
    counts = api.runtime.metrics.front
    handed_before = counts.handed_over
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    answered = bytearray()

    async def read_answers() -> None:
        while data := await reader.read(65536):
            answered.extend(data)

    reading = asyncio.create_task(read_answers())
    try:
        stream = b"".join(_request(api, b"X-Request-Id: s-%d\r\n" % i) for i in range(200))
        for at in range(0, len(stream), 500):
            writer.write(stream[at:at + 500])
            await writer.drain()
            await asyncio.sleep(0.02)
        while answered.count(b"HTTP/1.1 200 ") < 200:
            await asyncio.sleep(0.01)
        assert counts.handed_over == handed_before
    finally:
        reading.cancel()
        writer.close()
