"""What every HTTP module shares: the route table entry, JSON in and out, app state keys.

Each audience module exposes ``ROUTES``: the one list the app registers, the middleware
authorises, the OpenAPI document describes and the access-control test walks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .state import CLIENT_LEFT, DECISION, REASON, RUNTIME

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 64 * 1024
# Request line and header limits (aiohttp's parser answers 400 past them).
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 16 * 1024
MAX_HEADERS = 64


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    roles: tuple[str, ...] | None  # None: no token needed (health, metrics, openapi)
    summary: str
    audience: str
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
    status: int = 200
    query: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default=())
    errors: tuple[tuple[int, str], ...] = ()  # further error statuses the route answers (OpenAPI)
    responses: tuple[tuple[int, dict[str, Any]], ...] = ()  # OpenAPI responses given verbatim

    def allows(self, role: str) -> bool:
        return self.roles is None or role == "admin" or role in self.roles


# What every answer says in ``Server``: not aiohttp's default, which names its version.
SERVER_HEADER = "replayguard"
# What every answer of the API carries (both fronts; the console's files set their own,
# ``console.HEADERS``). Answers hold alerts, principals, receipts and enrolment secrets:
# no cache keeps them, a browser never reads one as anything but JSON (or runs it as a
# script the console's ``script-src 'self'`` would admit), and no page frames one.
API_HEADERS = {
    "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
# The challenge every 401 carries in ``WWW-Authenticate`` (RFC 9110 §15.5.2: a 401 MUST
# have one; RFC 6750 §3: the scheme of a bearer-token resource is ``Bearer``).
BEARER_CHALLENGE = "Bearer"


async def set_answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: ``Server`` and, unless the answer sets its own,
    ``API_HEADERS`` on every answer, errors and streamed ones (SSE) included."""
    response.headers["Server"] = SERVER_HEADER
    for name, value in API_HEADERS.items():
        response.headers.setdefault(name, value)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z, default=str),
        status=status, content_type="application/json", headers=headers,
    )


async def read_body(request: web.Request) -> bytes:
    """The raw request body, after the contract's media-type, size and time checks.

    aiohttp keeps the body once read, so a signature check and ``read_json`` may both call
    this and the socket is read once.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"the request body must be at most {MAX_BODY} bytes")
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the request body must be application/json")
    try:
        if request.content.is_eof():  # the whole body came with the headers: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(request.app[RUNTIME].settings.request_timeout_s):
                raw = await request.read()
    except TimeoutError:
        raise RequestTimeout("the request body was not received in time") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body must be at most {MAX_BODY} bytes") from None
    except web.RequestPayloadError:  # a Content-Encoding the body does not have, or a broken chunk
        raise InvalidRequest("the request body could not be decoded") from None
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"the request body must be at most {MAX_BODY} bytes")
    return raw


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, after the checks of ``read_body``."""
    return parse_json(await read_body(request))


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None


def note_decision(request: web.Request, decision: str, reason: str) -> None:
    """Puts the decision on the request so the access log line can carry it."""
    request[DECISION] = decision
    request[REASON] = reason


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", field=name)
    return value


class StopsWithClient:
    """A request handler (the protocol of one connection) that cancels the tasks of the
    requests that asked for it (``stops_with_client``) when its client goes away.

    aiohttp cancels a handler whose client disconnected only with ``handler_cancellation``,
    which the service leaves off (``server.handler_limits``): most handlers write, and one
    cut at an arbitrary await would have to be safe there. A handler whose work is long and
    read-only opts in instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping_with_client: set[asyncio.Task[Any]] = set()

    def client_gone(self) -> None:
        """Cancels the requests that stop with their client (from ``connection_lost``)."""
        tasks, self.stopping_with_client = self.stopping_with_client, set()
        for task in tasks:
            task.cancel()


@contextlib.contextmanager
def stops_with_client(request: web.Request) -> Iterator[None]:
    """The work in this block is cancelled when the request's client closes the connection
    first (the analyst left the page that asked). Only for work that may stop at any await:
    reads, not writes. A no-op on a connection handler that is not ``StopsWithClient``.
    A request it stopped is marked ``CLIENT_LEFT``: its access line and metric say 499."""
    handler, task = request.protocol, asyncio.current_task()
    if not isinstance(handler, StopsWithClient) or task is None:
        yield
        return
    handler.stopping_with_client.add(task)
    try:
        yield
    except asyncio.CancelledError:
        # client_gone took the task out of the set before cancelling it; a cancellation
        # with the task still in it came from elsewhere (a shutdown).
        if task not in handler.stopping_with_client:
            request[CLIENT_LEFT] = True
        raise
    finally:
        handler.stopping_with_client.discard(task)
