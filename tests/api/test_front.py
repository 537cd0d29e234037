"""The fast front (``http/front.py``) over raw sockets: what it takes, what it hands to
aiohttp, and that a client cannot tell the difference except by speed.

Every other API test also goes through the front (``ServiceTestServer``); these cover the
HTTP edges: pipelining, requests split across reads, keep-alive and close, unusual
headers, malformed input, the idle timeout and the handover's counters.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import secrets
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import pyotp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from replayguard.http.front import Front
from replayguard.http.server import handler_limits
from replayguard.metrics import FrontCounts
from tests.conftest import Api, front_counts, scrape

pytestmark = pytest.mark.timeout(60)


async def test_the_api_tests_serve_the_app_with_the_arguments_serve_passes(api: Api) -> None:
    """The API tests' server (``ServiceTestServer``) gives aiohttp's request handlers what
    ``serve`` gives them, not TestServer's ``handler_cancellation=True``: a handler whose
    client left is cancelled in neither."""
    runner = api.client.server.runner
    assert runner is not None and runner.server is not None
    limits = handler_limits(api.runtime.settings)
    assert runner.server.handler_cancellation is limits.pop("handler_cancellation") is False
    assert limits.items() <= cast(Front, runner.server)._handler_args.items()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Collector:
    answers: list[Answer] = field(default_factory=list)
    _headers: dict[str, str] = field(default_factory=dict)
    _body: bytearray = field(default_factory=bytearray)
    parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self.parser.get_status_code(), self._headers, bytes(self._body)))
        self._headers, self._body = {}, bytearray()


class Raw:
    """A client that writes exactly the bytes it is given and parses what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.collector = _Collector()
        self.collector.parser = httptools.HttpResponseParser(self.collector)
        self.closed = False

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answers(self, n: int, timeout: float = 20) -> list[Answer]:
        async with asyncio.timeout(timeout):
            while len(self.collector.answers) < n and not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    break
                self.collector.parser.feed_data(data)
        return self.collector.answers[:n]

    async def wait_closed(self, timeout: float = 20) -> bool:
        async with asyncio.timeout(timeout):
            while not self.closed:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:  # closed with our input unread: a reset, still a close
                    data = b""
                if not data:
                    self.closed = True
                else:
                    self.collector.parser.feed_data(data)
        return self.closed

    def close(self) -> None:
        self.writer.close()


@pytest_asyncio.fixture
async def raw(api: Api) -> AsyncIterator[Any]:
    opened: list[Raw] = []

    async def connect() -> Raw:
        reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
        conn = Raw(reader, writer)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


class Counted:
    """The front's own counters (``replayguard_http_fast_answers_total`` and
    ``replayguard_http_front_handoffs_total``) since the test began; equal to a dict of
    the same keys, where a missing ``closed`` means none."""

    def __init__(self, counts: FrontCounts) -> None:
        self._counts = counts
        self._start = self._now()

    def _now(self) -> tuple[int, int, int]:
        return self._counts.answered, self._counts.handed_over, self._counts.closed

    def as_dict(self) -> dict[str, int]:
        deltas = (n - s for n, s in zip(self._now(), self._start, strict=True))
        return dict(zip(("fast", "handover", "closed"), deltas, strict=True))

    def reset(self) -> None:
        self._start = self._now()

    def __getitem__(self, key: str) -> int:
        return self.as_dict()[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and self.as_dict() == {"closed": 0, **other}

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.as_dict())


@pytest.fixture
def counted(api: Api) -> Counted:
    """How many requests the front answered itself and how many connections it handed over."""
    return Counted(api.runtime.metrics.front)


