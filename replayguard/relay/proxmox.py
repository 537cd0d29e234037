"""The Proxmox VE task poller: finished VM and container tasks → replayguard, durably.

Proxmox hookscripts only see a guest's start and stop phases, never a snapshot, a
rollback, a clone or a migration, so the poller reads PVE's cluster task list instead
(``GET /api2/json/cluster/tasks`` with an API token, or ``pvesh get /cluster/tasks
--output-format json`` on stdin) and posts every finished task of a VM (QEMU, ``qm*``) or
a container (LXC, ``vz*``) it has not posted yet, as the record
``replayguard/hypervisors/proxmox.py`` documents, to ``POST /v1/hypervisor/events?source=proxmox``.

The task list names neither the snapshot, nor a clone's new VM, nor a restore's backup, so
the poller asks PVE: the snapshot list (``snaptime``; ``current.parent`` is the snapshot a
rollback went to, trusted only while no later task on that VM can have moved it), a
clone's task log (the new VM's disk names) and a restore's task log (the backup's archive
or snapshot name: its VM and time, a vzdump name read in ``--node-timezone``; a restore
into another vmid is posted as a clone of the backup's VM). A lookup that fails leaves the
field out: a rollback with an unknown snapshot opens the widest window, which is the safe
side. A clone is the exception, since the service needs its new VM: one whose task log is
unread is asked for again (for a day), one whose new VM stays unknown is set aside in dead/.

Each record is written to the spool (fsynced) before its UPID enters the cursor, and the
cursor (``proxmox-cursor.json``) is written atomically after, so a crash re-posts at
worst, and re-posting a UPID is idempotent on the service. A ``--once`` run then tries to
deliver: a record the service refuses for itself (403: a VM the token is not bound to;
413) is set aside in dead/ once its attempts are spent, since resending it cannot help;
when the service refused everything (401: a wrong token or event signature; a redirect,
404 or 405: a wrong service URL) or could not be reached, the run exits non-zero and the
records wait in the spool for the next run. The pure parts (cursor, task selection,
record building) are in ``proxmox_tasks.py``, the lookups in ``proxmox_lookup.py``, the
spool and delivery in ``spool.py``; this module polls and runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import ssl
import sys
import time
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path

import aiohttp
import orjson
import structlog

from ..durable import atomic_write
from ..errors import ConfigError
from ..settings import Secret
from .options import (
    Parser,
    add_secret_flag,
    checked_service_url,
    configure_logging,
    event_secret,
    pick,
    prepare_spool,
    read_token,
    required,
)
from .proxmox_lookup import ApiLookup, Lookup, NoLookup, PveshLookup, build_record, with_archive
from .proxmox_tasks import (
    CLONES,
    CURSOR_FILE,
    MOVES_PARENT,
    RECORD_FIELDS,
    Backup,
    Cursor,
    Task,
    clone_target,
    due,
    list_gaps,
    parent_may_have_moved,
    read_tasks,
    restore_fields,
    restore_source,
    snapshot_fields,
    task_record,
)
from .spool import (
    Answer,
    Post,
    Retry,
    Spool,
    backoff_delay,
    deliver_file,
    drain,
    post_json,
)
from .tasks import until_first_done

__all__ = [
    "CLONE_LOG_PATIENCE_S", "CURSOR_FILE", "EVENTS_PATH", "EX_TEMPFAIL", "MOVES_PARENT", "RECORD_FIELDS",
    "Answer", "ApiLookup", "Backup", "Cursor", "Lookup", "NoLookup", "Outbox", "PollerConfig", "Post",
    "PveshLookup", "Retry", "Task", "build_record", "clone_target", "deliver_file", "drain",
    "due", "list_gaps", "load_config", "load_cursor", "main", "node_timezone", "parent_may_have_moved", "poll_once",
    "post_json", "read_tasks", "restore_fields", "restore_source", "run_poller", "save_cursor",
    "snapshot_fields", "spool_due", "task_record",
]  # fmt: skip

EVENTS_PATH = "/v1/hypervisor/events?source=proxmox"
Outbox = Spool  # the name importers of this module know the spool by

log = structlog.get_logger("replayguard.relay.proxmox")


# ---------------------------------------------------------------- one poll


def load_cursor(state_dir: Path) -> Cursor:
    try:
        return Cursor.from_json((state_dir / CURSOR_FILE).read_bytes())
    except FileNotFoundError:
        return Cursor()


async def poll_once(listing: object, *, state_dir: Path, outbox: Spool, lookup: Lookup,
                    cluster: str | None, now: float, retention_s: int, zone: tzinfo | None = None) -> int:
    """Spool the records of the tasks not handled yet, then advance the cursor; returns how many."""
    spooled, cursor = await spool_due(listing, state_dir=state_dir, outbox=outbox, lookup=lookup,
                                      cluster=cluster, now=now, retention_s=retention_s, zone=zone)
    save_cursor(state_dir, cursor)
    return spooled


def save_cursor(state_dir: Path, cursor: Cursor) -> None:
    atomic_write(state_dir / CURSOR_FILE, cursor.to_json())


async def spool_due(listing: object, *, state_dir: Path, outbox: Spool, lookup: Lookup, cluster: str | None,
                    now: float, retention_s: int, zone: tzinfo | None = None) -> tuple[int, Cursor]:
    """Spool the records of the tasks not handled yet; (how many, the cursor to save next).

    A clone whose task log PVE did not answer stays out of the cursor (remembered as not
    handled, as a running task is) and is asked for again by the next poll, for at most
    ``CLONE_LOG_PATIENCE_S`` after it ended; a clone whose new guest stays unknown is set
    aside in dead/ and handled.
    """
    cursor = load_cursor(state_dir)
    tasks = await with_archive(read_tasks(listing), cursor, lookup)
    spooled, waiting = 0, []
    for task in due(tasks, cursor):
        if task.forwarded:
            record = await build_record(task, tasks, lookup, cluster, zone)
            if record is None and not _waited_out(task, now):
                log.warning("proxmox_clone_target_unknown", upid=task.upid.text, task_log="not read",
                            retry="next poll")
                waiting.append(task)
                continue
            if record is None or (task.upid.type in CLONES and "target_vmid" not in record):
                _set_aside_clone(outbox, task, record or task_record(task, cluster, {}), read=record is not None)
            else:
                outbox.put_bytes(task.upid.text, orjson.dumps(record))
                spooled += 1
                log.info("event_spooled", upid=task.upid.text, type=task.upid.type)
        cursor.add(task)
    for lost in cursor.note_running(tasks, waiting):
        log.error("proxmox_running_task_lost", upid=lost,
                  hint="seen running or waiting for its task log, then neither listed nor found in its"
                       " node's archive: not posted")
    cursor.prune((t.upid.text for t in tasks), before=int(now) - retention_s)
    return spooled, cursor


CLONE_LOG_PATIENCE_S = 86400  # how long after a clone ended its unreadable task log is asked for again
SET_ASIDE_CLONE_HINT = ("find the new guest's vmid (the clone task's log or the guest's creation in the PVE GUI),"
                        ' add "target_vmid": VMID to the file and move it back into the spool directory')


def _waited_out(task: Task, now: float) -> bool:
    end = task.raw.get("endtime")
    return isinstance(end, int) and now - end >= CLONE_LOG_PATIENCE_S


def _set_aside_clone(outbox: Spool, task: Task, record: Mapping[str, object], read: bool) -> None:
    """A clone whose new guest is unknown: the service cannot take it without ``target_vmid``,
    so its record goes to dead/ for the operator, with one error line saying how to finish it."""
    path = outbox.set_aside(task.upid.text, orjson.dumps(record))
    log.error("proxmox_clone_target_unknown", upid=task.upid.text, source_vmid=task.upid.id,
              node=task.upid.node, task_log="names no new guest" if read else "not read for a day",
              set_aside=f"dead/{path.name}", hint=SET_ASIDE_CLONE_HINT)



# ---------------------------------------------------------------- running it

EX_TEMPFAIL = 75  # events left in the spool: the next run sends them


@dataclass(frozen=True)
class PollerConfig:
    service_url: str
    token: Secret
    spool_dir: Path
    event_secret: Secret | None = None  # the service's event_hmac_secret: sign every record
    api_url: str | None = None
    api_token: Secret | None = None
    tls: ssl.SSLContext | bool = True
    lookup: str = "api"  # api, pvesh or none
    cluster: str | None = None
    interval: float = 10.0
    once: bool = False
    attempts: int = 5  # delivery attempts of a --once run before leaving events spooled (or set aside)
    retention_s: int = 7 * 86400
    retry_base: float = 0.5
    node_timezone: tzinfo | None = None  # the nodes' zone, in which vzdump names its archives


def _lookup(config: PollerConfig, api: ApiLookup | None) -> Lookup:
    if config.lookup == "api" and api is not None:
        return api
    return PveshLookup() if config.lookup == "pvesh" else NoLookup()


async def run_poller(config: PollerConfig, listing: object | None = None,
                     stop: asyncio.Event | None = None) -> int:
    """Poll once (``listing`` given, or ``once``) or until ``stop``; returns the exit status."""
    outbox = Spool(config.spool_dir)
    url = config.service_url.rstrip("/") + EVENTS_PATH
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        api = None
        if config.api_url is not None and config.api_token is not None:
            api = ApiLookup(session, config.api_url, config.api_token, config.tls)

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, config.token, data, config.event_secret)

        retry = Retry(base=config.retry_base)
        if listing is not None or config.once:
            polled = await _poll(config, api, outbox, listing)
            retry.attempts = config.attempts
            remaining = await drain(outbox, post, "upid", retry, set_aside=True)
            if polled is None or remaining:
                log.error("proxmox_run_incomplete", left_in_spool=remaining, polled=polled is not None)
                return EX_TEMPFAIL
            return 0
        stop = stop or asyncio.Event()
        wake = asyncio.Event()
        await until_first_done(drain(outbox, post, "upid", retry, wake),
                               _poll_forever(config, api, outbox, wake, stop))  # fmt: skip
    return 0


async def _poll(config: PollerConfig, api: ApiLookup | None, outbox: Spool, listing: object | None) -> Cursor | None:
    """One poll, saving the cursor once its records are spooled; the cursor, or None when
    the task list could not be read (logged)."""
    try:
        if listing is None:
            if api is None:
                raise ValueError("no task list: give --api-url or --from-stdin")
            listing = await api.get("/cluster/tasks")
        spooled, cursor = await spool_due(listing, state_dir=config.spool_dir, outbox=outbox,
                                          lookup=_lookup(config, api), cluster=config.cluster,
                                          now=time.time(), retention_s=config.retention_s,
                                          zone=config.node_timezone)
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        log.warning("proxmox_poll_failed", error=str(exc) or type(exc).__name__)
        return None
    save_cursor(config.spool_dir, cursor)
    log.info("proxmox_polled", spooled=spooled)
    return cursor


async def _poll_forever(config: PollerConfig, api: ApiLookup | None, outbox: Spool,
                        wake: asyncio.Event, stop: asyncio.Event) -> None:
    attempt = 0
    while not stop.is_set():
        if await _poll(config, api, outbox, None) is not None:
            wake.set()
            attempt, delay = 0, config.interval
        else:
            delay = min(config.interval, backoff_delay(attempt, random.random()))  # noqa: S311 - retry jitter, not a secret
            attempt += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="replayguard-relay proxmox",
                description="Post finished Proxmox VE VM and container tasks to replayguard.")
    p.add_argument("--service-url", help="replayguard base URL, e.g. https://replayguard:8080")
    p.add_argument("--token-file", help="file holding a replayguard token of role hypervisor")
    p.add_argument("--spool-dir", help="directory of unsent records and the UPID cursor")
    p.add_argument("--api-url", help="Proxmox API, e.g. https://pve1:8006")
    p.add_argument("--api-token-file", help="file holding USER@REALM!TOKENID=SECRET")
    p.add_argument("--ca-file", help="CA of the Proxmox API (e.g. /etc/pve/pve-root-ca.pem)")
    p.add_argument("--insecure", action="store_true", help="do not verify the API's certificate")
    p.add_argument("--from-stdin", action="store_true",
                   help="read `pvesh get /cluster/tasks --output-format json` from stdin; implies --once")
    p.add_argument("--lookup", choices=("api", "pvesh", "none"),
                   help="where snapshot names/times, clone targets and restores' backups are read"
                        " (default: api if --api-url, else pvesh if on PATH)")
    p.add_argument("--cluster", help="cluster name prefixed to vmids (vm_id becomes CLUSTER/VMID)")
    p.add_argument("--node-timezone",
                   help="IANA time zone the cluster's nodes run (`timedatectl`), e.g. Europe/Vienna: vzdump"
                        " archive names are read in it (default: unknown, read as their earliest instant)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    p.add_argument("--once", action="store_true", help="poll once, try to deliver, exit (for a timer)")
    add_secret_flag(p)
    return p


def _secret_file(path: str, flag: str) -> Secret:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {flag} {path}: {type(exc).__name__}", field=flag) from exc
    if not value:
        raise ConfigError(f"{flag} {path} is empty", field=flag)
    return Secret(value)


def node_timezone(name: str | None) -> tzinfo | None:
    """The ``--node-timezone`` as a zone, None when not given; a ConfigError when this host
    knows no IANA zone of that name."""
    if name is None:
        return None
    key = name.strip()
    try:
        # "localtime" is this host's zone, which need not be the nodes'.
        if key != "localtime" and key in zoneinfo.available_timezones():
            return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    raise ConfigError(f"--node-timezone {name!r} is not an IANA time zone this host knows (such as"
                      " Europe/Vienna or UTC; `timedatectl` on a PVE node shows its zone; install the"
                      " tzdata package if none is known)", field="node-timezone")


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> tuple[PollerConfig, bool]:
    """Flags and ``REPLAYGUARD_RELAY_*`` → (config, read stdin); problems are ConfigError."""
    args = _parser().parse_args(list(argv))
    api_url = pick(args.api_url, env, "pve-api-url")
    if api_url is not None:
        checked_service_url(api_url, "--api-url")
    api_token_file = pick(args.api_token_file, env, "pve-token-file")
    if not args.from_stdin and (api_url is None or api_token_file is None):
        raise ConfigError("give --api-url and --api-token-file, or --from-stdin", field="api-url")
    if not 0 < args.interval <= 3600:
        raise ConfigError("--interval must be seconds in (0, 3600]", field="interval")
    lookup = args.lookup or ("api" if api_url else "pvesh" if shutil.which("pvesh") else "none")
    if lookup == "api" and (api_url is None or api_token_file is None):
        raise ConfigError("--lookup api needs --api-url and --api-token-file", field="lookup")
    tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else True
    config = PollerConfig(
        service_url=checked_service_url(required(pick(args.service_url, env, "service-url"), "service-url")),
        token=read_token(pick(args.token_file, env, "token-file"), env),
        spool_dir=Path(required(pick(args.spool_dir, env, "spool-dir"), "spool-dir")),
        event_secret=event_secret(pick(args.event_hmac_secret_file, env, "event-hmac-secret-file"), env),
        api_url=api_url, api_token=_secret_file(api_token_file, "--api-token-file") if api_token_file else None,
        tls=False if args.insecure else tls, lookup=lookup,
        cluster=pick(args.cluster, env, "cluster"), interval=args.interval,
        once=args.once or args.from_stdin, node_timezone=node_timezone(pick(args.node_timezone, env, "node-timezone")),
    )
    return config, args.from_stdin


def main(argv: list[str] | None = None) -> int:
    """``replayguard-relay proxmox …`` (or ``python -m replayguard.relay.proxmox``); returns the exit status."""
    try:
        config, from_stdin = load_config(sys.argv[1:] if argv is None else argv, os.environ)
        prepare_spool(config.spool_dir)
        listing = orjson.loads(sys.stdin.buffer.read()) if from_stdin else None
    except ConfigError as exc:
        print(f"replayguard-relay proxmox: error: {exc.message}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError as exc:
        print(f"replayguard-relay proxmox: error: stdin is not JSON: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    configure_logging()
    return asyncio.run(_main(config, listing))


async def _main(config: PollerConfig, listing: object | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await run_poller(config, listing, stop)


if __name__ == "__main__":
    sys.exit(main())
