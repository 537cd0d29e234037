"""Where the Proxmox poller reads what the task list leaves out: PVE's API, or ``pvesh``.

The task list names neither the snapshot, nor a clone's new VM, nor a restore's backup, so
the poller asks PVE for the snapshot list (``/nodes/{node}/qemu/{vmid}/snapshot`` of a VM,
``/nodes/{node}/lxc/{vmid}/snapshot`` of a container) and the task log of a clone or a
restore. A lookup that fails answers None and the field is left out: a rollback with an unknown snapshot opens
the widest window, the safe side. A restore whose backup is unknown is posted as
``vm.restored`` of the VM restored into, from an unknown time (logged
``proxmox_restore_source_unknown``): the only window the poller can still name. A clone
whose task log could not be read has no record yet (``build_record`` answers None: the
poller asks again); one whose log was read and names no new guest gets a record without
``target_vmid``, which the service cannot take and the poller sets aside.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import tzinfo
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from ..settings import Secret
from .proxmox_tasks import (
    CLONES,
    RESTORES,
    ROLLBACKS,
    SNAPSHOTS,
    Cursor,
    Task,
    clone_target,
    guest_kind,
    list_gaps,
    parent_may_have_moved,
    read_tasks,
    restore_fields,
    restore_source,
    snapshot_fields,
    task_record,
)

log = structlog.get_logger("replayguard.relay.proxmox")


ARCHIVE_PAGE = 500  # tasks per read of a node's task archive
ARCHIVE_PAGES = 40  # at most 20,000 tasks of one node read after a gap, the rest logged


class ArchiveUnreadable(ValueError):
    """A node's task archive could not be read: the poll fails and is tried again."""


class Lookup(Protocol):
    """Where the poller reads what the task list leaves out; None when it cannot.

    ``snapshots``: the snapshot list of guest ``vmid`` of ``kind`` (``qemu`` or ``lxc``).
    ``task_log``: a task's log lines, None when they could not be read now (a clone's is
    asked for again at the next poll).
    ``task_archive``: a node's tasks started at or after ``since`` (newest first, as PVE
    lists them), None when this lookup has no way to read them, ``ArchiveUnreadable``
    when it has one and it failed.
    """

    async def snapshots(self, node: str, vmid: str, kind: str) -> object | None: ...
    async def task_log(self, node: str, upid: str) -> object | None: ...
    async def task_archive(self, node: str, since: int) -> list[object] | None: ...


class NoLookup:
    """``--lookup none``: nothing is read, and nothing will be, so every task log is empty
    (final: a clone's target stays unknown), not unread (which would be asked again)."""

    async def snapshots(self, node: str, vmid: str, kind: str) -> object | None:
        return None

    async def task_log(self, node: str, upid: str) -> object | None:
        return []

    async def task_archive(self, node: str, since: int) -> list[object] | None:
        return None


Page = Callable[[int], Awaitable[object | None]]


async def _archive(node: str, read_page: Page) -> list[object]:
    """Every page of a node's task archive, until a short page or ``ARCHIVE_PAGES``."""
    entries: list[object] = []
    for n in range(ARCHIVE_PAGES):
        page = await read_page(n * ARCHIVE_PAGE)
        if isinstance(page, dict):
            page = page.get("data")
        if not isinstance(page, list):
            raise ArchiveUnreadable(f"the task archive of node {node} could not be read")
        entries += page
        if len(page) < ARCHIVE_PAGE:
            return entries
    log.error("proxmox_task_archive_truncated", node=node, read=len(entries),
              hint="older tasks of this node were not read: poll more often")
    return entries


def _kind(kind: str) -> str:
    if kind not in ("qemu", "lxc"):
        raise ValueError(f"not a Proxmox guest kind: {kind!r}")
    return kind


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

    async def snapshots(self, node: str, vmid: str, kind: str) -> object | None:
        return await self._lookup(_node_path(node, f"{_kind(kind)}/{quote(vmid, safe='')}/snapshot"))

    async def task_log(self, node: str, upid: str) -> object | None:
        return await self._lookup(_node_path(node, f"tasks/{quote(upid, safe='')}/log?limit=500"))

    async def task_archive(self, node: str, since: int) -> list[object] | None:
        async def page(start: int) -> object | None:
            query = f"tasks?source=all&since={since}&start={start}&limit={ARCHIVE_PAGE}"
            return await self._lookup(_node_path(node, query))

        return await _archive(node, page)


class PveshLookup:
    """``pvesh get`` on a cluster node (cron or hookscript use, as root)."""

    timeout = 30.0

    async def _pvesh(self, path: str, *args: str) -> object | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "pvesh", "get", path, *args, "--output-format", "json",
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

    async def snapshots(self, node: str, vmid: str, kind: str) -> object | None:
        return await self._pvesh(_node_path(node, f"{_kind(kind)}/{vmid}/snapshot"))

    async def task_log(self, node: str, upid: str) -> object | None:
        return await self._pvesh(_node_path(node, f"tasks/{upid}/log"))

    async def task_archive(self, node: str, since: int) -> list[object] | None:
        async def page(start: int) -> object | None:
            return await self._pvesh(_node_path(node, "tasks"), "--source", "all", "--since", str(since),
                                     "--start", str(start), "--limit", str(ARCHIVE_PAGE))

        return await _archive(node, page)


async def build_record(task: Task, tasks: Sequence[Task], lookup: Lookup, cluster: str | None,
                       zone: tzinfo | None = None) -> dict[str, Any] | None:
    """One task's record with whatever the lookups can add (vzdump names read in ``zone``);
    None for a clone whose task log could not be read (the record waits for it)."""
    extra: dict[str, Any] = {}
    kind = guest_kind(task.upid.type)
    if task.upid.type in SNAPSHOTS | ROLLBACKS:
        snaps = await lookup.snapshots(task.upid.node, task.upid.id, kind)
        extra = snapshot_fields(task, snaps, parent_may_have_moved(task, tasks))
    elif task.upid.type in CLONES:
        task_log = await lookup.task_log(task.upid.node, task.upid.text)
        if task_log is None:
            return None
        target = clone_target(task_log, task.upid.id)
        if target is not None:
            extra = {"target_vmid": target}
    elif task.upid.type in RESTORES:
        backup = restore_source(await lookup.task_log(task.upid.node, task.upid.text), kind, zone)
        if backup is not None:
            extra = restore_fields(backup)
        else:
            # Posted anyway: a window on the VM restored into (every earlier use), and a
            # guest of the unknown source presenting its receipt is still clone_detected.
            log.warning("proxmox_restore_source_unknown", upid=task.upid.text,
                        posted="vm.restored of the vmid restored into, state time unknown")
    return task_record(task, cluster, extra)


async def with_archive(tasks: list[Task], cursor: Cursor, lookup: Lookup) -> list[Task]:
    """The listed tasks, plus those of each node's archive the list no longer reaches back to."""
    for node, since in list_gaps(tasks, cursor).items():
        older = await lookup.task_archive(node, since)
        if older is None:
            log.error("proxmox_task_list_gap", node=node, since=since, archive="not read",
                      hint="tasks that finished on this node since then and left /cluster/tasks are"
                           " not posted: give the poller --api-url, or pvesh, or poll more often")
            continue
        known = {t.upid.text for t in tasks}
        found = [t for t in read_tasks(older) if t.upid.node == node and t.upid.text not in known]
        log.warning("proxmox_task_list_gap", node=node, since=since, archive_tasks=len(found))
        tasks = tasks + found
    return tasks