async def _until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Waits (bounded) until ``condition`` holds: synchronisation by observation."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def nonce_request(api: Api, nonce: str, *, extra: bytes = b"", version: bytes = b"1.1",
                  path: bytes = b"/v1/nonces/consume", content_type: bytes = b"application/json",
                  request_id: bytes | None = None) -> bytes:
    body = json.dumps({"vm_id": "vm-front", "scope": "ssh:front", "nonce": nonce}).encode()
    head = (b"POST " + path + b" HTTP/" + version + b"\r\nHost: x\r\nContent-Type: " + content_type +
            b"\r\nAuthorization: Bearer " + api.tokens["callout"].encode() +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n")
    if request_id is not None:
        head += b"X-Request-Id: " + request_id + b"\r\n"
    return head + extra + b"\r\n" + body


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_pipelined_decisions_are_answered_in_order(api: Api, raw: Any, counted: Counted) -> None:
    """Pipelined decisions on one connection are all answered by the front, in order, each with its own request id."""
    conn = await raw()
    await conn.send(b"".join(nonce_request(api, f"pipe-{i}", request_id=b"rid-%d" % i) for i in range(5))
                    + nonce_request(api, "pipe-0", request_id=b"rid-again"))
    answers = await conn.answers(6)
    assert [a.headers["x-request-id"] for a in answers] == [f"rid-{i}" for i in range(5)] + ["rid-again"]
    assert [a.json()["reason"] for a in answers] == ["ok"] * 5 + ["reused"]
    assert counted == {"fast": 6, "handover": 0}
    assert not conn.closed


async def test_a_client_that_reads_nothing_is_paused_then_gets_every_answer(api: Api, counted: Counted) -> None:
    """Back-pressure: a client pipelining 1,500 decisions while reading nothing (a 4 KiB receive
    buffer) fills the front's write buffer, and the front stops reading from it; the request
    its last read ended inside is not taken for a slow client's, however long the pause; once
    the client reads, every answer arrives, in order, and the front reads that connection again."""
    front = _front_of(api)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (api.client.host, api.client.port))
    conn = Raw(*await asyncio.open_connection(sock=sock))
    count = 1500
    try:
        conn.writer.write(b"".join(nonce_request(api, f"bp-{i}", request_id=b"bp-%d" % i) for i in range(count)))
        await _until(lambda: any(getattr(c, "_paused", False) for c in front._live))
        paused = next(c for c in front._live if c._paused)
        # Sweeps long after: a request held while reading is paused waits on the front, not
        # on a slow client, so it stays (it went to aiohttp, the connection with it).
        held = paused._partial
        assert held  # the read that filled the queue ended inside a request
        for _ in range(3):
            paused.close_if_idle(asyncio.get_running_loop().time() + 60)
        assert paused._partial == held and paused._handover is None
        answers = await conn.answers(count, timeout=60)
        assert [a.headers["x-request-id"] for a in answers] == [f"bp-{i}" for i in range(count)]
        assert {a.json()["reason"] for a in answers} == {"ok"}
        await _until(lambda: not paused._paused)
        assert counted == {"fast": count, "handover": 0} and not conn.closed
    finally:
        conn.close()


async def test_metrics_count_the_fast_answers_and_the_handoffs(api: Api, raw: Any) -> None:
    """/metrics says how many decisions the front answered and how many connections it gave up."""
    url = str(api.client.make_url("")).rstrip("/")  # each scrape on a connection of its own: one handover
    before = await front_counts(url)
    conn = await raw()
    await conn.send(nonce_request(api, "metrics-1") + nonce_request(api, "metrics-2"))
    await conn.answers(2)
    await conn.send(HEALTH)  # hands this connection over
    await conn.answers(3)
    mixed = await raw()
    await mixed.send(nonce_request(api, "metrics-3") + HEALTH)  # the front knows where HEALTH began
    assert [a.status for a in await mixed.answers(2)] == [200, 200]
    lost = await raw()  # a blank line before the second request: the front loses where it began
    await lost.send(nonce_request(api, "metrics-4") + b"\r\n" + nonce_request(api, "metrics-5") + HEALTH)
    assert await lost.wait_closed()
    after = await front_counts(url)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta == {"replayguard_http_fast_answers_total": 5,
                     'replayguard_http_front_handoffs_total{outcome="aiohttp"}': 3,
                     'replayguard_http_front_handoffs_total{outcome="closed"}': 1}, delta


