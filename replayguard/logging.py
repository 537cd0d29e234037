"""Logging: structlog JSON lines, configured once, with a redaction processor.

``redact`` is the last line of defence for CONTRACT §9: whatever a caller passes, a key
that names a credential never reaches the output with its value, and a value that looks
like a bearer token, an OTP receipt or a base32 secret is masked.

Per-request fields (request id, route, caller) live in one context variable holding a
dict, set once per request. Lines are written by ``LineWriter``: info and debug lines are
buffered and written at least every ``FLUSH_S`` (and at exit), so a busy service makes
one write per batch of lines rather than one per request; a warning or worse is written
at once, after anything buffered before it. When the lines go to a regular file, its
write-back is started once a second while it is written (``LogWriteback``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, ClassVar, TextIO

import orjson
import structlog

from . import page_cache
from .aio import running_loop

REDACTED = "[redacted]"
SENSITIVE_KEYS = frozenset({
    "otp", "code", "nonce", "secret", "token", "password", "authorization", "api_token",
    "user-password", "user_password", "authtok", "receipt", "pepper", "key", "cookie",
})
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_RG_TOKEN = re.compile(r"rgt_[A-Za-z0-9_\-]{8,}")
_URI_SECRET = re.compile(r"(?i)([?&]secret=)[^&#\s]+")  # the base32 secret of an otpauth:// URI


def _scrub_text(value: str) -> str:
    lowered = value.lower()
    # Cheap substring tests first: almost every log value holds none of these.
    if "secret=" in lowered:
        value = _URI_SECRET.sub(r"\g<1>" + REDACTED, value)
    if "bearer" in lowered:
        value = _BEARER.sub("Bearer " + REDACTED, value)
    if "rgt_" in value:
        value = _RG_TOKEN.sub(REDACTED, value)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if str(k).lower() in SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


# Keys already classified, and short strings already found to hold nothing to mask: most
# fields of most lines (event names, routes, reasons) repeat. Both are bounded.
_KEY_IS_SENSITIVE: dict[str, bool] = {}
_CLEAN_TEXT: set[str] = set()
_MEMO_MAX = 4096
_MEMO_TEXT_LEN = 64


def _classify_key(key: str) -> bool:
    """Whether a key not seen before names a credential; remembered (bounded)."""
    sensitive = key.lower() in SENSITIVE_KEYS
    if len(_KEY_IS_SENSITIVE) < _MEMO_MAX:
        _KEY_IS_SENSITIVE[key] = sensitive
    return sensitive


def _scrub_unseen(value: str) -> str:
    """Scrubs a string not known clean; a short clean one is remembered (bounded)."""
    scrubbed = _scrub_text(value)
    if scrubbed is value and len(value) <= _MEMO_TEXT_LEN:
        if len(_CLEAN_TEXT) >= _MEMO_MAX:
            _CLEAN_TEXT.clear()
        _CLEAN_TEXT.add(value)
    return scrubbed


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Masks every credential-named key and every token-shaped value in a log event."""
    for key, value in event_dict.items():  # values are replaced in place; no key is added
        sensitive = _KEY_IS_SENSITIVE.get(key)  # the memo lookups are inline: this runs per field
        if sensitive is None:
            sensitive = _classify_key(str(key))
        if sensitive:
            event_dict[key] = REDACTED
        elif type(value) is str:
            if value not in _CLEAN_TEXT:
                event_dict[key] = _scrub_unseen(value)
        elif not isinstance(value, (int, float, type(None))):  # numbers hold no secret
            event_dict[key] = _scrub(value)
    return event_dict


REQUEST_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "replayguard_request", default=None)
FLUSH_S = 0.05
MAX_BUFFERED = 256
WRITEBACK_S = 1.0


