"""``replayguard ledger …``: verify the chain, list checkpoints, export the public key, and
check a checkpoint offline with nothing but the public key (no database, no data dir).

Offline check, for a third party::

    replayguard ledger public-key > replayguard.pub.pem          # the operator, once
    curl -H "Authorization: Bearer $T" https://rg/v1/ledger/checkpoints | jq '.items[0]' > cp.json
    replayguard ledger verify-checkpoint --public-key replayguard.pub.pem --checkpoint cp.json

Exit status 0 when the signature holds, 1 when it does not, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from ..core import checkpoints as cps
from ..core.ledger_check import Problem
from ..errors import ConfigError
from ..settings import Settings

EXIT_BAD = 1
CHECKPOINTS_LIMIT = (1, 1_000_000)


def checkpoints_limit(text: str) -> int:
    """``ledger checkpoints --limit``: a whole number within ``CHECKPOINTS_LIMIT``, else a usage error."""
    low, high = CHECKPOINTS_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    from .main import add_setting_flags as add

    add(parser)


def register(sub: Any) -> None:
    ledger = sub.add_parser("ledger", help="verify the ledger and its signed checkpoints")
    cmds = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = cmds.add_parser("verify", help="recompute the whole hash chain and check the state tables against it"
                                                  " (progress on stderr)")
    _add_common(verify)
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(handler=cmd_verify)
    listing = cmds.add_parser("checkpoints", help="print signed checkpoints as JSON lines, newest first")
    _add_common(listing)
    listing.add_argument("--limit", type=checkpoints_limit, default=20,
                         help=f"how many ({CHECKPOINTS_LIMIT[0]} to {CHECKPOINTS_LIMIT[1]}; default 20)")
    listing.set_defaults(handler=cmd_checkpoints)
    public = cmds.add_parser("public-key", help="print the current checkpoint-signing public key (PEM; every one"
                                                " since the first, with its span of the ledger: 'keys show')")
    _add_common(public)
    public.set_defaults(handler=cmd_public_key)
    recover = cmds.add_parser("accept-rollback", help="record that the ledger went back in time, and move on")
    _add_common(recover)
    recover.add_argument("--reason", required=True, help="why (kept in the ledger)")
    recover.set_defaults(handler=cmd_accept_rollback)
    offline = cmds.add_parser("verify-checkpoint", help="check a checkpoint's signature offline")
    offline.add_argument("--public-key", type=Path, required=True, help="PEM file from 'ledger public-key'")
    offline.add_argument("--checkpoint", type=Path, required=True, help="one checkpoint as JSON")
    offline.add_argument("--ledger-hash", help="also require this hash (hex) for the checkpoint's seq")
    offline.set_defaults(handler=cmd_verify_checkpoint)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def cmd_verify_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    """Needs no database and no data dir: a public key file and a checkpoint file."""
    try:
        public = cps.load_public_key(_read(args.public_key, "public key"))
    except ValueError as exc:
        raise ConfigError(f"{args.public_key}: not an Ed25519 public key in PEM ({exc})") from None
    try:
        checkpoint = cps.from_json(orjson.loads(_read(args.checkpoint, "checkpoint")))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{args.checkpoint}: {exc}") from None
    if not cps.verify(public, checkpoint):
        print(f"INVALID: checkpoint seq {checkpoint.seq} is not signed by key {cps.key_id(public)}")
        return EXIT_BAD
    if args.ledger_hash is not None and args.ledger_hash.lower() != checkpoint.hash.hex():
        print(f"MISMATCH: the checkpoint says entry {checkpoint.seq} has hash {checkpoint.hash.hex()}")
        return EXIT_BAD
    print(f"valid: ledger entry {checkpoint.seq} had hash {checkpoint.hash.hex()} "
          f"(signed {cps.to_json(checkpoint)['created_at']} by key {checkpoint.key_id})")
    return 0


def cmd_public_key(args: argparse.Namespace, settings: Settings) -> int:
    from ..keys import load_keys

    print(cps.public_key_pem(load_keys(settings).signing_key().public_key()), end="")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from .main import run_async

    return run_async(_verify(settings, progress=not args.no_progress))


class _Bar:
    """A tqdm bar opened at the first report, once the number of entries is known."""

    def __init__(self, enabled: bool, desc: str = "verifying") -> None:
        self._enabled = enabled
        self._desc = desc
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="entries", desc=self._desc, file=sys.stderr, mininterval=0.5)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _verify(settings: Settings, *, progress: bool) -> int:
    from ..runtime import open_runtime
    from ..services.ledger import LedgerService

    async with open_runtime(settings) as runtime:
        service = LedgerService(runtime.pool, runtime.keys, settings.nonce_max_ttl_s,
                                signers=runtime.continuity.signers)
        rollback = await runtime.continuity.check()
        bar, state_bar = _Bar(progress), _Bar(progress, "checking state")
        try:
            report = await service.verify(bar, rollback=rollback, now_us=runtime.now_us(), state_progress=state_bar)
        finally:
            bar.close()
            state_bar.close()
        if report.finding is not None and report.finding.problem is not Problem.LEDGER_ROLLBACK:
            await service.raise_tamper_alert(report.finding, runtime.now_us(), report.state)
    print(orjson.dumps(report.to_json()).decode())
    return 0 if report.ok else EXIT_BAD


def cmd_checkpoints(args: argparse.Namespace, settings: Settings) -> int:
    from .main import run_async

    async def run() -> int:
        from ..runtime import open_runtime
        from ..services.ledger import LedgerService

        async with open_runtime(settings) as runtime:
            items = await LedgerService(runtime.pool, runtime.keys).list_checkpoints(None, args.limit)
        for item in items:
            print(orjson.dumps(item).decode())
        return 0

    return run_async(run())


def cmd_accept_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from .main import run_async

    reason = args.reason.strip()
    if not 1 <= len(reason) <= 2000 or not reason.isprintable():
        raise ConfigError("--reason must be 1 to 2000 printable characters")
    return run_async(_accept_rollback(settings, reason))


async def _accept_rollback(settings: Settings, reason: str) -> int:
    """Records the recovery, then pushes its checkpoint to every witness (CONTRACT §10)."""
    from ..runtime import open_runtime
    from ..services import recovery

    async with open_runtime(settings) as runtime:
        guard = runtime.continuity
        rollback = await guard.check()
        if guard.unreachable:
            raise ConfigError(f"witness {guard.unreachable[0]} cannot be reached: a recovery must know what "
                              "every witness holds (bring it back, or remove it from 'witnesses')")
        if rollback is None:
            print("nothing to recover: the ledger holds every checkpoint its witnesses hold")
            return EXIT_BAD
        done = await recovery.record(runtime.pool, runtime.keys.signing_key(), guard.held_checkpoints(), reason,
                                     recovery.operator(), runtime.now_us(), settings.totp_drift_steps)
        await guard.check()
        answers = await guard.exchange.push(done.checkpoint)
        still = await guard.check()
    print(orjson.dumps({"recovery_seq": done.seq, "abandoned": done.payload["abandoned"],
                        "database_head": done.payload["database_head"], "who": done.payload["who"],
                        "hotp_tokens_revoked": len(done.payload["hotp_tokens_revoked"]),
                        "totp_credentials_raised": done.payload["totp_credentials_raised"],
                        "witnesses": answers, "serving": still is None}).decode())
    return 0 if still is None else EXIT_BAD