async def test_the_fast_fronts_answers_are_in_the_request_count_and_latency(api: Api, raw: Any) -> None:
    """A decision the front answers is counted with its route and status, and timed, where the
    alert rules on 503 answers and on decision latency look (deploy/prometheus)."""
    url = str(api.client.make_url("")).rstrip("/")
    counted = 'replayguard_http_requests_total{method="POST",route="/v1/nonces/consume",status="200"}'
    timed = 'replayguard_http_request_duration_seconds_count{route="/v1/nonces/consume"}'
    names = (counted, timed, "replayguard_http_fast_answers_total")
    before = await scrape(url, *names)
    conn = await raw()
    await conn.send(nonce_request(api, "counted-1") + nonce_request(api, "counted-2"))
    assert [a.status for a in await conn.answers(2)] == [200, 200]
    after = await scrape(url, *names)
    assert {name: after[name] - before.get(name, 0) for name in after} == {
        "replayguard_http_fast_answers_total": 2, counted: 2, timed: 2}


async def test_keep_alive_then_another_route_hands_over(api: Api, raw: Any, counted: Counted) -> None:
    """A kept-alive connection that asks another route is handed to aiohttp, which then decides correctly too."""
    conn = await raw()
    await conn.send(nonce_request(api, "ka-1"))
    assert [a.status for a in await conn.answers(1)] == [200]
    await conn.send(HEALTH)
    answers = await conn.answers(2)
    assert answers[1].status == 200 and answers[1].json()["status"] == "ok"
    await conn.send(nonce_request(api, "ka-2"))  # aiohttp's from now on, and still right
    answers = await conn.answers(3)
    assert answers[2].status == 200 and answers[2].json()["decision"] == "accept"
    assert counted == {"fast": 1, "handover": 1}


@pytest.mark.parametrize("cuts", [(40,), (-2,), (10, 60, -30), "headers|body"])
async def test_a_request_split_across_reads_is_still_the_fronts(
        api: Api, raw: Any, counted: Counted, cuts: tuple[int, ...] | str) -> None:
    """A request that began at the start of a read is answered by the front however its bytes are cut."""
    request = nonce_request(api, "split")
    if cuts == "headers|body":  # how Python's http.client writes: headers, then the body
        cuts = (request.index(b"\r\n\r\n") + 4,)
    conn = await raw()
    counts = api.runtime.metrics.front
    start = 0
    assert not isinstance(cuts, str)  # "headers|body" was made its cut above
    for cut in cuts:
        end = cut if cut >= 0 else len(request) + cut
        held = counts.held
        await conn.send(request[start:end])

        def kept_more(before: int = held) -> bool:
            return counts.held > before

        await _until(kept_more)  # the front read this part alone, and kept it
        start = end
    await conn.send(request[start:])
    answers = await conn.answers(1)
    assert answers[0].status == 200 and answers[0].json()["decision"] == "accept"
    assert counted == {"fast": 1, "handover": 0}


async def test_a_split_request_that_turns_unusual_is_handed_over_whole(
        api: Api, raw: Any, counted: Counted) -> None:
    """Held across reads, a request whose later headers break a
    rule goes to aiohttp with every byte, and is answered."""
    request = nonce_request(api, "split-unusual")
    head, body = request.split(b"\r\n\r\n", 1)
    conn = await raw()
    held = api.runtime.metrics.front.held
    await conn.send(head[:30])
    await _until(lambda: api.runtime.metrics.front.held > held)
    await conn.send(head[30:] + b"\r\nX-Extra: 1\r\nExpect: 100-continue\r\n\r\n")
    await conn.send(body)
    answers = await conn.answers(2)  # aiohttp's 100 Continue, then the decision
    assert answers[-1].status == 200 and answers[-1].json()["decision"] == "accept"
    assert counted == {"fast": 0, "handover": 1}


async def test_mixed_pipeline_hands_over_at_the_first_request_not_taken(api: Api, raw: Any, counted: Counted) -> None:
    """A decision and a health check in one read: the front answers the decision, then hands
    aiohttp the bytes from where the health check began, and the connection stays open."""
    conn = await raw()
    await conn.send(nonce_request(api, "mixed-1") + HEALTH)
    answers = await conn.answers(2)
    assert [a.status for a in answers] == [200, 200] and answers[0].json()["reason"] == "ok"
    assert counted == {"fast": 1, "handover": 1}
    await conn.send(HEALTH)
    assert (await conn.answers(3))[2].status == 200 and not conn.closed


