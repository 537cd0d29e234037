"""The libvirt relay: libvirt events and snapshot polling → replayguard, durably.

libvirt tells a watcher about lifecycle changes (a revert shows as STOPPED/STARTED with a
FROM_SNAPSHOT detail) but says nothing when a snapshot is created or deleted, and an
in-place revert of a running QEMU guest can emit no event at all. So the relay does two
things: it forwards every lifecycle event, and it polls every domain's snapshot list and
current snapshot and state to synthesise ``snapshot_created``, ``snapshot_deleted`` and
``silent_revert`` (the current snapshot moved back, or the domain runs from a revert the
previous poll did not see, with no FROM_SNAPSHOT event seen).

Every event gets its id when it is born and is written to the spool (``spool.py``)
before anything is sent, so a dead service or a ``kill -9`` of the relay delays an event
but never loses it, and re-posting it is idempotent on the service side. The pure parts
(ids, bodies, snapshot diffing) live in ``libvirt_events.py``, the libvirt connection in
``libvirt_watcher.py``; this module runs them and re-exports their public names.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import structlog

from ..durable import atomic_write
from .libvirt_events import (
    FROM_SNAPSHOT,
    MAX_EVENT_ID,
    SOURCE,
    STOPPED_FROM_SNAPSHOT,
    SYNTHETIC,
    AtStop,
    DomainView,
    Kind,
    RelayConfig,
    RunState,
    SnapshotChange,
    SnapshotRef,
    change_body,
    change_event_id,
    diff_domain,
    event_body,
    halted_by_snapshot,
    is_from_snapshot,
    is_silent_revert,
    lifecycle_event_id,
    make_event_id,
    parse_creation_time,
    parse_snapshot_state,
    reverted_by_state,
    rfc3339,
    views_from_json,
    views_to_json,
)
from .libvirt_watcher import Pending, RelayState, Watcher
from .spool import (
    Answer,
    Outcome,
    Retry,
    Spool,
    backoff_delay,
    classify_status,
    deliver_file,
    drain,
    post_json,
)
from .tasks import first_done, until_first_done

__all__ = [
    "EVENTS_PATH", "FROM_SNAPSHOT", "MAX_EVENT_ID", "SOURCE", "STATE_FILE", "STOPPED_FROM_SNAPSHOT", "SYNTHETIC",
    "AtStop", "DomainView", "Kind", "Outcome", "RelayConfig", "RunState", "SnapshotChange", "SnapshotRef", "Spool",
    "backoff_delay", "change_body", "change_event_id", "classify_status",
    "deliver_forever", "deliver_one", "diff_domain", "event_body", "halted_by_snapshot", "is_from_snapshot",
    "is_silent_revert", "lifecycle_event_id", "make_event_id", "parse_creation_time", "parse_snapshot_state",
    "reverted_by_state", "rfc3339",
    "run_relay", "views_from_json", "views_to_json",
]  # fmt: skip

EVENTS_PATH = "/v1/hypervisor/events?source=libvirt"
STATE_FILE = "poll-state.json"

log = structlog.get_logger("replayguard.relay.libvirt")
HALT_SETTLE_S = 0.2  # after reading a STOPPED/FROM_SNAPSHOT's domain, for later events to arrive
SPOOL_RETRY_S = 1.0  # a lifecycle event's spool write that failed is tried again after this


# ---------------------------------------------------------------- delivery

StatusPost = Callable[[bytes], Awaitable[int | None]]


def _answering(post: StatusPost) -> Callable[[bytes], Awaitable[Answer]]:
    """A status-only ``post`` (the service's statuses): a 4xx carries the service's error body."""
    async def answer(data: bytes) -> Answer:
        status = await post(data)
        rejected = status is not None and 400 <= status < 500
        return Answer(status, {"error": {"code": "http_" + str(status), "message": ""}} if rejected else None)

    return answer


async def deliver_one(spool: Spool, path: Path, post: StatusPost) -> Outcome:
    """Send one spooled event and settle its file according to the answer's status."""
    outcome, _ = await deliver_file(spool, path, _answering(post))
    return outcome


async def deliver_forever(
    spool: Spool, post: StatusPost, wake: asyncio.Event, rand: Callable[[], float] = random.random
) -> None:
    """Drain the spool in order, forever; back off while the service cannot take events."""
    await drain(spool, _answering(post), "event_id", Retry(rand=rand), wake)


# ---------------------------------------------------------------- libvirt


async def _lifecycle_worker(relay: RelayState, watcher: Watcher) -> None:
    """Complete queued lifecycle events with the current snapshot and spool them.

    A completed event is held in ``relay.held`` until its spool write succeeds, so one
    whose write failed (a full disk) is still there for the next connection's worker
    when a reconnection cancels this one.
    """
    cfg = relay.config
    while True:
        await _spool_held(relay)
        p = await relay.lifecycle.get()
        halted = False
        if (p.event, p.detail) == STOPPED_FROM_SNAPSHOT:
            snap, halted = await _stopped_from_snapshot(watcher, p)
        else:
            snap = watcher.current_snapshot(p.dom) if is_from_snapshot(p.event, p.detail) else None
        relay.held.append(event_body(
            event_id=p.event_id,
            uri=cfg.uri,
            host=cfg.host,
            domain=(p.dom.name(), p.dom.UUIDString()),
            kind=Kind.LIFECYCLE,
            event=p.event,
            detail=p.detail,
            occurred_at=p.occurred_at,
            snapshot=snap,
            snapshot_create_halt=halted,
        ))


async def _stopped_from_snapshot(watcher: Watcher, p: Pending) -> tuple[SnapshotRef | None, bool]:
    """The current snapshot of a STOPPED/FROM_SNAPSHOT event, and whether it is
    ``snapshot-create --halt`` rather than a revert (``halted_by_snapshot``, against the
    poll recorded when the event arrived: one recorded since may have seen the new
    snapshot, which would make a halt look like a revert to an older one). The events
    libvirtd queued before the state read are given ``HALT_SETTLE_S`` to arrive: one of the
    domain after this one (a revert, a start, then a halt) makes it a revert. Only a
    revert counts as one for the poll (``lifecycle_seen``): a halt hides no silent revert."""
    run, current, state, children = watcher.at_stop(p.dom)
    await asyncio.sleep(HALT_SETTLE_S)
    seen = AtStop(run, current, state, children, watcher.events_after(p.dom, p.n))
    halted = halted_by_snapshot(p.event, p.detail, p.occurred_at, seen, p.polled)
    if not halted:
        watcher.saw_revert(p.dom, p.monotonic)
    return current, halted


async def _spool_held(relay: RelayState) -> None:
    """Spool the held lifecycle events, oldest first, each removed only once written.

    They live only here (libvirt does not send an event again, and a revert to the current
    snapshot can leave nothing for the poller to see): a spool write that fails (a full disk)
    is tried again until it succeeds, never given up.
    """
    while relay.held:
        body = relay.held[0]
        try:
            relay.spool_event(body)
        except OSError as exc:
            log.error("event_spool_failed", event_id=body["event_id"], error=str(exc), retry_in_s=SPOOL_RETRY_S)
            await asyncio.sleep(SPOOL_RETRY_S)
        else:
            relay.held.popleft()


async def _poll_forever(relay: RelayState, watcher: Watcher) -> None:
    """Poll snapshots; a short settle lets events already received reach their callback.

    A poll whose changes cannot all be spooled, or whose state cannot be saved (a full
    disk), is not taken as seen: the next poll diffs against the last one saved, so it
    finds the same changes again (creations and deletions under the same ids).
    """
    interval = relay.config.poll_interval
    settle = min(0.5, interval / 4)
    previous_start = time.monotonic()
    while True:
        started = time.monotonic()
        views, unreadable = watcher.read_views()
        await asyncio.sleep(settle)
        # A domain unreadable this time keeps its last view: dropping it would leave the
        # next poll nothing to compare with, and a silent revert in between unreported.
        views |= {u: relay.state[u] for u in unreadable if u in relay.state}
        try:
            _record_poll(relay, watcher, views, previous_start, time.time())
        except OSError as exc:
            log.error("poll_spool_failed", error=str(exc), retry_in_s=interval)
        else:
            previous_start = started
        await asyncio.sleep(max(0.0, interval - settle))


def _record_poll(relay: RelayState, watcher: Watcher, views: dict[str, DomainView],
                 previous_start: float, observed: float) -> None:  # fmt: skip
    """Spool the changes since the last recorded poll, then save this poll as the last."""
    for uuid, view in views.items():
        seen = watcher.from_snapshot_seen.get(uuid, -math.inf) >= previous_start
        for change in diff_domain(relay.state.get(uuid), view, seen):
            relay.spool_event(
                change_body(uri=relay.config.uri, host=relay.config.host, view=view,
                            change=change, observed_at=observed)
            )
    if views_to_json(views) != views_to_json(relay.state):
        atomic_write(relay.config.spool_dir / STATE_FILE, views_to_json(views))
    relay.state = views


async def _run_watcher(relay: RelayState, watcher: Watcher, stop: asyncio.Event) -> None:
    """Run one connection until it closes, a read fails, or the relay is stopped."""
    import libvirt

    done = await first_done(
        _poll_forever(relay, watcher), _lifecycle_worker(relay, watcher), watcher.closed.wait(), stop.wait()
    )
    for task in done:
        exc = task.exception()
        if isinstance(exc, libvirt.libvirtError):
            log.warning("libvirt_call_failed", error=str(exc))
        elif exc is not None:
            raise exc


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)