def merge_request_context(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Adds the current request's fields (``REQUEST_CONTEXT``) to a log event."""
    fields = REQUEST_CONTEXT.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def timestamp(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO 8601 UTC with microseconds (``2026-11-29T19:35:03.325964Z``), as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it, formatting each second only once."""
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    event_dict["timestamp"] = f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"
    return event_dict


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class LogWriteback:
    """Starts the write-back of the log's file (``page_cache``) at most once a second, and
    only after lines were written to it. A busy service logs about 270 bytes a decision
    (its access line), 2.7 MB a second at 10,000 decisions a second, which the kernel would
    otherwise write back in one burst every 30 s, in front of the WAL's flush when the log
    and the database share a disk. In a thread of its own, started in the process that
    writes: the call may wait for the disk's queue, which the event loop must not."""

    def __init__(self, fd: int, interval_s: float = WRITEBACK_S) -> None:
        self.fd = fd
        self.interval_s = interval_s
        self._written = threading.Event()
        self._pid: int | None = None  # the process whose thread runs

    def wrote(self) -> None:
        """Lines were written: their write-back starts within ``interval_s``."""
        if self._pid != os.getpid():
            try:
                threading.Thread(target=self._run, name="log-writeback", daemon=True).start()
            except RuntimeError:  # the interpreter is exiting: the kernel writes the rest back
                return
            self._pid = os.getpid()
        self._written.set()

    def _run(self) -> None:
        while True:
            self._written.wait()
            time.sleep(self.interval_s)  # a second's lines at a time
            self._written.clear()
            page_cache.start_writeback_fd(self.fd)


def log_writeback(stream: Any) -> LogWriteback | None:
    """A ``LogWriteback`` for ``stream`` when it is a regular file, else None (a pipe to
    journald, a terminal, a stream in memory)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return LogWriteback(fd) if page_cache.available() and page_cache.regular_file(fd) else None


class LineWriter:
    """A structlog logger writing JSON lines: routine lines batched, warnings at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()  # a line may come from a worker thread
        self._flush_on: asyncio.AbstractEventLoop | None = None  # loop holding a pending flush
        self.writeback = log_writeback(stream)
        atexit.register(self.flush)

    def _buffer(self, message: str) -> None:
        try:
            loop = running_loop()
        except RuntimeError:  # no event loop here (CLI commands, threads): write at once
            self._now(message)
            return
        with self._lock:
            self._lines.append(message)
            full = len(self._lines) >= MAX_BUFFERED
        if full:
            self.flush()
        elif self._flush_on is not loop:
            self._flush_on = loop
            loop.call_later(FLUSH_S, self.flush)

    def _now(self, message: str) -> None:
        with self._lock:
            self._lines.append(message)
        self.flush()

    def flush(self) -> None:
        self._flush_on = None
        with self._lock:
            if not self._lines:
                return
            lines, self._lines = self._lines, []
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream must not break a request
                return
            if self.writeback is not None:  # under the lock: one thread starts it in a process
                self.writeback.wrote()

    debug = info = msg = _buffer
    warning = warn = error = err = critical = exception = fatal = failure = _now


class LineWriterFactory:
    """One ``LineWriter`` per stream, shared by every logger."""

    def __init__(self, stream: TextIO) -> None:
        self._writer = LineWriter(stream)

    def __call__(self, *_args: Any) -> LineWriter:
        return self._writer


def processors() -> list[Any]:
    return [
        merge_request_context,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        redact,
        timestamp,  # after redact: the time is ours and holds nothing to mask
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]


def configure(level: str = "info", stream: Any = None) -> None:
    """Configures structlog for JSON lines on ``stream`` (stderr by default)."""
    chain = processors()
    factory = LineWriterFactory(stream or sys.stderr)
    level_no = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _ACCESS[:] = [chain, factory(), level_no <= logging.INFO, list(chain)]


class StdlibBridge(logging.Handler):
    """Other libraries' log records (aiohttp's, asyncio's) as our JSON lines.

    They go through the same processors, redaction included. An exception is named by its
    type only: its text and traceback may quote what a client sent (aiohttp's parse errors
    quote the offending header line).
    """

    _METHODS: ClassVar[dict[str, str]] = {
        "DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "critical"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = type(record.exc_info[1]).__name__
            method = self._METHODS.get(record.levelname, "warning")
            getattr(structlog.get_logger(record.name), method)(record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - logging must never raise into its caller
            self.handleError(record)


def bridge_stdlib(level: str = "info") -> None:
    """Routes the standard library's logging (the root logger) through ``StdlibBridge``."""
    root = logging.getLogger()
    root.handlers = [StdlibBridge()]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])


# The chain, writer and "info enabled" of the last ``configure``, and the chain's processors
# as it made them (``capture_logs`` changes the list in place), for ``request_line``.
_ACCESS: list[Any] = [None, None, False, None]


def request_line(fields: dict[str, Any]) -> None:
    """Logs the access line of one request: ``log.info("request", **fields)``.

    While the configuration ``configure`` made is in force, the event goes to the same
    writer as the same line without structlog's per-call wrapping, and with ``processors``'
    steps written out as they apply to this line: the request's fields merged (as
    ``merge_request_context``), the level, ``redact``, ``timestamp``, and the JSON. The
    line has no ``exc_info`` for ``format_exc_info`` to render. Going through the chain
    one processor at a time was 55,000 instructions a line, half of it the calls and the
    steps that do nothing here. Otherwise (another configuration,
    ``structlog.testing.capture_logs``), it is logged the ordinary way.
    """
    chain, writer, enabled, made = _ACCESS
    if chain is None or structlog.get_config()["processors"] is not chain or chain != made:
        # A new proxy each time: a cached one would keep writing where it first wrote.
        structlog.get_logger("replayguard.http").info("request", **fields)
        return
    if not enabled:
        return
    fields["event"] = "request"
    context = REQUEST_CONTEXT.get()
    if context:
        for key, value in context.items():
            if key not in fields:
                fields[key] = value
    fields["level"] = "info"
    writer.info(_dumps(timestamp(writer, "info", redact(writer, "info", fields))))