async def test_a_request_whose_start_is_lost_ends_the_connection(api: Api, raw: Any, counted: Counted) -> None:
    """A blank line between pipelined requests hides where the next began: the front answers
    what it took, the last with Connection: close, and closes; the client retries the rest."""
    conn = await raw()
    await conn.send(nonce_request(api, "lost-1") + b"\r\n" + nonce_request(api, "lost-2") + HEALTH)
    answers = await conn.answers(3)
    assert await conn.wait_closed()
    assert [a.json()["reason"] for a in answers] == ["ok", "ok"]
    assert answers[1].headers["connection"].lower() == "close"
    assert counted == {"fast": 2, "handover": 0, "closed": 1}


@pytest.mark.parametrize("case", ["http10", "chunked", "expect", "query", "duplicate_auth",
                                  "charset", "other_type"])
async def test_unusual_requests_get_aiohttps_answer(api: Api, raw: Any, counted: Counted, case: str) -> None:
    """A decision request the front does not parse plainly (HTTP/1.0, chunked, a query, ...) gets aiohttp's answer."""
    nonce = f"unusual-{case}"
    body = json.dumps({"vm_id": "vm-front", "scope": "ssh:front", "nonce": nonce}).encode()
    auth = b"Authorization: Bearer " + api.tokens["callout"].encode() + b"\r\n"
    if case == "http10":
        request = nonce_request(api, nonce, version=b"1.0")
    elif case == "chunked":
        request = (b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth +
                   b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    elif case == "expect":
        request = nonce_request(api, nonce, extra=b"Expect: 100-continue\r\n")
    elif case == "query":
        request = nonce_request(api, nonce, path=b"/v1/nonces/consume?x=1")
    elif case == "duplicate_auth":
        request = nonce_request(api, nonce, extra=b"Authorization: Bearer nope\r\n")
    elif case == "charset":
        request = nonce_request(api, nonce, content_type=b"Application/JSON; charset=utf-8")
    else:
        request = nonce_request(api, nonce, content_type=b"text/plain")
    conn = await raw()
    await conn.send(request)
    answers = await conn.answers(2 if case == "expect" else 1)
    final = answers[-1]
    expected = {"other_type": 415, "duplicate_auth": 200}.get(case, 200)
    if case == "charset":
        # Parameters are the front's to take: still a decision, answered by the front.
        assert counted == {"fast": 1, "handover": 0}
    else:
        assert counted == {"fast": 0, "handover": 1}
    assert final.status == expected, (case, final)
    if expected == 200:
        assert final.json()["decision"] == "accept"
    else:
        assert final.json()["error"]["code"] == "unsupported_media_type"


async def test_connection_close_and_http10_close_after_the_answer(api: Api, raw: Any) -> None:
    """After a request asking to close, the front answers it, closes, and decides nothing the client sent after."""
    conn = await raw()
    await conn.send(nonce_request(api, "close-1", extra=b"Connection: close\r\n") + nonce_request(api, "close-2"))
    answers = await conn.answers(2)
    assert await conn.wait_closed()
    assert len(answers) == 1 and answers[0].headers["connection"].lower() == "close"
    assert answers[0].json()["decision"] == "accept"
    # close-2 came after the client's own "close": never decided, so still fresh.
    conn = await raw()
    await conn.send(nonce_request(api, "close-2"))
    assert (await conn.answers(1))[0].json()["reason"] == "ok"


async def test_half_closed_client_still_gets_its_answer(api: Api, raw: Any, counted: Counted) -> None:
    """A client that shuts its sending side after the request still gets the front's answer before the close."""
    conn = await raw()
    await conn.send(nonce_request(api, "half-closed"))
    conn.writer.write_eof()
    answers = await conn.answers(1)
    assert answers[0].json()["decision"] == "accept"
    assert await conn.wait_closed()
    assert counted["fast"] == 1


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02 not http\r\n\r\n", b"POST /v1/nonces/consume HTTP/9.9\r\n\r\n",
                                     b"POST /v1/nonces/consume HTTP/1.1\r\nContent-Length: -5\r\n\r\n"])
