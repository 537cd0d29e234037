"""The 503 a connection over ``max_connections`` gets, written before any parser runs:
the contract's error body with the headers every API answer carries."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools

from replayguard.http.app import request_id_for
from replayguard.http.server import _Busy


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    def write(self, data: Any) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _Answer:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body


async def test_the_busy_answer_is_the_contract_error_kept_from_caches_sniffing_and_frames() -> None:
    """A connection over the cap is answered 503 ``unavailable`` with ``Cache-Control: no-store``,
    ``nosniff`` and a CSP that forbids framing, like every other API answer."""
    transport, busy, answer = _Transport(), _Busy(), _Answer()
    busy.connection_made(transport)
    busy.connection_lost(None)
    parser = httptools.HttpResponseParser(answer)
    parser.feed_data(bytes(transport.written))
    assert parser.get_status_code() == 503
    assert json.loads(answer.body)["error"]["code"] == "unavailable"
    assert {name: answer.headers.get(name) for name in ("cache-control", "x-content-type-options",
                                                        "content-security-policy")} == {
        "cache-control": "no-store", "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; frame-ancestors 'none'"}


def _busy_headers() -> dict[str, str]:
    transport, busy, answer = _Transport(), _Busy(), _Answer()
    busy.connection_made(transport)
    busy.connection_lost(None)
    parser = httptools.HttpResponseParser(answer)
    parser.feed_data(bytes(transport.written))
    return answer.headers


async def test_the_busy_answer_carries_a_fresh_request_id_of_its_own() -> None:
    """Every answer carries ``X-Request-Id``: a connection over the cap gets a generated one,
    a different one per connection (its request is never read, so none is echoed)."""
    first, second = _busy_headers().get("x-request-id"), _busy_headers().get("x-request-id")
    assert first and second and first != second
    assert request_id_for(first) == first  # the shape the service accepts back
