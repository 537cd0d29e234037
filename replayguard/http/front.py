"""The fast front: the decision routes, answered without aiohttp's per-request machinery.

A PAM or RADIUS callout waits on ``POST /v1/otp/verify``, ``POST /v1/nonces/consume`` or
``POST /v1/radius/authenticate``.
Through aiohttp, the framework's own work for one request (request and response objects,
router, middleware chain, writer) costs about 40 µs of CPU on the benchmark machine, against
7 µs for the same request parsed by httptools (llhttp, in C) and answered from a plain
protocol; a decision as a whole costs about 200 µs, and one worker's CPU is what bounds its
rate (measured with bench/run.py; the figures are in git history). So the listening
socket speaks to this protocol first, and it answers those routes itself with the same
code the aiohttp path runs: ``app.request_id_for``, ``app.authorised_caller``, the route's
answerer (``callouts.FAST``, ``radius.FAST``), ``app.error_answer``, ``app.log_request``
and the metrics.

Everything else is aiohttp's, byte for byte. At the first request the front does not take,
the connection is handed to aiohttp's own request handler with every byte from the start
of that request on, and it stays with aiohttp. The front takes a request only when all of
this holds, so that its own HTTP stays small and every unusual case gets aiohttp's
handling (limits, timeouts, 400/408/413/415 answers):

- the front knows where the request began: at the start of a read from the socket, or
  right after the previous request of the same read (the front finds that end from the
  head's blank line and the body it parsed, and checks the bytes match); it may end in a
  later read (Python's http.client writes headers and body apart; a pipelining client's
  requests straddle reads), but a request still incomplete at the first sweep after
  ``_HOLD_S`` of reading (a pause of reading for back-pressure does not count) is a slow
  client and goes to aiohttp, whose timeouts answer it;
- HTTP/1.1, ``POST``, exactly the path of a decision route (no query string);
- a ``Content-Length`` of at most ``MAX_BODY``; no ``Transfer-Encoding``, ``Expect`` or
  upgrade;
- ``Content-Type`` is ``application/json`` (parameters allowed); a ``Host``; the headers it
  reads (``Authorization``, ``Content-Type``, ``X-Request-Id``, ``Content-Length``, ``Host``)
  and those RFC 9110 allows once appear once and are ASCII; no ``Content-Encoding``; the
  request line and headers are within aiohttp's limits, and an incomplete request never
  holds more than ``_MAX_HELD`` bytes;
- the parser found nothing wrong.

A request whose start the front lost (llhttp does not report offsets, and the front's
own count fails only on input such as blank lines between pipelined requests) cannot be
handed over: the front answers the requests it took, the last with ``Connection: close``,
and closes. RFC 9112 §9.3.2: a client retries pipelined requests left unanswered by a close.

Answers go out in request order. A connection with no request in progress for
``idle_timeout_s`` is closed, like aiohttp's keep-alive timeout; the connection cap counts
the front's connections with aiohttp's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, NamedTuple, cast

import httptools
import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..core.decisions import DecisionResult
from ..errors import InvalidRequest, ReplayGuardError
from ..logging import REQUEST_CONTEXT
from ..runtime import Runtime
from ..services.apitokens import Caller
from . import callouts, radius
from .app import ROUTE_TABLE, authorised_caller, error_answer, log_request, request_id_for
from .common import (
    API_HEADERS,
    BEARER_CHALLENGE,
    MAX_BODY,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    SERVER_HEADER,
    Route,
    StopsWithClient,
    json_response,
    parse_json,
)
from .state import RUNTIME

log = structlog.get_logger(__name__)

# (status, JSON body or None for an empty answer, the decision behind it)
Answerer = Callable[[Runtime, Caller, Any], Awaitable[tuple[int, Any, DecisionResult]]]
FAST_ROUTES: dict[str, Answerer] = {**callouts.FAST, **radius.FAST}
# The headers the front reads, and those RFC 9110 allows once (aiohttp's parser refuses a
# second one): any of them twice sends the request to aiohttp.
_READ = frozenset((b"authorization", b"content-type", b"x-request-id", b"content-length", b"host",
                   b"content-location", b"content-range", b"etag", b"max-forwards", b"server", b"user-agent"))
# Their presence alone sends the request to aiohttp (a body to decode, an old WebSocket key
# its parser refuses).
_UNUSUAL = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"content-encoding", b"sec-websocket-key1"))
# An incomplete request holding more than a long head and the largest body goes to aiohttp
# at once (its own limits answer it): a decision's head is a few hundred bytes, and what
# the front holds, and copies at each read, per connection stays bounded.
_MAX_HELD = 64 * 1024 + MAX_BODY
_QUEUE_MAX = 32  # pipelined requests held before reading pauses
_SWEEP_S = 1.0
_HOLD_S = 0.5  # a request still incomplete after this (checked at each sweep) goes to aiohttp
# What a connection's parser becomes once the connection is closed or handed over: one
# with no callbacks. A connection's own parser holds its bound methods, a reference cycle
# that reference counting cannot free, and the service's collector thresholds
# (server.py, GC_THRESHOLDS) leave such a cycle, once it has aged, to a full collection,
# which they make rare.
_RELEASED = httptools.HttpRequestParser(None)
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_CHALLENGE = b"WWW-Authenticate: %s\r\n" % BEARER_CHALLENGE.encode()
_API_HEADERS = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in API_HEADERS.items())


class _Divert(Exception):
    """Raised in a parser callback: this request is aiohttp's."""


