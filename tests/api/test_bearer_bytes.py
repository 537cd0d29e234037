"""A bearer token with bytes that are not UTF-8 is an unknown token (401), never a 500."""

from __future__ import annotations

import asyncio

from tests.conftest import Api


async def test_non_utf8_bytes_in_the_bearer_token_are_401(api: Api) -> None:
    """A valid token followed by 0x80 (which aiohttp decodes to a surrogate escape) answers 401, not 500."""
    body = b'{"vm_id":"vm-bytes","scope":"s","nonce":"n1"}'
    request = (b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + api.tokens["callout"].encode() + b"\xb6\x80\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 20)
    finally:
        writer.close()
    assert status_line.split()[1] == b"401", status_line