async def test_malformed_requests_are_400_and_decisions_go_on(api: Api, raw: Any, garbage: bytes) -> None:
    """Garbage on a connection gets a 400, and the next connection's decision is accepted as usual."""
    conn = await raw()
    await conn.send(garbage)
    answers = await conn.answers(1)
    assert answers and answers[0].status == 400
    conn = await raw()
    await conn.send(nonce_request(api, f"after-garbage-{garbage[:4].hex()}"))
    assert (await conn.answers(1))[0].json()["decision"] == "accept"


async def test_errors_on_the_front_are_the_contract_body(api: Api, raw: Any, counted: Counted) -> None:
    """Errors the front answers itself (bad JSON, no bearer token, missing fields) carry the contract's error body."""
    conn = await raw()
    bad_json = nonce_request(api, "x").rsplit(b"\r\n\r\n", 1)[0]
    bad_json = bad_json.replace(b"Content-Length: ", b"X-Old-Length: ") + b"\r\nContent-Length: 3\r\n\r\n{x}"
    no_token = nonce_request(api, "no-token").replace(b"Authorization: Bearer ", b"Authorization: Basic ")
    missing = nonce_request(api, "x").rsplit(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    missing = missing.replace(b"Content-Length: ", b"X-Old-Length: ").replace(
        b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\n{}", 1)
    await conn.send(bad_json + no_token + missing)
    answers = await conn.answers(3)
    assert [(a.status, a.json()["error"]["code"]) for a in answers] == [
        (400, "invalid_request"), (401, "unauthorized"), (400, "invalid_request")]
    assert all(a.headers["content-type"] == "application/json" and a.headers["x-request-id"] for a in answers)
    assert counted == {"fast": 3, "handover": 0}


async def test_idle_connections_are_closed(api_factory: Any) -> None:
    """A connection left idle past the idle timeout is closed by the server."""
    api = await api_factory(idle_timeout_s=1)
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    conn = Raw(reader, writer)
    try:
        await conn.send(nonce_request(api, "idle"))
        assert (await conn.answers(1))[0].status == 200
        assert await conn.wait_closed(timeout=15)  # bounded; the sweep closes it after ~1-2 s
    finally:
        conn.close()


async def test_the_aiohttp_front_answers_the_same(api_factory: Any) -> None:
    """``http_front = "aiohttp"`` serves the decision routes through aiohttp alone."""
    api = await api_factory(http_front="aiohttp")
    status, body = await api.post("/v1/nonces/consume", {"vm_id": "vm-a", "scope": "s", "nonce": "aiohttp-front"})
    assert status == 200 and body["decision"] == "accept"
    status, body = await api.post("/v1/nonces/consume", {"vm_id": "vm-a", "scope": "s", "nonce": "aiohttp-front"})
    assert body["reason"] == "reused"


def _mutations() -> st.SearchStrategy[tuple[bytes, list[int]]]:
    """A valid decision request (or two, pipelined), then cut, flipped, doubled or spliced,
    and sent in pieces cut at random points."""
    base = st.sampled_from(["one", "two"])
    edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "crlf"]),
                               st.integers(0, 400), st.binary(min_size=1, max_size=4)), max_size=4)
    cuts = st.lists(st.integers(1, 400), max_size=3)
    return st.tuples(base, edits, cuts).map(lambda t: (_mutate(t[0], t[1]), sorted(set(t[2]))))


