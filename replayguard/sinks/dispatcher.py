"""The sink dispatcher: one lane per sink, each a spool, a memory queue and a delivery task.

``SinkDispatcher.submit`` is called on the decision path, so it is synchronous, never
touches the network and never raises. The record is appended to each lane's spool and,
while there is room, to a bounded in-memory queue that spares re-reading the disk. One
task per lane delivers in spool order and commits the delivered offset, so a slow or dead
sink only slows its own lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import structlog

from .. import __version__
from .config import SinkConfig
from .outbox import Spool
from .transports import Clock, DeliveryError, Record, Sink, build_sink


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
        self._stopping = asyncio.Event()
        self._unsynced = False
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

    async def sync(self) -> None:
        """Makes every line appended so far durable (fsync, in a thread)."""
        self._unsynced = False  # a line appended while the fsync runs sets it again
        try:
            await asyncio.to_thread(self.spool.sync)
        except OSError:
            self._unsynced = True
            raise

    def request_stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    def stats(self) -> SinkStats:
        return SinkStats(self.delivered, self.failed_attempts, self.rejected, self.dropped,
                         self.backlog, self.last_error)  # fmt: skip

    async def run(self) -> None:
        """Deliver until stopped and drained, or stopped while the sink fails: a failing sink
        is not retried on the way out, the spool keeps the rest for the next start."""
        attempt = 0
        while True:
            failures = self.failed_attempts
            try:
                batch = await self._next_batch()
                if not batch:
                    if self._stopping.is_set():
                        return
                    self._wakeup.clear()  # no await since _next_batch looked: no wakeup is lost
                    await self._wakeup.wait()
                    continue
                attempt = await self._deliver(batch, attempt)
            except OSError as exc:
                # The outbox's own files failed (a full or failing disk: the spool's read or
                # fsync, the cursor's commit): a failed attempt like a sink's, retried after
                # the backoff from the cursor, which has not moved past anything undelivered.
                attempt = await self._outbox_failed(exc, attempt)
            if self._stopping.is_set() and self.failed_attempts > failures:
                return

    async def _next_batch(self) -> list[_Entry]:
        """The next records at the cursor: from memory when it holds them, else from disk."""
        cursor = self.spool.cursor
        while self._memory and self._memory[0].end <= cursor:
            self._memory.popleft()
        if self._memory and self._memory[0].start == cursor:
            # Only the run that follows on from the cursor: records submitted while memory
            # was full went to the spool alone, and memory resumes after them with a gap.
            batch: list[_Entry] = []
            for entry in self._memory:
                if entry.start != cursor or len(batch) == self._opt.batch_size:
                    break
                batch.append(entry)
                cursor = entry.end
            return batch
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
            await self.sync()
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
        await self._pause(delay)
        return attempt + 1

    async def _outbox_failed(self, exc: OSError, attempt: int) -> int:
        self._unsynced = True  # whatever the failure, the next attempt syncs the spool first
        self.last_error = f"outbox: {exc}"
        self.failed_attempts += 1
        delay = self._opt.backoff.delay(attempt, random.random())  # noqa: S311 - jitter, not crypto
        self._log.error("sink_outbox_io_failed", error=str(exc), retry_in_s=round(delay, 3))
        await self._pause(delay)
        return attempt + 1

    async def _pause(self, delay: float) -> None:
        """The backoff; a stop ends the wait: nothing is retried then."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _advance(self, done: list[_Entry]) -> None:
        """Commit the cursor past ``done``; empty the spool once everything is delivered."""
        if not done:
            return
        await asyncio.to_thread(self.spool.commit, done[-1].end)
        self.delivered += len(done)
        self.backlog -= len(done)
        if self.spool.cursor == self.spool.end and self.spool.end >= self._opt.compact_bytes:
            self._memory.clear()  # all delivered; cleared first, as a failed compaction leaves offsets reset
            self.spool.compact()  # synchronous: no submit may append between truncate and commit


@dataclass(frozen=True)
class _Options:
    memory_limit: int
    batch_size: int
    backoff: Backoff
    compact_bytes: int


def _close_after(spool: Spool, opening: asyncio.Future[int]) -> None:
    """Closes a spool whose opening nobody waits for any more (its outcome is not wanted)."""
    if not opening.cancelled():
        opening.exception()  # retrieved, so asyncio does not log it as forgotten
    spool.close()


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
        except BaseException:  # a failed open, or a cancel (the service stopping): no spool stays locked
            for lane in self._lanes:
                lane.spool.close()
            self._lanes = []
            raise
        self._tasks = [asyncio.create_task(lane.run(), name=f"sink:{lane.config.name}") for lane in self._lanes]
        for task in self._tasks:
            task.add_done_callback(self._lane_ended)
        self._running = True

    async def _open_lane(self, config: SinkConfig) -> _Lane:
        spool = Spool(self._spool_dir, config.name)
        opening = asyncio.ensure_future(asyncio.to_thread(spool.open))
        try:
            backlog = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread opens (and locks) the spool all the same: close it once it has.
            opening.add_done_callback(lambda done: _close_after(spool, done))
            raise
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

    async def sync(self) -> None:
        """Makes every record submitted so far durable in every spool (fsync, in a thread),
        whether or not a lane has synced it already; raises OSError when a spool cannot be."""
        for lane in self._lanes:
            await lane.sync()

    async def stop(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout``; the rest stays in the spools.

        A lane whose sink fails stops at once, without waiting out its backoff, and a send in
        flight is given the timeout to finish: only a send that overruns it is abandoned, and
        a receiver may still act on an abandoned send (delivery is at least once, by id).
        """
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
