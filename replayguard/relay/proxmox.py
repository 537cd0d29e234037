"""The Proxmox VE task poller: finished VM tasks → replayguard, durably.

Proxmox hookscripts only see a guest's start and stop phases, never a snapshot, a
rollback, a clone or a migration, so the poller reads PVE's cluster task list instead
(``GET /api2/json/cluster/tasks`` with an API token, or ``pvesh get /cluster/tasks
--output-format json`` on stdin) and posts every finished VM task it has not posted yet,
as the record ``replayguard/hypervisors/proxmox.py`` documents, to
``POST /v1/hypervisor/events?source=proxmox``.

The task list names neither the snapshot nor a clone's new VM, so the poller asks PVE:
the snapshot list (``snaptime``; ``current.parent`` is the snapshot a rollback went to,
trusted only while no later task on that VM can have moved it) and a clone's task log
(the new VM's disk names). A lookup that fails leaves the field out: a rollback with an
unknown snapshot opens the widest window, which is the safe side.

Each record is written to the spool (fsynced) before its UPID enters the cursor, and the
cursor (``proxmox-cursor.json``) is written atomically after, so a crash re-posts at
worst, and re-posting a UPID is idempotent on the service. The pure parts (cursor,
task selection, record building) are plain functions; I/O is at the bottom.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from ..core.events import MalformedPayload
from ..errors import ConfigError
from ..hypervisors.proxmox import TASK_TYPES, Upid, decode_upid
from ..settings import Secret
from .cli import (
    _Parser,
    _pick,
    _required,
    _service_url,
    _token,
    configure_logging,
    prepare_spool,
)
from .libvirt_relay import Outcome, Spool, atomic_write, backoff_delay, classify_status

EVENTS_PATH = "/v1/hypervisor/events?source=proxmox"
CURSOR_FILE = "proxmox-cursor.json"
RECORD_FIELDS = ("upid", "node", "pid", "pstart", "starttime", "type", "id", "user", "status", "endtime")
# Tasks after which a VM's current.parent may no longer be the snapshot a rollback went to.
MOVES_PARENT = frozenset({"qmsnapshot", "qmrollback", "qmdelsnapshot", "qmrestore"})
_WARNINGS = re.compile(r"WARNINGS: [0-9]+")
_DISK = re.compile(r"\b(?:vm|base)-([1-9][0-9]{2,8})-(?:disk|cloudinit|state)\b")

log = structlog.get_logger("replayguard.relay.proxmox")


# ---------------------------------------------------------------- pure: tasks and cursor


class Task(NamedTuple):
    """One entry of the cluster task list with its decoded UPID."""

    upid: Upid
    raw: Mapping[str, Any]

    @property
    def finished(self) -> bool:
        return self.raw.get("endtime") is not None

    @property
    def succeeded(self) -> bool:
        """OK or ``WARNINGS: n``, as ``PVE::Tools::upid_status_is_error`` sees it."""
        status = self.raw.get("status")
        return status == "OK" or (isinstance(status, str) and bool(_WARNINGS.fullmatch(status)))

    @property
    def forwarded(self) -> bool:
        return self.upid.type in TASK_TYPES and self.succeeded


def read_tasks(listing: object) -> list[Task]:
    """Entries with a valid UPID from ``pvesh`` output (a list) or the API's ``{"data": [...]}``."""
    if isinstance(listing, dict):
        listing = listing.get("data")
    if not isinstance(listing, list):
        raise TypeError("a task list is a JSON array (or an object with 'data')")
    tasks = []
    for entry in listing:
        if isinstance(entry, dict):
            with contextlib.suppress(MalformedPayload):
                tasks.append(Task(decode_upid(entry.get("upid")), entry))
    return tasks