_TEMPLATE = (b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s")


def _mutate(kind: str, edits: list[tuple[str, int, bytes]]) -> bytes:
    body = b'{"vm_id":"vm-fuzz","scope":"fuzz","nonce":"NONCE"}'
    one = _TEMPLATE % (b"TOKEN", len(body), body)
    data = bytearray(one * (2 if kind == "two" else 1))
    for op, at, chunk in edits:
        at %= len(data) + 1
        if op == "flip" and at < len(data):
            data[at] ^= chunk[0] or 1
        elif op == "insert":
            data[at:at] = chunk
        elif op == "delete":
            del data[at:at + len(chunk)]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = b"\r\n"
    return bytes(data)


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_mutations())
async def test_fuzzed_bytes_never_5xx_and_never_stop_the_front(api: Api, case: tuple[bytes, list[int]]) -> None:
    """Mangled, truncated and pipelined requests sent in pieces: every answer is below 500,
    the connection ends once the client has sent all, and the next decision is answered."""
    data, cuts = case
    data = data.replace(b"TOKEN", api.tokens["callout"].encode()).replace(b"NONCE", secrets.token_hex(8).encode())
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    conn = Raw(reader, writer)
    try:
        start = 0
        try:
            for cut in [c for c in cuts if c < len(data)] + [len(data)]:
                await conn.send(data[start:cut])
                start = cut
                await asyncio.sleep(0)
            writer.write_eof()
        except OSError:
            pass  # the server answered 400 and closed before the client had sent all
        await conn.wait_closed(timeout=20)
        assert all(answer.status < 500 for answer in conn.collector.answers), conn.collector.answers
    finally:
        conn.close()
    fresh = await asyncio.open_connection(api.client.host, api.client.port)
    check = Raw(*fresh)
    try:
        await check.send(nonce_request(api, secrets.token_hex(8)))
        assert (await check.answers(1))[0].json()["decision"] == "accept"
    finally:
        check.close()


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(["nonce", "nonce", "nonce", "health"]), min_size=1, max_size=12),
       cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=8))
