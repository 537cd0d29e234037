"""``replayguard keys rotate``: the secret, receipt or signing key replaced, the database moved;
``replayguard keys show``: the deployment id and every key's ids, as one JSON line.

Run with the data dir (and ``database_url``) ``serve`` uses, with every instance stopped:
the rotation refuses while another replayguard process is connected to the database,
checked before it applies pending migrations, so a refused rotation leaves the schema as it was.
Progress goes to stderr as JSON lines, the summary to stdout as one JSON line; neither
ever holds a key (only key ids). It makes no key it does not find (a data dir without
them is the wrong one). ``--restored`` moves a database restored from a backup
taken before a rotation (bound to keys this data dir retired) to the current keys.
``--signing`` rotates the checkpoint signing key on its own (``services/signing_rotation.py``).

``show`` starts as any command on the database does (the key binding holds it to the
database's keys) and prints ``services/key_report.py``'s report: ids, public keys and the
ledger spans they cover, never a key.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys
from collections.abc import Iterable
from typing import Any

import orjson

from ..settings import Settings


def register(sub: Any) -> None:
    from .main import add_setting_flags

    keys = sub.add_parser("keys", help="rotate the secret key, the receipt key or the checkpoint signing key;"
                                       " show every key's id")
    cmds = keys.add_subparsers(dest="keys_command", required=True)
    rotate = cmds.add_parser("rotate", help="replace keys and move the database to them (every instance stopped)")
    add_setting_flags(rotate)
    rotate.add_argument("--secret", action="store_true", help="rotate the key that encrypts token secrets")
    rotate.add_argument("--receipt", action="store_true", help="rotate the key that MACs guests' receipts")
    rotate.add_argument("--signing", action="store_true",
                        help="rotate the key that signs checkpoints (the old key hands over to the new one; alone)")
    rotate.add_argument("--restored", action="store_true",
                        help="move a database restored from a backup taken before a rotation to the current keys")
    rotate.set_defaults(handler=cmd_rotate)
    show = cmds.add_parser("show", help="print the deployment id, every signing key's id, public key and span of"
                                        " the ledger, and the receipt and secret keys' ids (one JSON line, no key)")
    add_setting_flags(show)
    show.set_defaults(handler=cmd_show)


async def _others_retired(pool: Any, keys: Any) -> bool:
    """Whether the database is bound to another secret or receipt key than this data dir's."""
    import hmac

    from ..services import key_rotation
    from ..services.key_binding import check_of

    bound = await key_rotation.bound_checks(pool)
    return any(not hmac.compare_digest(bound.get(name) or b"", check_of(getattr(keys, name)))
               for name in ("secret", "receipt"))


def _progress(step: str, facts: dict[str, Any]) -> None:
    sys.stderr.write(orjson.dumps({"event": step, **facts}).decode() + "\n")
    sys.stderr.flush()


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from ..errors import ConfigError
    from .main import run_async

    names = [name for name in ("secret", "receipt", "signing") if getattr(args, name)]
    if args.restored and names:
        raise ConfigError("--restored takes no --secret, --receipt or --signing: it moves every retired key the"
                          " database is bound to")
    if not args.restored and not names:
        raise ConfigError("name a key to rotate: --secret, --receipt (or both), or --signing")
    if "signing" in names and len(names) > 1:
        raise ConfigError("--signing is rotated on its own: run it, then --secret/--receipt (or the other way round)")
    done = run_async(_rotate(settings, names, restored=args.restored))
    print(orjson.dumps(done).decode())
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from .main import run_async

    print(orjson.dumps(run_async(_show(settings))).decode())
    return 0


def _refuse_missing(settings: Settings, names: Iterable[str], purpose: str, outcome: str) -> None:
    """Every other command makes the keys it does not find; these read or replace the keys
    serve runs with, so one missing means the wrong data dir or key files: refused before
    any key is made."""
    from ..errors import ConfigError
    from ..keys import key_paths

    missing = [path for name, path in key_paths(settings).items() if name in names and not path.exists()]
    if missing:
        raise ConfigError(f"no key at {', '.join(map(str, missing))}: {purpose}; give it serve's data dir"
                          f" (and key file settings); {outcome}")


async def _show(settings: Settings) -> dict[str, Any]:
    from ..runtime import open_runtime
    from ..services.key_report import key_report

    _refuse_missing(settings, ("pepper", "secret", "receipt", "signing"), "keys show prints the keys serve runs with",
                    "no key was made")
    async with open_runtime(settings) as runtime:
        return await key_report(runtime.pool, settings, runtime.keys, runtime.continuity.signers)


async def _rotate(settings: Settings, names: list[str], *, restored: bool) -> dict[str, Any]:
    import time

    from ..keys import key_paths, keys_location, keys_on_disk, load_keys, retired_keys
    from ..pg import connections, schema
    from ..runtime import resolve_dsn
    from ..services import key_rotation, signing_rotation
    from ..services.key_binding import hold_to_binding

    _refuse_missing(settings, [name for name in key_paths(settings) if name != "signing" or "signing" in names],
                    "keys rotate replaces the keys serve runs with", "nothing was rotated")
    keys = load_keys(settings)
    dsn = resolve_dsn(settings)
    await connections.check_reachable(dsn)
    # A name no other process has: the rotation refuses while any other session named
    # replayguard-… is connected, and a serve on another host may have this process's id.
    name = f"replayguard-{os.getpid()}-keys-{secrets.token_hex(4)}"
    pool = await connections.create_pool(dsn, size=2, statement_timeout_ms=settings.statement_timeout_ms,
                                         application_name=name)
    try:
        # Checked before migrating too: a refused rotation leaves the schema as it found it
        # (the check in the rotation's transaction is the one that holds).
        async with connections.acquire(pool) as conn:
            await key_rotation.refuse_while_others_connected(conn)
        await schema.migrate_dsn(dsn)
        now_us = int(time.time() * 1e6)
        if restored:
            signing = await signing_rotation.adopt_restored(pool, settings, keys, now_us, _progress)
            if signing is not None and not await _others_retired(pool, keys):
                return signing.to_json()
            done = (await key_rotation.adopt_restored(pool, settings, keys, now_us, _progress)).to_json()
            if signing is not None:
                done["rotated"] = ["signing", *done["rotated"]]
                done["new_key_ids"] = {**signing.new_key_ids, **done["new_key_ids"]}
            return done
        if await key_rotation.settle(pool, settings) + await signing_rotation.settle(pool, settings):
            keys = load_keys(settings)
        retired = {**retired_keys(settings, "secret"), **retired_keys(settings, "receipt"),
                   **retired_keys(settings, "signing")}
        await hold_to_binding(pool, keys, now_us, keys_location(settings), retired,
                              functools.partial(keys_on_disk, settings))
        if names == ["signing"]:
            return (await signing_rotation.rotate(pool, settings, keys, now_us, _progress)).to_json()
        return (await key_rotation.rotate(pool, settings, keys, names, now_us, _progress)).to_json()
    finally:
        await pool.close()