@dataclass
class Cursor:
    """UPIDs already handled (→ their start time), so each finished task is posted once."""

    seen: dict[str, int] = field(default_factory=dict)

    def __contains__(self, upid: str) -> bool:
        return upid in self.seen

    def add(self, task: Task) -> None:
        self.seen[task.upid.text] = task.upid.starttime

    def prune(self, listed: Iterable[str], before: int) -> None:
        """Forget UPIDs older than ``before`` that PVE no longer lists: they cannot return."""
        keep = set(listed)
        self.seen = {u: t for u, t in self.seen.items() if t >= before or u in keep}

    def to_json(self) -> bytes:
        return orjson.dumps({"seen": self.seen}, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> Cursor:
        """Inverse of ``to_json``; an unreadable cursor raises, never silently re-posts all."""
        try:
            seen = orjson.loads(data)["seen"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable {CURSOR_FILE}: {type(exc).__name__}") from exc
        if not isinstance(seen, dict) or not all(isinstance(v, int) for v in seen.values()):
            raise ValueError(f"{CURSOR_FILE}: 'seen' must map UPIDs to start times")
        return cls(dict(seen))


def due(tasks: Sequence[Task], cursor: Cursor) -> list[Task]:
    """Finished tasks not handled yet, oldest end first (running ones wait for a later poll)."""
    fresh = [t for t in tasks if t.finished and t.upid.text not in cursor]
    return sorted(fresh, key=lambda t: (t.raw.get("endtime") or 0, t.upid.text))


def parent_may_have_moved(task: Task, tasks: Sequence[Task]) -> bool:
    """A later (or still running) task on the same VM may have changed ``current.parent``."""
    return any(
        other.upid.id == task.upid.id and other.upid.type in MOVES_PARENT
        and other.upid.starttime >= task.upid.starttime and other.upid.text != task.upid.text
        for other in tasks
    )


def snapshot_fields(task: Task, snapshots: object, moved: bool) -> dict[str, Any]:
    """``snapshot`` and ``snapshot_created_at`` of a qmsnapshot/qmrollback, as far as known.

    qmsnapshot: the one snapshot whose ``snaptime`` falls inside the task. qmrollback: the
    ``parent`` of the pseudo-snapshot ``current``, unless ``moved``.
    """
    if not isinstance(snapshots, list):
        return {}
    named = {s["name"]: s for s in snapshots if isinstance(s, dict) and isinstance(s.get("name"), str)}
    if task.upid.type == "qmsnapshot":
        end = task.raw.get("endtime")
        inside = [s for n, s in named.items() if n != "current" and isinstance(s.get("snaptime"), int)
                  and isinstance(end, int) and task.upid.starttime <= s["snaptime"] <= end]
        chosen = inside[0] if len(inside) == 1 else None
    elif task.upid.type == "qmrollback" and not moved:
        parent = (named.get("current") or {}).get("parent")
        chosen = named.get(parent) if isinstance(parent, str) and parent != "current" else None
    else:
        chosen = None
    if chosen is None:
        return {}
    when = chosen.get("snaptime")
    return {"snapshot": chosen["name"], **({"snapshot_created_at": when} if isinstance(when, int) else {})}


def clone_target(task_log: object, source_vmid: str) -> int | None:
    """The new VM of a qmclone, from the disk volume names its task log prints."""
    if isinstance(task_log, dict):
        task_log = task_log.get("data")
    if not isinstance(task_log, list):
        return None
    found = {m for line in task_log if isinstance(line, dict) and isinstance(line.get("t"), str)
             for m in _DISK.findall(line["t"])} - {source_vmid}
    return int(found.pop()) if len(found) == 1 else None


def task_record(task: Task, cluster: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The body posted for one task: PVE's own fields, then ours."""
    record = {k: task.raw[k] for k in RECORD_FIELDS if task.raw.get(k) is not None}
    if cluster is not None:
        record["cluster"] = cluster
    return {**record, **extra}


# ---------------------------------------------------------------- lookups


class Lookup(Protocol):
    """Where the poller reads what the task list leaves out; None when it cannot."""

    async def snapshots(self, node: str, vmid: str) -> object | None: ...
    async def task_log(self, node: str, upid: str) -> object | None: ...


class NoLookup:
    async def snapshots(self, node: str, vmid: str) -> object | None:
        return None

    async def task_log(self, node: str, upid: str) -> object | None:
        return None


def _node_path(node: str, rest: str) -> str:
    return f"/nodes/{quote(node, safe='')}/{rest}"


class ApiLookup:
    """PVE's REST API with an API token (``PVEAPIToken=USER@REALM!TOKENID=SECRET``)."""

    def __init__(self, session: aiohttp.ClientSession, api_url: str, token: Secret,
                 tls: ssl.SSLContext | bool = True) -> None:
        self.session, self.base, self.token, self.tls = session, api_url.rstrip("/") + "/api2/json", token, tls

    async def get(self, path: str) -> object:
        """The ``data`` of one API path, as ``pvesh`` would print it; aiohttp.ClientError on failure."""
        headers = {"Authorization": f"PVEAPIToken={self.token.reveal()}"}
        async with self.session.get(self.base + path, headers=headers, ssl=self.tls) as resp:
            resp.raise_for_status()
            body = orjson.loads(await resp.read())
        return body.get("data") if isinstance(body, dict) else body

    async def _lookup(self, path: str) -> object | None:
        try:
            return await self.get(path)
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            log.warning("proxmox_lookup_failed", path=path, error=type(exc).__name__)
            return None

    async def snapshots(self, node: str, vmid: str) -> object | None:
        return await self._lookup(_node_path(node, f"qemu/{quote(vmid, safe='')}/snapshot"))

    async def task_log(self, node: str, upid: str) -> object | None:
        return await self._lookup(_node_path(node, f"tasks/{quote(upid, safe='')}/log?limit=500"))


class PveshLookup:
    """``pvesh get`` on a cluster node (cron or hookscript use, as root)."""

    timeout = 30.0

    async def _pvesh(self, path: str) -> object | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "pvesh", "get", path, "--output-format", "json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            log.warning("proxmox_lookup_failed", path=path, error=type(exc).__name__)
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
            return orjson.loads(out) if proc.returncode == 0 else None
        except TimeoutError:
            proc.kill()
            await proc.wait()
        except orjson.JSONDecodeError:
            pass
        log.warning("proxmox_lookup_failed", path=path, returncode=proc.returncode)
        return None

    async def snapshots(self, node: str, vmid: str) -> object | None:
        return await self._pvesh(_node_path(node, f"qemu/{vmid}/snapshot"))

    async def task_log(self, node: str, upid: str) -> object | None:
        return await self._pvesh(_node_path(node, f"tasks/{upid}/log"))


async def build_record(task: Task, tasks: Sequence[Task], lookup: Lookup, cluster: str | None) -> dict[str, Any]:
    """One task's record with whatever the lookups can add."""
    extra: dict[str, Any] = {}
    if task.upid.type in ("qmsnapshot", "qmrollback"):
        snaps = await lookup.snapshots(task.upid.node, task.upid.id)
        extra = snapshot_fields(task, snaps, parent_may_have_moved(task, tasks))
    elif task.upid.type == "qmclone":
        target = clone_target(await lookup.task_log(task.upid.node, task.upid.text), task.upid.id)
        if target is not None:
            extra = {"target_vmid": target}
    return task_record(task, cluster, extra)


# ---------------------------------------------------------------- the outbox


class Outbox(Spool):
    """The libvirt relay's spool, for bodies whose id is not called ``event_id``."""

    def put_bytes(self, key: str, data: bytes) -> Path:
        path = self.root / f"evt-{time.time_ns():020d}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        atomic_write(path, data)
        return path


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


async def deliver_file(outbox: Outbox, path: Path, post: Post, id_key: str) -> tuple[Outcome, Answer]:
    """Send one spooled body; remove it when delivered, park it in dead/ when refused."""
    try:
        data = path.read_bytes()
        event_id = orjson.loads(data)[id_key]
    except FileNotFoundError:
        return Outcome.DELIVERED, Answer(None, None)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.error("spool_file_corrupt", file=path.name)
        outbox.bury(path)
        return Outcome.DEAD, Answer(None, None)
    answer = await post(data)
    outcome = classify_status(answer.status)
    if outcome is Outcome.DELIVERED:
        outbox.remove(path)
        log.info("event_delivered", event_id=event_id, status=answer.status)
    elif outcome is Outcome.DEAD:
        outbox.bury(path)
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


async def drain(outbox: Outbox, post: Post, id_key: str, retry: Retry,
                wake: asyncio.Event | None = None) -> int:
    """Send the spool oldest first; returns how many remain once ``retry.attempts`` is spent.

    With ``wake``, it never returns: an empty spool waits for the next ``wake``.
    """
    attempt = 0
    while True:
        batch = outbox.pending()
        if not batch:
            if wake is None:
                return 0
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            continue
        for path in batch:
            outcome, _ = await deliver_file(outbox, path, post, id_key)
            if outcome is Outcome.RETRY:
                if retry.attempts is not None and attempt + 1 >= retry.attempts:
                    return len(outbox.pending())
                await asyncio.sleep(backoff_delay(attempt, retry.rand(), base=retry.base))
                attempt += 1
                break
            attempt = 0


# ---------------------------------------------------------------- one poll


def load_cursor(state_dir: Path) -> Cursor:
    try:
        return Cursor.from_json((state_dir / CURSOR_FILE).read_bytes())
    except FileNotFoundError:
        return Cursor()


async def poll_once(listing: object, *, state_dir: Path, outbox: Outbox, lookup: Lookup,
                    cluster: str | None, now: float, retention_s: int) -> int:
    """Spool the records of the tasks not handled yet, then advance the cursor; returns how many."""
    tasks = read_tasks(listing)
    cursor = load_cursor(state_dir)
    spooled = 0
    for task in due(tasks, cursor):
        if task.forwarded:
            record = await build_record(task, tasks, lookup, cluster)
            if task.upid.type == "qmclone" and "target_vmid" not in record:
                log.warning("proxmox_clone_target_unknown", upid=task.upid.text)
            else:
                outbox.put_bytes(task.upid.text, orjson.dumps(record))
                spooled += 1
                log.info("event_spooled", upid=task.upid.text, type=task.upid.type)
        cursor.add(task)
    cursor.prune((t.upid.text for t in tasks), before=int(now) - retention_s)
    atomic_write(state_dir / CURSOR_FILE, cursor.to_json())
    return spooled



# ---------------------------------------------------------------- running it

EX_TEMPFAIL = 75  # events left in the spool: the next run sends them


@dataclass(frozen=True)
class PollerConfig:
    service_url: str
    token: Secret
    spool_dir: Path
    api_url: str | None = None
    api_token: Secret | None = None
    tls: ssl.SSLContext | bool = True
    lookup: str = "api"  # api, pvesh or none
    cluster: str | None = None
    interval: float = 10.0
    once: bool = False
    attempts: int = 5  # delivery attempts of a --once run before leaving events spooled
    retention_s: int = 7 * 86400
    retry_base: float = 0.5


def _lookup(config: PollerConfig, api: ApiLookup | None) -> Lookup:
    if config.lookup == "api" and api is not None:
        return api
    return PveshLookup() if config.lookup == "pvesh" else NoLookup()


async def run_poller(config: PollerConfig, listing: object | None = None,
                     stop: asyncio.Event | None = None) -> int:
    """Poll once (``listing`` given, or ``once``) or until ``stop``; returns the exit status."""
    outbox = Outbox(config.spool_dir)
    url = config.service_url.rstrip("/") + EVENTS_PATH
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        api = None
        if config.api_url is not None and config.api_token is not None:
            api = ApiLookup(session, config.api_url, config.api_token, config.tls)

        async def post(data: bytes) -> Answer:
            return await post_json(session, url, config.token, data)

        retry = Retry(base=config.retry_base)
        if listing is not None or config.once:
            polled = await _poll(config, api, outbox, listing)
            retry.attempts = config.attempts
            remaining = await drain(outbox, post, "upid", retry)
            return 0 if polled and remaining == 0 else EX_TEMPFAIL
        stop = stop or asyncio.Event()
        wake = asyncio.Event()
        tasks = [asyncio.create_task(drain(outbox, post, "upid", retry, wake)),
                 asyncio.create_task(_poll_forever(config, api, outbox, wake, stop))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc
    return 0


async def _poll(config: PollerConfig, api: ApiLookup | None, outbox: Outbox, listing: object | None) -> bool:
    """One poll; False when the task list could not be read (logged)."""
    try:
        if listing is None:
            if api is None:
                raise ValueError("no task list: give --api-url or --from-stdin")
            listing = await api.get("/cluster/tasks")
        spooled = await poll_once(listing, state_dir=config.spool_dir, outbox=outbox,
                                  lookup=_lookup(config, api), cluster=config.cluster,
                                  now=time.time(), retention_s=config.retention_s)
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
        log.warning("proxmox_poll_failed", error=str(exc) or type(exc).__name__)
        return False
    log.info("proxmox_polled", spooled=spooled)
    return True


async def _poll_forever(config: PollerConfig, api: ApiLookup | None, outbox: Outbox,
                        wake: asyncio.Event, stop: asyncio.Event) -> None:
    attempt = 0
    while not stop.is_set():
        if await _poll(config, api, outbox, None):
            wake.set()
            attempt, delay = 0, config.interval
        else:
            delay = min(config.interval, backoff_delay(attempt, random.random()))
            attempt += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="replayguard-relay-proxmox",
                description="Post finished Proxmox VE VM tasks to replayguard.")
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
                   help="where snapshot names/times and clone targets are read (default: api if --api-url, else pvesh if on PATH)")
    p.add_argument("--cluster", help="cluster name prefixed to vmids (vm_id becomes CLUSTER/VMID)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    p.add_argument("--once", action="store_true", help="poll once, try to deliver, exit (for a timer)")
    return p


def _secret_file(path: str, flag: str) -> Secret:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {flag} {path}: {type(exc).__name__}", field=flag) from exc
    if not value:
        raise ConfigError(f"{flag} {path} is empty", field=flag)
    return Secret(value)


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> tuple[PollerConfig, bool]:
    """Flags and ``REPLAYGUARD_RELAY_*`` → (config, read stdin); problems are ConfigError."""
    args = _parser().parse_args(list(argv))
    api_url = _pick(args.api_url, env, "pve-api-url")
    api_token_file = _pick(args.api_token_file, env, "pve-token-file")
    if not args.from_stdin and (api_url is None or api_token_file is None):
        raise ConfigError("give --api-url and --api-token-file, or --from-stdin", field="api-url")
    if not 0 < args.interval <= 3600:
        raise ConfigError("--interval must be seconds in (0, 3600]", field="interval")
    lookup = args.lookup or ("api" if api_url else "pvesh" if shutil.which("pvesh") else "none")
    if lookup == "api" and (api_url is None or api_token_file is None):
        raise ConfigError("--lookup api needs --api-url and --api-token-file", field="lookup")
    tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else True
    config = PollerConfig(
        service_url=_service_url(_required(_pick(args.service_url, env, "service-url"), "service-url")),
        token=_token(_pick(args.token_file, env, "token-file"), env),
        spool_dir=Path(_required(_pick(args.spool_dir, env, "spool-dir"), "spool-dir")),
        api_url=api_url, api_token=_secret_file(api_token_file, "--api-token-file") if api_token_file else None,
        tls=False if args.insecure else tls, lookup=lookup,
        cluster=_pick(args.cluster, env, "cluster"), interval=args.interval,
        once=args.once or args.from_stdin,
    )
    return config, args.from_stdin


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m replayguard.relay.proxmox``; returns the exit status."""
    try:
        config, from_stdin = load_config(sys.argv[1:] if argv is None else argv, os.environ)
        prepare_spool(config.spool_dir)
        listing = orjson.loads(sys.stdin.buffer.read()) if from_stdin else None
    except ConfigError as exc:
        print(f"replayguard-relay-proxmox: error: {exc.message}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError as exc:
        print(f"replayguard-relay-proxmox: error: stdin is not JSON: {exc}", file=sys.stderr)
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
