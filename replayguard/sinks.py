"""External alert sinks: copies of alerts and checkpoints written outside, in real time.

An intruder who owns a VM can erase what is logged inside it, never what already left
the host. ``SinkDispatcher.submit`` is called on the decision path, so it is synchronous,
never touches the network and never raises. Each sink has a lane: the record is appended
to the lane's spool file (the durable outbox, ``<spool_dir>/<name>.jsonl``) and, while
there is room, to a bounded in-memory queue that spares re-reading the disk. One task per
lane delivers in spool order and commits the delivered byte offset to ``<name>.cursor``
(atomic rename), so a sink that is down, or a restart, loses nothing: delivery resumes at
the cursor. Delivery is at-least-once; every record carries its ``id`` for receivers that
must deduplicate (a crash between a send and its cursor commit repeats that batch).

Sinks: an append-only JSON-lines file, syslog (RFC 5424, UDP or TCP with RFC 6587
octet counting) carrying CEF lines (``core/cef.py``), and an HTTP webhook with an
optional HMAC-SHA256 signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import itertools
import os
import random
import re
import socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
import structlog

from . import __version__
from .core.cef import FACILITIES, format_syslog, octet_counted
from .errors import ConfigError, ReplayGuardError
from .settings import Secret

Record = Mapping[str, object]
Clock = Callable[[], datetime]
SinkKind = Literal["file", "syslog", "webhook"]

_USERINFO_RE = re.compile(r"//[^/?#]*@")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEFAULT_PORTS = {"udp": 514, "tcp": 601}
# Per-record refusals: retrying the same body cannot help. Everything else (401/403 from a
# wrong secret, 404 while a receiver deploys, 429, 5xx) is retried so nothing is dropped.
_PERMANENT_STATUSES = frozenset({400, 413, 415, 422})


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SinkConfig:
    """One sink, validated. ``name`` names its spool files, so it must stay stable."""

    name: str
    kind: SinkKind
    path: Path | None = None
    transport: Literal["udp", "tcp"] | None = None
    host: str | None = None
    port: int | None = None
    facility: int = FACILITIES["authpriv"]
    url: str | None = None
    secret: Secret | None = None

    def describe(self) -> str:
        """A log-safe target: webhook paths and queries often embed tokens, so only the origin."""
        if self.kind == "file":
            return f"file:{self.path}"
        if self.kind == "syslog":
            return f"syslog+{self.transport}://{self.host}:{self.port}"
        parts = urlsplit(self.url or "")
        return f"webhook:{parts.scheme}://{parts.netloc}"


def parse_sink_spec(spec: str, *, secret: Secret | None = None, name: str | None = None) -> SinkConfig:
    """Parse ``file:/abs/path``, ``syslog+udp://h:p``, ``syslog+tcp://h:p?facility=f`` or
    ``webhook:https://...``; raise ValueError with a sentence an operator can act on."""
    spec = spec.strip()
    shown = _USERINFO_RE.sub("//***@", spec)  # error messages must not echo a password
    if spec.startswith("file:"):
        config = _parse_file(spec.removeprefix("file:"))
    elif spec.startswith(("syslog+udp://", "syslog+tcp://")):
        config = _parse_syslog(spec, shown)
    elif spec.startswith("webhook:"):
        config = _parse_webhook(spec.removeprefix("webhook:"))
    elif spec.startswith("syslog:"):
        raise ValueError(f"sink {shown!r}: say syslog+udp:// or syslog+tcp://")
    else:
        raise ValueError(f"sink {shown!r}: expected file:, syslog+udp://, syslog+tcp:// or webhook:")
    if secret is not None and config.kind != "webhook":
        raise ValueError(f"sink {config.describe()}: only webhook sinks take a secret")
    default = f"{config.kind}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if name is not None and not _NAME_RE.fullmatch(name):
        raise ValueError(f"sink name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return replace(config, name=name or default, secret=secret)


def parse_sink(value: str | Mapping[str, object]) -> SinkConfig:
    """A spec string, or a dict ``{"spec": ..., "secret": ..., "name": ...}`` from a config file."""
    if isinstance(value, str):
        return parse_sink_spec(value)
    unknown = set(value) - {"spec", "secret", "name"}
    spec, secret, name = value.get("spec"), value.get("secret"), value.get("name")
    if unknown or not isinstance(spec, str):
        raise ValueError(f"sink table needs a 'spec' string and only spec, secret, name; got {sorted(value)}")
    if secret is not None and not isinstance(secret, str | Secret):
        raise ValueError("sink secret must be a string")
    if name is not None and not isinstance(name, str):
        raise ValueError("sink name must be a string")
    wrapped = Secret(secret) if isinstance(secret, str) else secret
    return parse_sink_spec(spec, secret=wrapped, name=name)


def _parse_file(rest: str) -> SinkConfig:
    path = rest.removeprefix("//") if rest.startswith("///") else rest
    if not path:
        raise ValueError("sink 'file:': give an absolute path, e.g. file:/var/log/replayguard/alerts.jsonl")
    if not path.startswith("/"):
        raise ValueError(f"sink 'file:{rest}': the path must be absolute")
    if path.endswith("/"):
        raise ValueError(f"sink 'file:{rest}': the path names a directory, not a file")
    return SinkConfig(name="", kind="file", path=Path(path))


def _parse_syslog(spec: str, shown: str) -> SinkConfig:
    parts = urlsplit(spec)
    transport: Literal["udp", "tcp"] = "udp" if parts.scheme == "syslog+udp" else "tcp"
    port = _port(shown, parts.netloc) or _DEFAULT_PORTS[transport]
    if not parts.hostname:
        raise ValueError(f"sink {shown!r}: a host is required, e.g. syslog+{transport}://127.0.0.1:514")
    if parts.path not in ("", "/") or parts.username or parts.password:
        raise ValueError(f"sink {shown!r}: only host, port and ?facility= are allowed")
    facility = FACILITIES["authpriv"]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "facility":
            raise ValueError(f"sink {shown!r}: unknown option {key!r} (only facility)")
        facility = _facility(shown, value)
    return SinkConfig(name="", kind="syslog", transport=transport, host=parts.hostname, port=port,
                      facility=facility)  # fmt: skip


def _facility(shown: str, value: str) -> int:
    if value in FACILITIES:
        return FACILITIES[value]
    if value.isdigit() and int(value) <= 23:
        return int(value)
    raise ValueError(f"sink {shown!r}: unknown facility {value!r} (e.g. authpriv, local0..local7, 0-23)")


def _parse_webhook(url: str) -> SinkConfig:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("sink 'webhook:…': give an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("sink 'webhook:…': credentials do not belong in the URL; pass a secret")
    _port("webhook:…", parts.netloc)
    return SinkConfig(name="", kind="webhook", url=url)


def _port(shown: str, netloc: str) -> int | None:
    """The explicit port of a URL's netloc, if any; 0 is refused rather than read as "default"."""
    try:
        port = urlsplit(f"//{netloc}").port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"sink {shown!r}: the port must be a number between 1 and 65535")
    return port


# --------------------------------------------------------------------------- delivery


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


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter, so a fleet of instances does not retry in lockstep."""

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempt: int, rand: float) -> float:
        """Delay before retry ``attempt`` (0-based); ``rand`` in [0, 1) picks within the upper half."""
        ceiling = min(self.cap, self.base * self.factor ** min(attempt, 64))
        return ceiling / 2 + rand * ceiling / 2


def webhook_signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256 over "<t>.<body>">``; the time lets receivers refuse replays."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class FileSink:
    """Append-only JSON lines; reopened per batch so that log rotation just works."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def send(self, records: Sequence[Record]) -> None:
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
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
        self._target = (config.host or "127.0.0.1", config.port or _DEFAULT_PORTS["udp"])
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
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": f"replayguard/{__version__}"}
        if self._secret is not None:
            stamp = int(self._clock().timestamp())
            headers["X-Replayguard-Signature"] = webhook_signature(self._secret.reveal().encode(), stamp, body)
        return headers

    async def send(self, records: Sequence[Record]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for done, record in enumerate(records):
            body = orjson.dumps(record)
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


def build_sink(config: SinkConfig, *, version: str, clock: Clock, hostname: str, timeout: float) -> Sink:
    """The sink object for a config; the one place that maps kinds to classes."""
    if config.kind == "file":
        assert config.path is not None  # guaranteed by parse_sink_spec
        return FileSink(config.path)
    if config.kind == "syslog":
        return SyslogSink(config, version=version, clock=clock, hostname=hostname, timeout=timeout)
    return WebhookSink(config, clock=clock, timeout=timeout)


# --------------------------------------------------------------------------- durable outbox


class Spool:
    """One sink's outbox: an append-only JSON-lines file and the committed delivered offset.

    Opened under an exclusive ``flock`` so two processes never deliver the same outbox. A
    torn last line (crash mid-append) is cut off at open; a cursor beyond the end (crash
    between a compaction's truncate and its cursor commit) is clamped to the end.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.jsonl"
        self._cursor_path = directory / f"{name}.cursor"
        self._fd = -1
        self.end = 0
        self.cursor = 0

    def open(self) -> int:
        """Open, repair and load the cursor; returns the number of undelivered lines."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ConfigError(f"spool {self.path} is in use by another replayguard process") from None
        self.end = _complete_length(self._fd)
        os.ftruncate(self._fd, self.end)
        self.cursor = min(self._read_cursor(), self.end)
        return sum(line.count(b"\n") for line in _chunks(self._fd, self.cursor, self.end))

    def _read_cursor(self) -> int:
        try:
            return int(self._cursor_path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return 0
        except ValueError:  # redelivering beats losing: receivers deduplicate by id
            structlog.get_logger().warning("sink_cursor_corrupt", path=str(self._cursor_path))
            return 0

    def append(self, line: bytes) -> tuple[int, int]:
        """Append one line; returns its (start, end) offsets. A short write is undone."""
        start = self.end
        written = os.write(self._fd, line)
        if written != len(line):
            os.ftruncate(self._fd, start)
            raise OSError(f"short write to {self.path}")
        self.end = start + written
        return start, self.end

    def read(self, start: int, stop: int, limit: int) -> list[tuple[int, int, bytes]]:
        """Up to ``limit`` complete lines in [start, stop) as (start, end, line)."""
        lines: list[tuple[int, int, bytes]] = []
        with open(self.path, "rb") as handle:
            handle.seek(start)
            while len(lines) < limit and start < stop:
                line = handle.readline(stop - start)
                if not line.endswith(b"\n"):
                    break
                lines.append((start, start + len(line), line))
                start += len(line)
        return lines

    def sync(self) -> None:
        os.fsync(self._fd)

    def commit(self, offset: int) -> None:
        """Record ``offset`` as delivered: write a temporary file, fsync, rename, fsync the dir."""
        tmp = self._cursor_path.with_suffix(".cursor.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{offset}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._cursor_path)
        dir_fd = os.open(self._cursor_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.cursor = offset

    def compact(self) -> None:
        """Empty a fully delivered spool. Truncate (durably) before committing offset 0, so a
        crash in between leaves a cursor past the end, which ``open`` clamps: no duplicates."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.end = 0
        self.commit(0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _chunks(fd: int, start: int, stop: int, size: int = 1 << 16) -> list[bytes]:
    return [os.pread(fd, min(size, stop - pos), pos) for pos in range(start, stop, size)]


def _complete_length(fd: int) -> int:
    """Length of the file up to and including its last newline."""
    end = os.fstat(fd).st_size
    while end > 0:
        chunk = os.pread(fd, min(1 << 16, end), max(0, end - (1 << 16)))
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return end - len(chunk) + cut + 1
        end -= len(chunk)
    return 0


# --------------------------------------------------------------------------- dispatcher


@dataclass(frozen=True)
class SinkStats:
    """A lane's counters for /metrics; ``backlog`` counts records not yet delivered."""

    delivered: int
    failed_attempts: int
    rejected: int
    dropped: int
    backlog: int
    last_error: str | None


@dataclass(frozen=True)
class _Entry:
    start: int
    end: int
    record: Record


class _Lane:
    """One sink's spool, memory queue and delivery loop; a slow sink only slows its own lane."""

    def __init__(self, config: SinkConfig, sink: Sink, spool: Spool, options: _Options) -> None:
        self.config, self.sink, self.spool, self._opt = config, sink, spool, options
        self._memory: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._unsynced = False
        self.stopping = False
        self.delivered = self.failed_attempts = self.rejected = self.dropped = self.backlog = 0
        self.last_error: str | None = None
        self._log = structlog.get_logger().bind(sink=config.name, target=config.describe())

    def submit(self, line: bytes, record: Record) -> None:
        """Spool the line, queue it in memory while there is room, wake the delivery loop."""
        try:
            start, end = self.spool.append(line)
        except OSError as exc:
            self.dropped += 1
            self._log.error("sink_spool_write_failed", error=str(exc))
            return
        self.backlog += 1
        self._unsynced = True
        if len(self._memory) < self._opt.memory_limit:
            self._memory.append(_Entry(start, end, record))
        self._wakeup.set()

    def request_stop(self) -> None:
        self.stopping = True
        self._wakeup.set()

    def stats(self) -> SinkStats:
        return SinkStats(self.delivered, self.failed_attempts, self.rejected, self.dropped,
                         self.backlog, self.last_error)  # fmt: skip

    async def run(self) -> None:
        """Deliver until stopped and drained; only returns when there is nothing left."""
        attempt = 0
        while True:
            batch = await self._next_batch()
            if not batch:
                if self.stopping:
                    return
                self._wakeup.clear()  # no await since _next_batch looked: no wakeup is lost
                await self._wakeup.wait()
                continue
            attempt = await self._deliver(batch, attempt)

    async def _next_batch(self) -> list[_Entry]:
        """The next records at the cursor: from memory when it holds them, else from disk."""
        cursor = self.spool.cursor
        while self._memory and self._memory[0].end <= cursor:
            self._memory.popleft()
        if self._memory and self._memory[0].start == cursor:
            return list(itertools.islice(self._memory, self._opt.batch_size))
        while self.spool.cursor < self.spool.end:
            lines = await asyncio.to_thread(self.spool.read, self.spool.cursor, self.spool.end,
                                            self._opt.batch_size)  # fmt: skip
            entries = self._parse(lines)
            if entries or not lines:
                return entries
        return []  # only corrupt lines were left, and _parse skipped them

    def _parse(self, lines: list[tuple[int, int, bytes]]) -> list[_Entry]:
        """Entries up to the first corrupt line; a corrupt line at the head is skipped."""
        entries: list[_Entry] = []
        for start, end, line in lines:
            try:
                entries.append(_Entry(start, end, orjson.loads(line)))
            except orjson.JSONDecodeError:
                if entries:
                    break
                self.spool.cursor, self.backlog, self.dropped = end, self.backlog - 1, self.dropped + 1
                self._log.error("sink_spool_line_corrupt", offset=start)
        return entries

    async def _deliver(self, batch: list[_Entry], attempt: int) -> int:
        """Send one batch; commit what went through; back off on failure. Returns the attempt."""
        if self._unsynced:
            self._unsynced = False
            await asyncio.to_thread(self.spool.sync)
        try:
            await self.sink.send([e.record for e in batch])
        except DeliveryError as exc:
            await self._advance(batch[: exc.done])
            return await self._failed(batch[exc.done :], exc, attempt)
        await self._advance(batch)
        return 0

    async def _failed(self, rest: list[_Entry], exc: DeliveryError, attempt: int) -> int:
        self.last_error = exc.message
        if not exc.retryable and rest:
            self.rejected += 1
            self._log.error("sink_record_rejected", error=exc.message, record_id=rest[0].record.get("id"))
            await self._advance(rest[:1])
            return attempt
        self.failed_attempts += 1
        delay = self._opt.backoff.delay(attempt, random.random())  # noqa: S311 - jitter, not crypto
        self._log.warning("sink_delivery_failed", error=exc.message, retry_in_s=round(delay, 3))
        await asyncio.sleep(delay)
        return attempt + 1

    async def _advance(self, done: list[_Entry]) -> None:
        """Commit the cursor past ``done``; empty the spool once everything is delivered."""
        if not done:
            return
        await asyncio.to_thread(self.spool.commit, done[-1].end)
        self.delivered += len(done)
        self.backlog -= len(done)
        if self.spool.cursor == self.spool.end and self.spool.end >= self._opt.compact_bytes:
            self.spool.compact()  # synchronous: no submit may append between truncate and commit
            self._memory.clear()


@dataclass(frozen=True)
class _Options:
    memory_limit: int
    batch_size: int
    backoff: Backoff
    compact_bytes: int


class SinkDispatcher:
    """Fans records out to every configured sink without ever making the caller wait."""

    def __init__(self, configs: Sequence[SinkConfig], *, spool_dir: Path, version: str = __version__,
                 clock: Clock = _utc_now, hostname: str | None = None, backoff: Backoff = Backoff(),
                 memory_limit: int = 10_000, batch_size: int = 100, send_timeout: float = 10.0,
                 compact_bytes: int = 1 << 20) -> None:  # fmt: skip
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        self._configs, self._spool_dir, self._version, self._clock = tuple(configs), spool_dir, version, clock
        self._hostname, self._timeout = hostname, send_timeout
        self._options = _Options(memory_limit, batch_size, backoff, compact_bytes)
        self._lanes: list[_Lane] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._log = structlog.get_logger()

    async def start(self) -> None:
        """Open every spool (resuming at its cursor) and start one delivery task per sink."""
        self._lanes = []
        try:
            for config in self._configs:
                self._lanes.append(await self._open_lane(config))
        except (OSError, ConfigError):
            for lane in self._lanes:
                lane.spool.close()
            raise
        self._tasks = [asyncio.create_task(lane.run(), name=f"sink:{lane.config.name}") for lane in self._lanes]
        for task in self._tasks:
            task.add_done_callback(self._lane_ended)
        self._running = True

    async def _open_lane(self, config: SinkConfig) -> _Lane:
        spool = Spool(self._spool_dir, config.name)
        backlog = await asyncio.to_thread(spool.open)
        hostname = self._hostname or socket.gethostname()
        sink = build_sink(config, version=self._version, clock=self._clock, hostname=hostname,
                          timeout=self._timeout)  # fmt: skip
        lane = _Lane(config, sink, spool, self._options)
        lane.backlog = backlog
        self._log.info("sink_started", sink=config.name, target=config.describe(), backlog=backlog)
        return lane

    def submit(self, record: Record) -> None:
        """Queue a record for every sink. Synchronous, bounded work, never raises: the
        decision path calls it, and a broken sink must never fail a decision."""
        if not self._running:
            self._log.warning("sink_submit_while_stopped", record_id=record.get("id"))
            return
        try:
            line = orjson.dumps(record) + b"\n"
            copy = orjson.loads(line)  # deliver the same JSON from memory as from disk
        except TypeError as exc:  # orjson.JSONEncodeError
            self._log.error("sink_record_not_json", record_id=record.get("id"), error=str(exc))
            return
        for lane in self._lanes:
            lane.submit(line, copy)

    async def stop(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout``; the rest stays in the spools."""
        self._running = False
        for lane in self._lanes:
            lane.request_stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for lane in self._lanes:
            await lane.sink.close()
            lane.spool.close()
        self._tasks = []  # lanes stay, so stats() still reports the final backlog

    def stats(self) -> dict[str, SinkStats]:
        """Counters per sink name, for the metrics endpoint."""
        return {lane.config.name: lane.stats() for lane in self._lanes}

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("sink_lane_crashed", task=task.get_name(), error=repr(task.exception()))
