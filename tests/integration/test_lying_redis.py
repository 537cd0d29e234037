"""A Redis server that answers PUBLISH with something malformed must change no decision's answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from replayguard.settings import Secret
from tests.conftest import uid

HELLO_3 = b"%2\r\n$5\r\nproto\r\n:3\r\n$7\r\nversion\r\n$5\r\n7.2.0\r\n"  # a well-formed RESP3 handshake
LIES = {
    # answers the handshake properly, then PUBLISH with a malformed ASK redirection
    "malformed-ask-to-publish": (HELLO_3, b"-ASK 1 x\r\n"),
    # a RESP2 proxy that acknowledges every command, the handshake included
    "ok-to-hello": (b"+OK\r\n", b":1\r\n"),
}


@pytest_asyncio.fixture(params=list(LIES), ids=list(LIES))
async def lying_redis(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A stand-in at the Redis URL that lies: ``LIES[param]`` to HELLO and PUBLISH, +OK to the rest."""
    hello, lie = LIES[request.param]
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(hello if b"HELLO" in data else lie if b"PUBLISH" in data else b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in writers:
        writer.close()
    server.close()


async def test_an_accept_that_raises_an_alert_is_answered_whatever_redis_replies(
        lying_redis: str, api_factory: Callable[..., Any]) -> None:
    """A nonce presented with a forged receipt is accepted, flagged receipt_invalid, with its alert_id,
    as without Redis: a malformed reply to the alert's PUBLISH does not turn the answer into a 500."""
    api = await api_factory(redis_url=Secret(lying_redis))
    body = {"vm_id": uid("vm"), "scope": uid("scope"), "nonce": uid("nonce"), "receipt": "not-a-receipt"}
    status, answer = await api.post("/v1/nonces/consume", body)
    assert status == 200, (status, answer)
    assert answer["decision"] == "accept" and "receipt_invalid" in answer["flags"] and answer["alert_id"]
