"""Witnesses: where the ledger's signed checkpoints are held outside its database.

Two kinds, named by ``settings.witnesses``:

- ``file:PATH``: a JSON file this service replaces atomically (temporary file in the same
  directory, fsync, rename, fsync of the directory) under an exclusive ``flock`` of
  ``PATH.lock``, so that two workers never step it back between them.
- ``http(s)://HOST[:PORT]``: another replayguard deployment's witness endpoint
  (``PUT``/``GET /v1/witness/{deployment_id}``, role ``witness``, ``settings.witness_token``).

Both apply the same rule (``core.continuity.admit``): a checkpoint that steps back or
forks from what the witness holds is refused unless a recorded recovery covers it, and so
is one that the recovery the witness holds gave up.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..core import checkpoints as cps
from ..core import continuity
from ..core.checkpoints import Checkpoint
from ..core.continuity import Admission, Statement
from ..core.handover import Handover, handover_json, handovers_from_json
from ..durable import atomic_write, inherited_owner, locked

TIMEOUT_S = 3.0


class WitnessUnreachable(Exception):
    """The witness could not be read or written (its reason is the message)."""


@dataclass(frozen=True, slots=True)
class Record:
    """What a witness holds for one deployment (and what a push carries)."""

    deployment_id: str
    public_key_pem: str
    checkpoint: Checkpoint
    recovery: Statement | None = None
    # The signing key's handovers, oldest first, when it was rotated (``core/handover.py``):
    # how a witness holding an older key of the deployment comes to trust this one.
    handovers: tuple[Handover, ...] = ()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"deployment_id": self.deployment_id, "public_key_pem": self.public_key_pem,
                "checkpoint": cps.to_json(self.checkpoint),
                "recovery": None if self.recovery is None else continuity.statement_json(self.recovery)}
        if self.handovers:
            body["handovers"] = [handover_json(h) for h in self.handovers]
        return body


def record_from_json(data: Any) -> Record:
    """Parses ``Record.to_json``'s form; raises ValueError naming the fault."""
    if not isinstance(data, dict):
        raise ValueError("a witness record must be a JSON object")
    deployment, pem = data.get("deployment_id"), data.get("public_key_pem")
    if not isinstance(deployment, str) or not isinstance(pem, str):
        raise ValueError("deployment_id and public_key_pem must be strings")
    raw_recovery = data.get("recovery")
    recovery = None if raw_recovery is None else continuity.statement_from_json(raw_recovery)
    return Record(deployment, pem, cps.from_json(data.get("checkpoint")), recovery,
                  handovers_from_json(data.get("handovers")))


class Witness(Protocol):
    name: str

    async def read(self) -> Record | None:
        """What the witness holds (None: nothing yet); raises WitnessUnreachable."""

    async def put(self, record: Record) -> Admission:
        """Offers a checkpoint; a refusal is returned, not raised; raises WitnessUnreachable."""


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, a regular file: anything else (a FIFO, a device) is refused
    without waiting on it, so a witness path replaced by one never ties up a thread."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return file.read()


class FileWitness:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    async def read(self) -> Record | None:
        return await asyncio.to_thread(self._read)

    async def put(self, record: Record) -> Admission:
        return await asyncio.to_thread(self._put, record)

    def _read(self) -> Record | None:
        try:
            raw = _read_regular(self.path)
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                raise WitnessUnreachable(f"directory {self.path.parent} does not exist") from None
            return None
        except OSError as exc:
            raise WitnessUnreachable(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            return record_from_json(orjson.loads(raw))
        except (ValueError, orjson.JSONDecodeError) as exc:
            raise WitnessUnreachable(f"{self.path} is not a witness record: {exc}") from None

    def _put(self, record: Record) -> Admission:
        try:
            lock = self.path.with_name(f"{self.path.name}.lock")
            with locked(lock, owner=inherited_owner(self.path.parent)):
                held = self._read()
                verdict = continuity.admit(None if held is None else held.checkpoint, record.checkpoint,
                                           record.recovery, None if held is None else held.recovery)
                if verdict in (Admission.ACCEPT, Admission.RECOVERY):
                    kept = continuity.newest_statement(None if held is None else held.recovery, record.recovery)
                    handovers = record.handovers or (() if held is None else held.handovers)
                    written = Record(record.deployment_id, record.public_key_pem, record.checkpoint, kept, handovers)
                    atomic_write(self.path, orjson.dumps(written.to_json()))
                return verdict
        except OSError as exc:
            raise WitnessUnreachable(f"cannot write {self.path}: {exc.strerror}") from None


def http_witness_name(url: str) -> str:
    """How an HTTP witness is shown (metrics, logs, alerts): scheme://host:port/path, never
    credentials, a query or a fragment (settings refuse them; this holds whatever it is given)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment and "?" not in url and "#" not in url:
        return url  # as configured: the name continuity's records and the metrics' label use
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"


_ADMITTED = {a.value for a in Admission if not a.refused}


class HttpWitness:
    def __init__(self, base_url: str, deployment_id: str, token: str | None) -> None:
        self.name = http_witness_name(base_url)
        # The deployment's base URL; a full witness URL (…/v1/witness/ID) is taken as it is.
        self.url = base_url if "/v1/witness/" in base_url else f"{base_url.rstrip('/')}/v1/witness/{deployment_id}"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def _call(self, method: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session, \
                    session.request(method, self.url, json=body, headers=self._headers) as resp:
                data = await resp.read()
                return resp.status, orjson.loads(data) if data else None
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError, ValueError) as exc:
            # ValueError: a URL aiohttp cannot use (its message may quote the URL: only the type is shown)
            raise WitnessUnreachable(f"{self.name}: {type(exc).__name__}") from None

    async def read(self) -> Record | None:
        status, body = await self._call("GET")
        if status == 404:
            return None
        if status != 200:
            raise WitnessUnreachable(f"{self.name} answered {status}")
        try:
            return record_from_json(body)
        except ValueError as exc:
            raise WitnessUnreachable(f"{self.name} answered an unreadable record: {exc}") from None

    async def put(self, record: Record) -> Admission:
        """A 200 counts only with an admission a witness gives (``accept``, ``same``,
        ``recovery``): anything else that answers 200 (a proxy's page, another service at
        that URL) holds nothing, and is reported unreachable, never as holding the checkpoint."""
        status, body = await self._call("PUT", record.to_json())
        if status == 409:
            return Admission.STEPS_BACK
        if status != 200:
            raise WitnessUnreachable(f"{self.name} answered {status}")
        admission = body.get("admission") if isinstance(body, dict) else None
        if admission not in _ADMITTED:
            raise WitnessUnreachable(f"{self.name} answered 200 without a witness's admission")
        return Admission(admission)


def build_witnesses(specs: tuple[str, ...], deployment_id: str, token: str | None) -> list[Witness]:
    found: list[Witness] = []
    for spec in specs:
        if spec.startswith("file:"):
            found.append(FileWitness(Path(spec.removeprefix("file:"))))
        else:
            found.append(HttpWitness(spec, deployment_id, token))
    return found
