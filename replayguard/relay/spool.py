"""The relays' durable spool and its delivery to the service, shared by every hypervisor.

A relay writes each event to the spool directory (one JSON file per event, tmp + fsync +
rename) before anything is sent, so a dead service or a ``kill -9`` delays an event but
never loses it, and re-posting it is idempotent on the service side. Delivery drains the
spool oldest first: a 2xx or 409 removes the file, an answer that retrying cannot cure
parks it in ``dead/``, anything else keeps it and backs off.

Records are keyed generically: ``id_key`` names the field that holds a record's id
(``event_id`` in the native JSON, ``upid`` for Proxmox tasks, ``id`` for CloudEvents).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import structlog

from ..settings import Secret

DEFAULT_ID_KEY = "event_id"  # the id field of the service's native event JSON

log = structlog.get_logger("replayguard.relay.spool")


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx, or 409: the service already holds this id
    RETRY = "retry"  # service down, 5xx, 408, 429: keep the event and back off
    DEAD = "dead"  # any other answer: retrying cannot help, park it in dead/


# ---------------------------------------------------------------- pure: answers and backoff


def backoff_delay(attempt: int, rand: float, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter in [ceiling/2, ceiling), ceiling capped at ``cap``.

    ``rand`` is a number in [0, 1) so the schedule is testable; jitter keeps many relays
    from hammering a recovering service in step.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * min(max(rand, 0.0), 1.0))


def classify_status(status: int | None) -> Outcome:
    """What an HTTP answer (None: no answer at all) means for a spooled event."""
    if status is None or status in (408, 429) or status >= 500:
        return Outcome.RETRY
    if 200 <= status < 300 or status == 409:
        return Outcome.DELIVERED
    return Outcome.DEAD


# ---------------------------------------------------------------- the spool


def atomic_write(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: tmp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A directory of events waiting for the service: ``evt-<ns>-<hash>.json``, oldest first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dead = root / "dead"
        self.dead.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in root.glob(".*.tmp"):  # half-written by a crash: never renamed
            leftover.unlink(missing_ok=True)

    def put(self, body: Mapping[str, Any], id_key: str = DEFAULT_ID_KEY) -> Path:
        """Spool a JSON object whose id is ``body[id_key]``."""
        return self.put_bytes(str(body[id_key]), orjson.dumps(body))

    def put_bytes(self, key: str, data: bytes) -> Path:
        """Spool an already serialised body; ``key`` (its id) only names the file."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = self.root / f"evt-{time.time_ns():020d}-{digest}.json"
        atomic_write(path, data)
        return path

    def pending(self) -> list[Path]:
        return sorted(self.root.glob("evt-*.json"))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def bury(self, path: Path) -> None:
        os.replace(path, self.dead / path.name)
        _fsync_dir(self.dead)
        _fsync_dir(self.root)


# ---------------------------------------------------------------- delivery


class Answer(NamedTuple):
    status: int | None  # None: no answer at all
    body: Any


Post = Callable[[bytes], Awaitable[Answer]]


async def post_json(session: aiohttp.ClientSession, url: str, token: Secret, data: bytes) -> Answer:
    """POST one body with the hypervisor token; the service's answer, or no answer."""
    headers = {"Authorization": f"Bearer {token.reveal()}", "Content-Type": "application/json"}
    try:
        async with session.post(url, data=data, headers=headers, allow_redirects=False) as resp:
            raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        return Answer(None, None)
    try:
        return Answer(resp.status, orjson.loads(raw))
    except orjson.JSONDecodeError:
        return Answer(resp.status, None)


async def deliver_file(spool: Spool, path: Path, post: Post,
                       id_key: str = DEFAULT_ID_KEY) -> tuple[Outcome, Answer]:  # fmt: skip
    """Send one spooled body; remove it when delivered, park it in dead/ when refused."""
    try:
        data = path.read_bytes()
        event_id = orjson.loads(data)[id_key]
    except FileNotFoundError:
        return Outcome.DELIVERED, Answer(None, None)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.error("spool_file_corrupt", file=path.name)
        spool.bury(path)
        return Outcome.DEAD, Answer(None, None)
    answer = await post(data)
    outcome = classify_status(answer.status)
    if outcome is Outcome.DELIVERED:
        spool.remove(path)
        log.info("event_delivered", event_id=event_id, status=answer.status)
    elif outcome is Outcome.DEAD:
        spool.bury(path)
        log.error("event_rejected", event_id=event_id, status=answer.status, moved_to="dead/")
    else:
        log.warning("event_delivery_failed", event_id=event_id, status=answer.status)
    return outcome, answer


@dataclass
class Retry:
    """How to back off; ``attempts`` None retries forever."""

    attempts: int | None = None
    base: float = 0.5
    rand: Callable[[], float] = random.random


async def drain(spool: Spool, post: Post, id_key: str, retry: Retry,
                wake: asyncio.Event | None = None) -> int:  # fmt: skip
    """Send the spool oldest first; returns how many remain once ``retry.attempts`` is spent.

    With ``wake``, it never returns: an empty spool waits for the next ``wake``.
    """
    attempt = 0
    while True:
        batch = spool.pending()
        if not batch:
            if wake is None:
                return 0
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            continue
        for path in batch:
            outcome, _ = await deliver_file(spool, path, post, id_key)
            if outcome is Outcome.RETRY:
                if retry.attempts is not None and attempt + 1 >= retry.attempts:
                    return len(spool.pending())
                await asyncio.sleep(backoff_delay(attempt, retry.rand(), base=retry.base))
                attempt += 1
                break
            attempt = 0
