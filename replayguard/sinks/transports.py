"""Sink transports: how one batch of records leaves the host.

An append-only JSON-lines file, syslog (RFC 5424, UDP or TCP with RFC 6587 octet
counting) carrying CEF lines (``core/cef.py``), an HTTP webhook with an optional
HMAC-SHA256 signature, and Splunk's HTTP Event Collector. A file or webhook sink may
carry ECS or OCSF documents instead of replayguard's JSON (``core/siem.py``; a record
with no form in that schema, a checkpoint for OCSF, is skipped). Each delivers a batch in
order or raises ``DeliveryError`` saying how many records went; the dispatcher's lanes decide what to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from .. import __version__
from ..core import siem
from ..core.cef import format_syslog, octet_counted
from ..core.signatures import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from ..errors import ReplayGuardError
from .config import DEFAULT_PORTS, SinkConfig

Record = Mapping[str, object]
Clock = Callable[[], datetime]
Shape = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]
SHAPES: dict[str, Shape] = {"json": lambda record: record, "ecs": siem.ecs, "ocsf": siem.ocsf}

# Per-record refusals: retrying the same body cannot help. Everything else (401/403 from a
# wrong secret, 404 while a receiver deploys, 429, 5xx) is retried so nothing is dropped.
_PERMANENT_STATUSES = frozenset({400, 413, 415, 422})


class DeliveryError(ReplayGuardError):
    """A send stopped after ``done`` records; ``retryable`` is False when the next record
    itself was refused (bad format, 4xx) so the lane skips it instead of retrying forever."""

    code = "sink_delivery"

    def __init__(self, message: str, *, done: int, retryable: bool = True) -> None:
        super().__init__(message)
        self.done = done
        self.retryable = retryable


class Sink(Protocol):
    """What a lane needs from a transport: ordered delivery of a batch, and cleanup."""

    async def send(self, records: Sequence[Record]) -> None:
        """Deliver all of ``records`` in order, or raise DeliveryError saying how many went."""

    async def close(self) -> None:
        """Release connections; ``send`` may reopen them."""


def webhook_signature_headers(secret: bytes, timestamp: int, body: bytes) -> dict[str, str]:
    """The same scheme as signed hypervisor events (``core.signatures``): a receiver checks
    ``X-Replayguard-Signature: v1=<hex HMAC-SHA256 over "<timestamp>.<body>">`` and refuses
    an old ``X-Replayguard-Timestamp``."""
    stamp = str(timestamp)
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, stamp, body)}


class FileSink:
    """Append-only JSON lines; reopened per batch so that log rotation just works."""

    def __init__(self, path: Path, shape: Shape = SHAPES["json"]) -> None:
        self._path = path
        self._shape = shape

    async def send(self, records: Sequence[Record]) -> None:
        shaped = [self._shape(r) for r in records]
        data = b"".join(orjson.dumps(r) + b"\n" for r in shaped if r is not None)
        if not data:
            return
        try:
            await asyncio.to_thread(_append_fsync, self._path, data)
        except OSError as exc:
            raise DeliveryError(f"cannot append to {self._path}: {exc.strerror}", done=0) from exc

    async def close(self) -> None:
        return None


def _append_fsync(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class SyslogSink:
    """RFC 5424 syslog carrying CEF. UDP is fire-and-forget; TCP keeps one connection and
    reconnects when the receiver closed it (RFC 6587 has no acknowledgements)."""

    def __init__(self, config: SinkConfig, *, version: str, clock: Clock, hostname: str,
                 timeout: float) -> None:  # fmt: skip
        self._config, self._version, self._clock = config, version, clock
        self._target = (config.host or "127.0.0.1", config.port or DEFAULT_PORTS["udp"])
        self._hostname, self._timeout, self._procid = hostname, timeout, str(os.getpid())
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def _format(self, records: Sequence[Record]) -> tuple[list[bytes], int | None]:
        """Messages for the leading well-formed records, and the index of a bad one if any."""
        messages: list[bytes] = []
        for index, record in enumerate(records):
            try:
                messages.append(format_syslog(record, now=self._clock(), hostname=self._hostname,
                                              procid=self._procid, facility=self._config.facility,
                                              version=self._version))  # fmt: skip
            except ValueError:
                return messages, index
        return messages, None

    async def send(self, records: Sequence[Record]) -> None:
        messages, bad = self._format(records)
        try:
            if self._config.transport == "udp":
                await self._send_udp(messages)
            else:
                await self._send_tcp(messages)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise DeliveryError(f"syslog send failed: {exc}", done=0) from exc
        if bad is not None:
            raise DeliveryError("record cannot be formatted as CEF", done=bad, retryable=False)

    async def _send_udp(self, messages: list[bytes]) -> None:
        if self._udp is None or self._udp.is_closing():
            loop = asyncio.get_running_loop()
            endpoint = loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=self._target)
            self._udp = (await asyncio.wait_for(endpoint, self._timeout))[0]
        for message in messages:
            self._udp.sendto(message)

    async def _send_tcp(self, messages: list[bytes]) -> None:
        if self._tcp is None or self._tcp[0].at_eof() or self._tcp[1].is_closing():
            await self.close()
            connect = asyncio.open_connection(*self._target)
            self._tcp = await asyncio.wait_for(connect, self._timeout)
        writer = self._tcp[1]
        writer.write(b"".join(octet_counted(m) for m in messages))
        await asyncio.wait_for(writer.drain(), self._timeout)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            writer, self._tcp = self._tcp[1], None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class WebhookSink:
    """One POST of JSON per record, in order; 2xx is delivered, see ``_PERMANENT_STATUSES``."""

    def __init__(self, config: SinkConfig, *, clock: Clock, timeout: float) -> None:
        self._url, self._secret, self._clock = config.url or "", config.secret, clock
        self._shape = SHAPES[config.format]
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": f"replayguard/{__version__}"}
        if self._secret is not None:
            stamp = int(self._clock().timestamp())
            headers.update(webhook_signature_headers(self._secret.reveal().encode(), stamp, body))
        return headers

    async def send(self, records: Sequence[Record]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for done, record in enumerate(records):
            shaped = self._shape(record)
            if shaped is None:
                continue
            body = orjson.dumps(shaped)
            try:
                async with self._session.post(self._url, data=body, headers=self._headers(body),
                                              allow_redirects=False) as response:  # fmt: skip
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DeliveryError(f"webhook unreachable: {type(exc).__name__}", done=done) from exc
            if not 200 <= status < 300:
                raise DeliveryError(f"webhook answered {status}", done=done,
                                    retryable=status not in _PERMANENT_STATUSES)  # fmt: skip

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SplunkSink:
    """Splunk HTTP Event Collector: one POST per event, in order, ``Authorization: Splunk <token>``.

    The token is read from ``token_file`` when the first batch is sent (and again after a
    refusal, so a rotated token is picked up); it is never logged. HEC answers 400 for a
    malformed event, 401/403 for a bad token (retried: the operator may fix the file),
    503 when its queue is full.
    """

    def __init__(self, config: SinkConfig, *, hostname: str, timeout: float) -> None:
        self._config, self._hostname = config, hostname
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    def _read_token(self, done: int) -> str:
        path = self._config.token_file
        assert path is not None  # noqa: S101 - narrows the type for mypy; guaranteed by parse_sink_spec
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise DeliveryError(f"cannot read the HEC token file {path}: {exc.strerror}", done=done) from exc
        if not token:
            raise DeliveryError(f"the HEC token file {path} is empty", done=done)
        return token

    async def send(self, records: Sequence[Record]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for done, record in enumerate(records):
            if self._token is None:
                self._token = self._read_token(done)
            body = orjson.dumps(siem.splunk_event(record, host=self._hostname, index=self._config.index,
                                                  sourcetype=self._config.sourcetype))
            headers = {"Authorization": f"Splunk {self._token}", "Content-Type": "application/json",
                       "User-Agent": f"replayguard/{__version__}"}
            try:
                async with self._session.post(self._config.url or "", data=body, headers=headers,
                                              allow_redirects=False) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DeliveryError(f"splunk HEC unreachable: {type(exc).__name__}", done=done) from exc
            if status in (401, 403):
                self._token = None
            if not 200 <= status < 300:
                raise DeliveryError(f"splunk HEC answered {status}", done=done,
                                    retryable=status not in _PERMANENT_STATUSES)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def build_sink(config: SinkConfig, *, version: str, clock: Clock, hostname: str, timeout: float) -> Sink:
    """The sink object for a config; the one place that maps kinds to classes."""
    if config.kind == "file":
        assert config.path is not None  # noqa: S101 - narrows the type for mypy; guaranteed by parse_sink_spec
        return FileSink(config.path, SHAPES[config.format])
    if config.kind == "splunk":
        return SplunkSink(config, hostname=hostname, timeout=timeout)
    if config.kind == "syslog":
        return SyslogSink(config, version=version, clock=clock, hostname=hostname, timeout=timeout)
    return WebhookSink(config, clock=clock, timeout=timeout)
