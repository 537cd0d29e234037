"""A loopback TCP relay that can turn its connections half-open.

``freeze()`` stops relaying on every connection open now while keeping both sockets
open, as a peer that vanished without a FIN or RST (a host powered off, a firewall that
dropped the state) looks to the client: writes succeed, nothing ever comes back.
Connections made after it relay normally, so a client that notices and reconnects works;
with ``freeze_new`` set, they are half-open from their first byte (a handshake that never
gets an answer). ``freeze(replies_only=True)`` still relays what the client sends: the
server acts on it, and its answer is lost. ``reply_trap`` does that to the one connection
that next sends bytes containing it, from that message on (then it is cleared).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class _Pipe:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    frozen: bool = False
    replies_frozen: bool = False


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._pipes: list[_Pipe] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self.freeze_new = False
        self.reply_trap: bytes | None = None
        self._closed = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self, *, replies_only: bool = False) -> int:
        """Half-opens every connection open now; returns how many."""
        live = [p for p in self._pipes if not p.frozen]
        for pipe in live:
            if replies_only:
                pipe.replies_frozen = True
            else:
                pipe.frozen = True
        return len(live)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A connection accepted while (or after) the proxy closes, or whose server cannot be
        # reached, is closed here: none is left for the garbage collector to warn about in a
        # later test.
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        if self._closed:
            writer.close()
            up_writer.close()
            return
        pipe = _Pipe(writers=[writer, up_writer], frozen=self.freeze_new)
        self._pipes.append(pipe)
        pipe.tasks = [asyncio.create_task(self._relay(pipe, reader, up_writer, reply=False)),
                      asyncio.create_task(self._relay(pipe, up_reader, writer, reply=True))]

    async def _relay(self, pipe: _Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     reply: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not reply and self.reply_trap is not None and self.reply_trap in data:
                    self.reply_trap = None
                    pipe.replies_frozen = True
                if pipe.frozen or (reply and pipe.replies_frozen):
                    continue  # swallowed: the other side never hears of it
                writer.write(data)
                await writer.drain()
        if not pipe.frozen:
            writer.close()

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            for task in pipe.tasks:
                task.cancel()
            for writer in pipe.writers:
                writer.close()
        await asyncio.gather(*(t for p in self._pipes for t in p.tasks), return_exceptions=True)


@contextlib.asynccontextmanager
async def tcp_proxy(target_host: str, target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_host, target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def proxied(database_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy to ``database_url``'s server, and the URL that reaches the server through it."""
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    async with tcp_proxy(parts.hostname, parts.port) as proxy:
        yield proxy, database_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