class _Request(NamedTuple):
    answerer: Answerer
    route: Route
    authorization: str | None
    request_id: str | None
    body: bytes
    keep_alive: bool


def _ascii(value: bytes | None) -> str | None:
    return None if value is None else value.decode("ascii")


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json"


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


def _request_end(chunk: bytes, start: int, body: bytes) -> int:
    """Where a request the front took, begun at ``start`` in ``chunk``, ends: after its head's
    blank line and its body. -1 when ``start`` is not known or the bytes there are not a
    ``POST`` head followed by that body (e.g. blank lines before the request line)."""
    if start < 0 or not chunk.startswith(b"POST ", start):
        return -1
    head_end = chunk.find(b"\r\n\r\n", start)
    if head_end < 0:
        return -1
    end = head_end + 4 + len(body)
    return end if chunk[head_end + 4:end] == body else -1


class FastConnection(asyncio.Protocol):
    """One client connection, until it closes or is handed to aiohttp."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._chunk = b""  # the bytes since the start of the read, or of the request it continues
        self._partial = b""  # a request that began at the start of a read and is not complete yet
        self._partial_since = 0.0  # when that request began
        self._start = 0  # where the request in progress began in ``_chunk``; -1: not known
        self._in_request = False
        self._url = b""
        self._route: tuple[Route, Answerer] | None = None  # the fast route of the request, once its headers are in
        self._headers: dict[bytes, bytes] = {}
        self._header_count = 0
        self._body: list[bytes] = []
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._handover: bytes | None = None  # given to aiohttp once the queue is answered
        self._closing = False  # close once the queue is answered
        self._paused = False
        self._write_paused = False  # the transport's buffer is over its high-water mark
        self._eof = False
        self.last_active = front.loop.time()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._front.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._parser = _RELEASED
        self._front.closed(self)

    def eof_received(self) -> bool:
        # The client sent all it will: answer what was taken, then close (or pass the
        # end on with a handover that waits).
        self._eof = True
        if self._handover is None:
            self._closing = True
        return not (self.idle and self._handover is None)

    def pause_writing(self) -> None:
        # The transport says this once, when its buffer crosses the mark: reading stays
        # paused until it says resume_writing, whatever the queue does meanwhile.
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if len(self._queue) < _QUEUE_MAX:
            self._resume()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._handover is not None or self._transport is None:
            return  # input after a close was decided, or while a handover waits: not ours
        self._chunk = self._partial + data if self._partial else data
        self._partial = b""
        self._start = 0
        try:
            self._parser.feed_data(data)
            # The read ended inside a request: wait for the rest if the front knows where the
            # request began, else it could never hand that request over whole.
            diverted = self._in_request and self._start < 0
        except httptools.HttpParserError:  # malformed, an upgrade, or a callback's _Divert
            diverted = True
        # A request held whole would pass the bound: aiohttp's limits are for it.
        diverted = diverted or (self._in_request and len(self._chunk) - self._start > _MAX_HELD)
        if diverted:  # outside the except block: aiohttp's own errors do not chain to ours
            self._divert()
        elif self._in_request:
            if not self._partial_since:
                self._partial_since = self._front.loop.time()
            self._partial = self._chunk[self._start:]
            self._front.counts.held += 1
        else:
            self._partial_since = 0.0

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE_SIZE:
            raise _Divert

    def on_header(self, name: bytes, value: bytes) -> None:
        # Checked as they come, so that a request held across reads stays bounded.
        self._header_count += 1
        if len(name) + len(value) > MAX_FIELD_SIZE or self._header_count > MAX_HEADERS:
            raise _Divert
        name = name.lower()
        if name in _READ:
            if name in self._headers:
                raise _Divert
            self._headers[name] = value.rstrip(b" \t")  # llhttp keeps trailing whitespace; aiohttp does not
        elif name in _UNUSUAL:
            raise _Divert

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self._headers
        length = headers.get(b"content-length")
        self._route = self._front.routes.get(self._url)
        if (self._route is None or parser.get_method() != b"POST" or b"host" not in headers
                or parser.get_http_version() != "1.1" or parser.should_upgrade()
                or self._header_count > MAX_HEADERS or len(self._url) > MAX_LINE_SIZE
                or length is None or not length.isdigit() or int(length) > MAX_BODY
                or not _is_json(headers.get(b"content-type"))):
            raise _Divert
        for value in headers.values():
            if not value.isascii():
                raise _Divert

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_request = False
        self._partial_since = 0.0  # a request that begins in this read is timed from its own read
        assert self._route is not None  # noqa: S101 - narrows the type for mypy; on_headers_complete diverts every other request
        route, answerer = self._route
        headers = self._headers
        body = b"".join(self._body)
        self._start = _request_end(self._chunk, self._start, body)
        self._queue.append(_Request(
            answerer, route, _ascii(headers.get(b"authorization")), _ascii(headers.get(b"x-request-id")),
            body, self._parser.should_keep_alive()))
        if self._task is None:
            self._next()
        elif len(self._queue) >= _QUEUE_MAX:
            self._pause()

    # answering

    @property
    def idle(self) -> bool:
        return self._task is None and not self._queue

    def _next(self) -> None:
        if self._queue and self._transport is not None:
            self._task = self._front.loop.create_task(self._answer(self._queue.popleft()))
            return
        self._task = None
        if self._transport is None:
            return
        if self._closing:  # the client asked to close: what it sent after is not handed on
            self._transport.close()
        elif self._handover is not None:
            self._hand_over(self._handover)
        elif self._paused:
            self._resume()

    async def _answer(self, request: _Request) -> None:
        try:
            head, body = await self._front.answer(request)
            transport = self._transport
            if transport is not None:
                if not request.keep_alive:
                    self._closing = True
                    self._queue.clear()  # what the client pipelined after its last request
                if self._closing and not self._queue:
                    head += b"Connection: close\r\n"
                transport.write(b"".join((head, b"\r\n", body)))
                self.last_active = self._front.loop.time()
        finally:
            self._next()

    def _divert(self) -> None:
        """This request is aiohttp's: hand the connection over, or close if that is impossible."""
        if self._transport is None:
            return
        if self._start < 0:
            # llhttp does not say where in this read the request began.
            self._closing = True
            self._front.counts.closed += 1
            if self.idle:
                self._transport.close()
            return
        if self.idle:
            self._hand_over(self._chunk[self._start:])
        else:  # after the answers already owed on this connection
            self._handover = self._chunk[self._start:]
            self._pause()

    def _hand_over(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None  # noqa: S101 - narrows the type for mypy: connection_made set it
        self._transport = None
        self._parser = _RELEASED
        self._front.closed(self)
        self._front.counts.handed_over += 1
        handler = self._front.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        handler.data_received(data)
        if self._eof:
            handler.eof_received()

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self._write_paused and self._transport is not None and self._handover is None:
            self._paused = False
            if self._partial:
                self._partial_since = self._front.loop.time()
            self._transport.resume_reading()

    def close_if_idle(self, now: float | None) -> None:
        """Closes an idle connection (at shutdown, or past the idle timeout when ``now`` is given)."""
        if self._transport is None:
            return
        # A request held while reading is paused waits on us, not on the client: only time
        # spent reading counts (``_resume`` restarts the clock).
        if self._partial and not self._paused and now is not None and now - self._partial_since > _HOLD_S:
            self._partial = b""
            self._divert()  # a slow client: aiohttp's timeouts (408) are for it
            return
        if now is None:
            self._closing = True
        if self.idle and (now is None or now - self.last_active > self._front.idle_timeout_s):
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class ContractRequestHandler(StopsWithClient, RequestHandler):
    """aiohttp's request handler, except for the answers aiohttp writes itself, and
    stopping the requests that stop with their client (``common.stops_with_client``).

    A request aiohttp cannot parse (a bad request line or header, a line over the limits)
    never reaches our middleware: aiohttp answered it with a text/plain body quoting the
    offending line, and logged that line with a traceback, so a malformed
    ``Authorization: Bearer …`` header came back in the answer and went to the log in
    clear. Here the answer is the contract's error body, and the log line names only the
    status and the error's type.
    """

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client_gone()
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: a response already began
            raise ConnectionError("the response was already started")
        log.warning("bad_http_request", status=status, error=None if exc is None else type(exc).__name__)
        error = (InvalidRequest("the request is not valid HTTP") if 400 <= status < 500
                 else ReplayGuardError("internal error"))
        response = json_response(error.body(), status=status, headers={"Server": SERVER_HEADER, **API_HEADERS})
        response.force_close()
        return response


class Front:
    """The protocol factory on the listening socket, in place of aiohttp's ``web.Server``.

    It hands out a ``FastConnection`` per connection (``http_front = "fast"``) or else
    aiohttp's request handler, and makes aiohttp's handlers (``ContractRequestHandler``)
    for the connections handed over; shutdown covers both.
    """

    def __init__(self, server: web.Server, app: web.Application) -> None:
        self._server = server
        self._handler_args: dict[str, Any] = server._kwargs  # what aiohttp's Server passes its handlers
        self._runtime: Runtime = app[RUNTIME]
        self._fast = self._runtime.settings.http_front == "fast"
        self.loop = asyncio.get_running_loop()
        self.idle_timeout_s = float(self._runtime.settings.idle_timeout_s)
        routes: dict[str, Route] = {route.path: route for route in app[ROUTE_TABLE].values()}
        self.routes: dict[bytes, tuple[Route, Answerer]] = {
            path.encode(): (routes[path], answerer) for path, answerer in FAST_ROUTES.items()}
        self._live: set[FastConnection] = set()
        self.counts = self._runtime.metrics.front
        self._date = _Date()
        self._sweeper = self.loop.create_task(self._sweep())

    def __call__(self) -> asyncio.BaseProtocol:
        return FastConnection(self) if self._fast else self.aiohttp_protocol()

    def aiohttp_protocol(self) -> asyncio.Protocol:
        return ContractRequestHandler(self._server, loop=self.loop, **self._handler_args)

    @property
    def connections(self) -> list[object]:
        return [*self._server.connections, *self._live]

    def opened(self, connection: FastConnection) -> None:
        self._live.add(connection)

    def closed(self, connection: FastConnection) -> None:
        self._live.discard(connection)

    async def answer(self, request: _Request) -> tuple[bytes, bytes]:
        """The head (without its closing blank line) and body of the answer to one
        decision request; never raises."""
        start = time.perf_counter()
        self.counts.answered += 1
        route = request.route
        request_id = request_id_for(request.request_id)
        decision = reason = None
        reset = REQUEST_CONTEXT.set({"request_id": request_id, "route": route.path, "audience": route.audience})
        try:
            try:
                caller = await authorised_caller(self._runtime, route, request.authorization)
                status, payload, result = await request.answerer(self._runtime, caller, parse_json(request.body))
                decision, reason = result.verdict.value, result.reason.value
            except Exception as exc:  # noqa: BLE001 - rendered as the contract's error body
                status, payload = error_answer(exc)
            elapsed = time.perf_counter() - start
            log_request("POST", status, elapsed, decision, reason)
        finally:
            REQUEST_CONTEXT.reset(reset)
        self._runtime.metrics.http_request(route.path, "POST", status, elapsed)
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
        tail = b"X-Request-Id: %s\r\nDate: %s\r\nServer: %s\r\n%s" % (
            request_id.encode(), self._date(), SERVER_HEADER.encode(), _API_HEADERS)
        if status == 401:  # as app.edge: every 401 names the scheme (RFC 9110 §15.5.2, RFC 6750 §3)
            tail += _CHALLENGE
        if payload is None:  # 204: no body, so neither length nor type (RFC 9110 §8.6)
            return line + tail, b""
        body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS, default=str)
        return line + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + tail, body

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = self.loop.time()
            for connection in list(self._live):
                connection.close_if_idle(now)

    # what aiohttp's runner calls at cleanup

    def pre_shutdown(self) -> None:
        self._sweeper.cancel()
        for connection in list(self._live):
            connection.close_if_idle(None)
        self._server.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        deadline = self.loop.time() + (timeout or 0)
        while self._live and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._live):
            connection.abort()
        await self._server.shutdown(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class FrontRunner(web.AppRunner):
    """An ``AppRunner`` whose server is the front over aiohttp's: the fast lane when
    ``http_front = "fast"``, aiohttp's handlers (with the contract's error answers) always."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return cast(web.Server, Front(server, self.app))