async def test_a_pipelined_stream_cut_anywhere_gets_every_answer_in_order(
    api: Api, kinds: list[str], cuts: list[int],
) -> None:
    """Decisions and health checks pipelined on one connection, the bytes cut into pieces at
    any points: every request is answered, in order, decisions each accepted once, and the
    connection stays open (the front takes what it can and hands aiohttp the rest whole)."""
    tag = secrets.token_hex(4)
    requests = [nonce_request(api, f"{tag}-{i}", request_id=f"{tag}-{i}".encode()) if kind == "nonce" else HEALTH
                for i, kind in enumerate(kinds)]
    data = b"".join(requests)
    conn = Raw(*await asyncio.open_connection(api.client.host, api.client.port))
    try:
        start = 0
        for cut in [*sorted({c for c in cuts if c < len(data)}), len(data)]:
            await conn.send(data[start:cut])
            start = cut
            await asyncio.sleep(0)
        answers = await conn.answers(len(kinds))
        assert [a.status for a in answers] == [200] * len(kinds)
        decided = [a for a, kind in zip(answers, kinds, strict=True) if kind == "nonce"]
        assert [a.headers["x-request-id"] for a in decided] == [
            f"{tag}-{i}" for i, kind in enumerate(kinds) if kind == "nonce"]
        assert {a.json()["reason"] for a in decided} <= {"ok"}
        assert not conn.closed
    finally:
        conn.close()


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_unparseable_http_gets_the_contract_body_and_never_echoes_a_token(
    api_factory: Any, front: str,
) -> None:
    """A header aiohttp cannot parse used to come back quoted in a text/plain 400 and go to
    the log in clear with a traceback; now the answer is the contract's error body, and
    neither it nor any log line holds the token."""
    api = await api_factory(http_front=front)
    token = api.tokens["callout"]
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    conn = Raw(reader, writer)
    try:
        with capture_logs() as logs:
            await conn.send(b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Authorization: Bearer " + token.encode() + b"\x01zz\r\nContent-Length: 2\r\n\r\n{}")
            answers = await conn.answers(1)
            await conn.wait_closed()
    finally:
        conn.close()
    assert answers[0].status == 400 and answers[0].headers["content-type"].startswith("application/json")
    assert answers[0].json() == {"error": {"code": "invalid_request", "message": "the request is not valid HTTP"}}
    assert token.encode() not in answers[0].body
    assert token not in json.dumps(logs, default=str)
    assert [entry["event"] for entry in logs if entry.get("log_level") == "warning"] == ["bad_http_request"]


async def test_radius_on_the_front_is_the_accept_marker_or_a_401(api: Api, raw: Any, counted: Counted) -> None:
    """rlm_rest's POST is the front's too: an accept is a 200 with the accept marker; a
    reject is the 401 with its Reply-Message."""
    principal = "front-radius"
    code = pyotp.TOTP((await api.enroll(principal))["secret"]).at(api.clock.now)
    counted.reset()  # the enrolment was aiohttp's
    body = json.dumps({"User-Name": {"type": "string", "value": [principal]},
                       "User-Password": {"type": "string", "value": [code]},
                       "NAS-Identifier": {"type": "string", "value": ["nas-front"]}}).encode()
    request = (b"POST /v1/radius/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + api.tokens["callout"].encode() +
               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    conn = await raw()
    await conn.send(request + request)
    accept, reject = await conn.answers(2)
    assert accept.status == 200 and accept.json() == {"control:Tmp-String-0": "replayguard-accept"}
    assert reject.status == 401 and reject.json() == {"reply:Reply-Message": "One-time password already used"}
    assert counted == {"fast": 2, "handover": 0}


def _front_of(api: Api) -> Front:
    runner = api.client.server.runner
    assert runner is not None
    return cast(Front, runner.server)


async def _freed_once(api: Api, raw: Any, ending: Callable[[Raw], Awaitable[None]]) -> bool:
    """Whether a connection that made one fast decision is freed by reference counting alone
    (the cyclic collector off) once ``ending`` has closed it or handed it over."""
    front = _front_of(api)
    before = set(front._live)
    gc.disable()
    try:
        conn = await raw()
        await conn.send(nonce_request(api, secrets.token_hex(8)))
        assert (await conn.answers(1))[0].status == 200
        [mine] = front._live - before
        ref = weakref.ref(mine)
        del mine
        await ending(conn)
        # connection_lost (or the handover) takes it out of the front's set, and the
        # transport lets go of it in the same callback, before this wait can resume.
        await _until(lambda: ref() not in front._live)
        return ref() is None
    finally:
        gc.enable()


async def test_a_closed_connection_is_freed_at_once(api: Api, raw: Any) -> None:
    """A connection the client closed is freed by reference counting, not left to the cyclic
    collector (whose thresholds leave an aged cycle to a rare full collection): its parser
    lets go of it."""
    async def close(conn: Raw) -> None:
        conn.close()
    assert await _freed_once(api, raw, close)


async def test_a_handed_over_connection_is_freed_at_once(api: Api, raw: Any, counted: Counted) -> None:
    """The front's object for a connection handed to aiohttp is freed by reference counting
    as soon as aiohttp has it, however long the connection then lives."""
    async def hand_over(conn: Raw) -> None:
        await conn.send(HEALTH)
        assert (await conn.answers(2))[1].status == 200
    assert await _freed_once(api, raw, hand_over)
    assert counted == {"fast": 1, "handover": 1}


async def _exchange(api: Api, data: bytes) -> list[Answer]:
    """One connection: ``data`` written, the first answer read."""
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    conn = Raw(reader, writer)
    try:
        await conn.send(data)
        return await conn.answers(1)
    finally:
        conn.close()


# Requests aiohttp's parser refuses (RFC 9112 §3.2: no Host, or two; RFC 9110's singleton
# headers twice; the old WebSocket key): the front must not decide them.
_REFUSED = {
    "no_host": b"",
    "duplicate_host": b"Host: other.example\r\n",
    "duplicate_user_agent": b"User-Agent: a\r\nUser-Agent: b\r\n",
    "duplicate_server": b"Server: a\r\nServer: b\r\n",
    "duplicate_etag": b'ETag: "1"\r\nETag: "2"\r\n',
    "duplicate_max_forwards": b"Max-Forwards: 1\r\nMax-Forwards: 2\r\n",
    "duplicate_content_location": b"Content-Location: /a\r\nContent-Location: /b\r\n",
    "duplicate_content_range": b"Content-Range: bytes 0-1/2\r\nContent-Range: bytes 0-1/2\r\n",
    "sec_websocket_key1": b"Sec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\n",
}


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
@pytest.mark.parametrize("case", list(_REFUSED))
async def test_requests_aiohttp_refuses_are_refused_by_both_fronts(
        api_factory: Callable[..., Awaitable[Api]], front: str, case: str) -> None:
    """The same bytes to the fast front and to aiohttp alone: 400 with the contract's body from
    both, and the nonce is not consumed (the fast front decided these before it read Host and
    the singleton headers)."""
    api = await api_factory(http_front=front)
    nonce = f"refused-{case}-{secrets.token_hex(4)}"
    request = nonce_request(api, nonce, extra=_REFUSED[case])
    if case == "no_host":
        request = request.replace(b"Host: x\r\n", b"", 1)
    [answer] = await _exchange(api, request)
    assert (answer.status, answer.json()["error"]["code"]) == (400, "invalid_request"), answer
    status, body = await api.post("/v1/nonces/consume", {"vm_id": "vm-front", "scope": "ssh:front", "nonce": nonce})
    assert (status, body["decision"]) == (200, "accept")


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_a_content_encoding_is_decoded_or_refused_alike(
        api_factory: Callable[..., Awaitable[Api]], front: str) -> None:
    """A gzip body labelled gzip is inflated and decided by both fronts; a plain body labelled
    gzip or deflate, on a decision or an event, is 400, never a decision (the fast front
    ignored the label) nor a 500 (aiohttp's decoding error went unhandled)."""
    api = await api_factory(http_front=front)
    encoded = gzip.compress(json.dumps({"vm_id": "vm-front", "scope": "ssh:front", "nonce": "gz-1"}).encode())
    [answer] = await _exchange(api, (
        b"POST /v1/nonces/consume HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
        + api.tokens["callout"].encode() + b"\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(encoded)
        + encoded))
    assert (answer.status, answer.json()["decision"]) == (200, "accept"), answer
    with capture_logs() as logs:
        for encoding in (b"gzip", b"deflate"):
            [answer] = await _exchange(api, nonce_request(api, f"plain-{encoding.decode()}",
                                                          extra=b"Content-Encoding: " + encoding + b"\r\n"))
            assert (answer.status, answer.json()["error"]["code"]) == (400, "invalid_request"), answer
        body = json.dumps({"event_id": "e-gzip", "type": "vm.started", "vm_id": "vm-gz"}).encode()
        [answer] = await _exchange(api, (
            b"POST /v1/hypervisor/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + api.tokens["hypervisor"].encode() + b"\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body))
        assert answer.status == 400, answer
    assert not [entry for entry in logs if entry.get("event") == "unhandled_error"]


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_answers_carry_the_server_header_and_the_request_id_without_trailing_space(
        api_factory: Callable[..., Awaitable[Api]], front: str) -> None:
    """Both fronts answer with ``Server: replayguard`` and echo an ``X-Request-Id`` sent with
    trailing whitespace without it (RFC 9110 §5.5; llhttp keeps it, aiohttp strips it)."""
    api = await api_factory(http_front=front)
    [answer] = await _exchange(api, nonce_request(api, secrets.token_hex(8), extra=b"X-Request-Id: abc-123 \t\r\n"))
    assert answer.status == 200
    assert (answer.headers["server"], answer.headers["x-request-id"]) == ("replayguard", "abc-123")


# What every API answer carries, written down here rather than read from the product.
API_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff",
               "content-security-policy": "default-src 'none'; frame-ancestors 'none'"}


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_answers_are_kept_from_caches_sniffing_and_frames_by_both_fronts(
        api_factory: Callable[..., Awaitable[Api]], front: str) -> None:
    """A decision (its answer holds a receipt), a refused one and a request no parser takes
    are answered with ``Cache-Control: no-store``, ``nosniff`` and a CSP that forbids framing,
    whichever front answers them."""
    api = await api_factory(http_front=front)
    [accepted] = await _exchange(api, nonce_request(api, secrets.token_hex(8)))
    [refused] = await _exchange(api, nonce_request(api, secrets.token_hex(8)).replace(
        api.tokens["callout"].encode(), b"rgt_" + b"u" * 43))
    [broken] = await _exchange(api, b"GET /v1/status HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert (accepted.status, refused.status, broken.status) == (200, 401, 400)
    assert "receipt" in accepted.json()
    for answer in (accepted, refused, broken):
        assert {name: answer.headers.get(name) for name in API_HEADERS} == API_HEADERS, answer
