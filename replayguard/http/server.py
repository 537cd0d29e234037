"""Serving the app on a socket, with the limits that keep slow or hostile clients harmless.

- Header limits: request line, header field size and count (aiohttp's parser answers 400).
- Idle timeout: a connection that has not sent a complete request within
  ``idle_timeout_s`` of opening (or of its last response) is closed, so a client that
  trickles headers byte by byte holds a socket for seconds, not forever.
- Body timeout: ``request_timeout_s`` bounds reading a body (``common.read_json``: 408).
- Connection cap: at ``max_connections`` open connections a new one is answered 503 (the
  contract's error body, a fresh ``X-Request-Id``) and closed at once, so a flood of
  sockets cannot exhaust file descriptors: ``serve`` raises its soft open-files limit to
  the hard one at start (``raise_fd_limit``) and refuses to start when the cap, the
  database pool and a reserve do not fit under it.

The same limits are used by ``replayguard serve`` and by tests that serve the app in-process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
import socket
from typing import Any, cast

import structlog
from aiohttp import web

from ..errors import ConfigError
from ..settings import Settings
from .app import request_id_for
from .common import API_HEADERS, MAX_FIELD_SIZE, MAX_HEADERS, MAX_LINE_SIZE
from .front import FrontRunner

log = structlog.get_logger(__name__)

_BUSY_BODY = b'{"error": {"code": "unavailable", "message": "too many connections; try again later"}}'
_BUSY_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
              + "".join(f"{name}: {value}\r\n" for name, value in API_HEADERS.items()).encode())
_BUSY_TAIL = b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY


def busy_answer() -> bytes:
    """The 503 of a connection over the cap, with a fresh ``X-Request-Id`` like every answer
    (the request is never read, so there is no caller's id to echo)."""
    return _BUSY_HEAD + b"X-Request-Id: " + request_id_for(None).encode() + b"\r\n" + _BUSY_TAIL


def runner_args(settings: Settings) -> dict[str, Any]:
    """The runner's arguments ``serve`` uses, ``handler_limits`` among them; tests that serve
    the app in-process pass the same ones, so they run it as ``serve`` does."""
    return {"access_log": None, "shutdown_timeout": 10, **handler_limits(settings)}


def handler_limits(settings: Settings) -> dict[str, Any]:
    """aiohttp request-handler arguments: header limits, the idle timeout, and no cancelling
    of every handler whose client went away (``common.StopsWithClient`` does it for those
    that ask)."""
    return {
        "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE, "max_headers": MAX_HEADERS,
        "keepalive_timeout": settings.idle_timeout_s, "lingering_time": 2.0, "handler_cancellation": False,
    }


class _Busy(asyncio.Protocol):
    """Answers one connection over the cap with a 503 and closes it.

    What the client already sent is read and dropped for a moment (a lingering close):
    closing with unread input would reset the connection and lose the 503 on the way.
    """

    _LINGER_S = 1.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        transport.write(busy_answer())
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(self._LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class ConnectionCap:
    """A protocol factory that hands out aiohttp handlers up to ``limit`` live connections."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server = server
        self._limit = limit
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) >= self._limit:
            self.refused += 1
            return _Busy()
        return self._server()


# Descriptors a worker needs besides its clients' sockets and its pool's connections: the
# listening socket, the appender's and the readers' own connections, log and sink files,
# the embedded server's pipes, Redis, witnesses, the event loop's own.
FD_RESERVE = 64


def raise_fd_limit(settings: Settings) -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit (a shell's or a unit's usual soft
    limit, 1024, is the default max_connections) and returns it; refuses in one line when
    ``max_connections`` plus the pool and ``FD_RESERVE`` still do not fit (each worker
    inherits the limit and counts on its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    needed = settings.max_connections + settings.db_pool_size + FD_RESERVE
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. a hard limit above the kernel's nr_open
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if needed > soft:
        raise ConfigError(f"max_connections ({settings.max_connections}) plus the database pool and a reserve "
                          f"need {needed} open files, over this process's limit of {soft}: raise the limit "
                          f"(ulimit -n, LimitNOFILE=) or lower max_connections")
    return soft


def _listen(settings: Settings, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


# The cyclic garbage collector, tuned for a long-running server (measured with
# bench/run.py; the figures are in git history). With CPython's default thresholds
# (700, 10, 10) a worker at c=64 spends about 6 % of its CPU collecting, and a full
# collection stops it for up to 70 ms, as long as its p99. Almost every object a request
# makes is freed by reference counting, so a much larger youngest generation collects
# rarely and finds little.
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """Freezes what start-up made (it lives as long as the process) and raises the
    collector's thresholds, so collections are rare and never walk the long-lived heap."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


ORPHAN_CHECK_S = 1.0


async def _orphaned(parent_pid: int) -> None:
    """Returns once the process that started this worker is gone (it was killed hard)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(ORPHAN_CHECK_S)


async def serve(app: web.Application, settings: Settings, *, reuse_port: bool,
                parent_pid: int | None = None) -> None:
    """Serves ``app`` until SIGTERM or SIGINT, then shuts down gracefully.

    A worker of ``serve --workers N`` passes its parent's pid: when that parent dies
    without stopping it (SIGKILL), the worker shuts down too rather than keep the port.
    """
    runner = FrontRunner(app, **runner_args(settings))
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = None
    if parent_pid is not None:
        watchdog = asyncio.create_task(_orphaned(parent_pid))
        watchdog.add_done_callback(lambda _task: stop.set())
    assert runner.server is not None  # noqa: S101 - narrows the type for mypy: the runner is set up
    listener = await loop.create_server(ConnectionCap(runner.server, settings.max_connections),
                                        sock=_listen(settings, reuse_port))
    # The bound port, which is how a caller that asked for port 0 learns it.
    log.info("listening", host=settings.host, port=listener.sockets[0].getsockname()[1])
    tune_gc()
    try:
        await stop.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        listener.close()
        await runner.cleanup()