async def _watch_libvirt(relay: RelayState, stop: asyncio.Event) -> None:
    """Keep a libvirt connection open, reconnecting with backoff whenever it drops.

    The backoff resets only after a connection that lasted a minute, so a connection
    that opens and then fails at once (a broken driver) cannot spin.
    """
    import libvirt

    attempt = 0
    while not stop.is_set():
        began = time.monotonic()
        try:
            watcher = Watcher(relay)
        except libvirt.libvirtError as exc:
            log.warning("libvirt_connect_failed", uri=relay.config.uri, error=str(exc))
        else:
            log.info("libvirt_connected", uri=relay.config.uri)
            try:
                await _run_watcher(relay, watcher, stop)
            finally:
                watcher.close()
            if stop.is_set():
                break
            log.warning("libvirt_disconnected", uri=relay.config.uri)
        if time.monotonic() - began > 60:
            attempt = 0
        await _sleep_or_stop(stop, backoff_delay(attempt, random.random()))  # noqa: S311 - retry jitter, not a secret
        attempt += 1


def _load_state(spool_dir: Path) -> dict[str, DomainView]:
    try:
        return views_from_json((spool_dir / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return {}


async def run_relay(config: RelayConfig, stop: asyncio.Event | None = None) -> None:
    """Run the relay until ``stop`` is set: watch libvirt, spool events, deliver them."""
    import libvirt
    import libvirtaio

    libvirtaio.virEventRegisterAsyncIOImpl()  # before any connection is opened
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we log errors ourselves
    stop = stop or asyncio.Event()
    relay = RelayState(
        config=config,
        spool=Spool(config.spool_dir),
        wake=asyncio.Event(),
        boot_id=format(time.time_ns(), "x"),
        state=_load_state(config.spool_dir),
    )
    url = config.service_url.rstrip("/") + EVENTS_PATH
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, config.token, data, config.event_secret)

        log.info("relay_started", uri=config.uri, service_url=config.service_url,
                 spool_dir=str(config.spool_dir), poll_interval=config.poll_interval)
        # either ends only by stop or by a bug/disk error, which must end the process
        await until_first_done(drain(relay.spool, post, "event_id", Retry(), relay.wake),
                               _watch_libvirt(relay, stop))  # fmt: skip
    log.info("relay_stopped")
