"""Where the Proxmox poller reads what the task list leaves out: PVE's API, or ``pvesh``.

The task list names neither the snapshot, nor a clone's new VM, nor a restore's backup, so
the poller asks PVE for the snapshot list and the task log of a clone or a restore. A lookup
that fails answers None and the field is left out: a rollback with an unknown snapshot opens
the widest window, the safe side. A restore whose backup is unknown is posted as
``vm.restored`` of the VM restored into, from an unknown time (logged
``proxmox_restore_source_unknown``): the only window the poller can still name.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from ..settings import Secret
from .proxmox_tasks import (
    Task,
    clone_target,
    parent_may_have_moved,
    restore_fields,
    restore_source,
    snapshot_fields,
    task_record,
)

log = structlog.get_logger("replayguard.relay.proxmox")


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
    elif task.upid.type == "qmrestore":
        backup = restore_source(await lookup.task_log(task.upid.node, task.upid.text))
        if backup is not None:
            extra = restore_fields(backup)
        else:
            # Posted anyway: a window on the VM restored into (every earlier use), and a
            # guest of the unknown source presenting its receipt is still clone_detected.
            log.warning("proxmox_restore_source_unknown", upid=task.upid.text,
                        posted="vm.restored of the vmid restored into, state time unknown")
    return task_record(task, cluster, extra)
