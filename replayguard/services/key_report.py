"""What an operator is shown of the keys (``replayguard keys show``): names, never keys.

After rotations the facts an operator needs are spread out: the deployment id (the first
signing key's id, what witnesses know the deployment by) is in the first ``key_rotation``
entry, each signing key's span of the ledger in the handovers, the retired receipt keys'
last entries in ``key_rotations``, the retired keys' file ids in ``retired/``. The report
gathers them, for the data dir and database of a process that passed the key binding:

- ``deployment_id`` and ``signing_keys``: every signing key, oldest first, from the
  ledger's handovers (``core/handover.signers_json``: id, key file id, public key PEM,
  ``first_seq``/``last_seq``, ``handed_over_at``);
- ``receipt_key``: the current key's id (as receipts carry it) and file id, and each
  rotation that retired one, with the ledger's head then (``last_seq``: the last entry it
  issued receipts at) and the retired key's ids when its file is in ``retired/`` (null
  when it is not: receipts under it are then taken as forgeries);
- ``secret_key``: the current key's file id and each rotation that retired one.

Every id is a keyed hash or the id of a public key: nothing in it says anything of a key.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ..core import receipts, timefmt
from ..core.handover import Signers, public_raw, signers_json
from ..keys import Keys, key_file_id, retired_keys
from ..pg.connections import acquire
from ..settings import Settings
from .key_binding import check_of

_ROTATIONS = ("SELECT key_name, retired_check, rotated_us, ledger_seq FROM key_rotations"
              " WHERE key_name IN ('secret', 'receipt') ORDER BY id")


async def key_report(pool: asyncpg.Pool, settings: Settings, keys: Keys, signers: Signers) -> dict[str, Any]:
    """The report (see the module) for ``keys`` (held to the database's key binding) and
    ``signers`` (the chain the ledger's handovers make)."""
    async with acquire(pool) as conn:
        rows = await conn.fetch(_ROTATIONS)
    signing_files = {public_raw(key): key_file_id(key) for key in
                     [*retired_keys(settings, "signing").values(), keys.signing]}
    return {"deployment_id": signers.deployment_id,
            "signing_keys": signers_json(signers, signing_files),
            "receipt_key": {"key_id": receipts.key_id(keys.receipt), "file_id": key_file_id(keys.receipt),
                            "retired": _retired(settings, rows, "receipt")},
            "secret_key": {"file_id": key_file_id(keys.secret), "retired": _retired(settings, rows, "secret")}}


def _retired(settings: Settings, rows: list[asyncpg.Record], name: str) -> list[dict[str, Any]]:
    """Each rotation that retired a ``name`` key, oldest first, with its key's ids when its
    retired file is there."""
    files = {check_of(key): key for key in retired_keys(settings, name).values()}
    found = []
    for row in rows:
        if row["key_name"] != name:
            continue
        key = files.get(bytes(row["retired_check"]))
        entry: dict[str, Any] = {"file_id": None if key is None else key_file_id(key)}
        if name == "receipt":
            entry = {"key_id": None if key is None else receipts.key_id(key), **entry}
        found.append({**entry, "last_seq": int(row["ledger_seq"]),
                      "retired_at": timefmt.rfc3339_us(int(row["rotated_us"]))})
    return found
