"""The command line: thin, calling the same services as the HTTP API.

Every failure a user can cause (bad configuration, unreachable database, port in use,
unreadable key) ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

from .. import __version__
from .. import logging as rglog
from ..errors import ConfigError, ReplayGuardError
from ..settings import OPTION, OPTIONS, Settings, load_settings
from . import completion, demo, keys, ledger, operator, sinks

EXIT_CONFIG = 2
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2, like every start-up error."""

    def error(self, message: str) -> NoReturn:
        print(f"replayguard: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of ``settings.OPTIONS`` (flags a command defines itself are kept)."""
    parser.add_argument("--config", type=Path, help="TOML settings file (REPLAYGUARD_CONFIG)")
    for option in OPTIONS:
        if option.flag in parser._option_string_actions:
            continue
        help_text = f"{option.help} [{option.env}; default {option.default}]"
        if option.kind == "bool":
            parser.add_argument(*option.flags, dest=option.name, action="store_const", const="true",
                                help=help_text)
            continue
        parser.add_argument(*option.flags, dest=option.name, metavar=option.name.upper(),
                            action="append" if option.kind == "list" else "store", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="replayguard", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"replayguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (applies migrations first)")
    add_setting_flags(serve)

    migrate = sub.add_parser("migrate", help="apply migrations and exit")
    add_setting_flags(migrate)
    migrate.add_argument("--replace-unknown-functions", action="store_true",
                         help="give a stored function this build does not know (a newer release's, or a "
                              "developer's uncommitted edit) this build's version instead of refusing the "
                              "database; never against a database a newer release serves")

    token = sub.add_parser("token", help="manage API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token (names are unique among active tokens); "
                                  "prints it alone on stdout")
    add_setting_flags(create)
    create.add_argument("--role", required=True, choices=["callout", "hypervisor", "analyst", "admin", "witness"])
    create.add_argument("--name", required=True)
    create.add_argument("--vm", action="append", default=[], metavar="PATTERN",
                        help="bind a callout or hypervisor token to VMs whose vm_id matches this shell-style "
                             "pattern (repeatable); a decision, receipt or event for any other VM is 403")
    revoke = token_sub.add_parser("revoke", help="revoke the active token with this id or name")
    add_setting_flags(revoke)
    revoke.add_argument("ident", help="token id or name")
    listing = token_sub.add_parser("list", help="list tokens (never the tokens themselves)")
    add_setting_flags(listing)

    relay = sub.add_parser("relay", help="hypervisor relays: `replayguard relay libvirt|proxmox|vsphere --help`")
    relay.add_argument("relay_args", nargs=argparse.REMAINDER)
    relay.set_defaults(handler=cmd_relay)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """The subcommands the other modules of ``cli/`` define (demo, keys, ledger, operator
    commands, sinks, completion); each registers its own parser."""
    return [demo.register, keys.register, ledger.register, operator.register, sinks.register, completion.register]


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags = {key: value for key, value in vars(args).items() if key in OPTION}
    for name, value in flags.items():
        if isinstance(value, list):  # a repeatable flag: each value may list several, comma-separated
            flags[name] = ",".join(value)
    return load_settings(flags=flags, config_file=getattr(args, "config", None))


def _fail(message: str) -> int:
    print(f"replayguard: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        rglog.configure(settings.log_level)
        handler = getattr(args, "handler", None) or _HANDLERS[args.command]
        return int(handler(args, settings))
    except (ReplayGuardError, OSError) as exc:
        return _fail(_one_line(exc))
    except KeyboardInterrupt:
        return 130


def _one_line(exc: ReplayGuardError | OSError) -> str:
    """What a failure a user can cause says on stderr."""
    if isinstance(exc, ReplayGuardError):
        return exc.message
    where = f" ({exc.filename})" if exc.filename else ""  # a file or socket the command needed, not named by a check
    return f"{exc.strerror or type(exc).__name__}{where}"


# --- migrate, token -------------------------------------------------------------------

def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from ..pg import connections, schema
    from ..runtime import resolve_dsn

    async def run() -> int:
        dsn = resolve_dsn(settings)
        await connections.check_reachable(dsn)
        applied = await schema.migrate_dsn(dsn, replace_unknown_functions=args.replace_unknown_functions)
        await connections.warn_about_settings(dsn)
        print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""), file=sys.stderr)
        return 0

    return run_async(run())


def cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    """`replayguard relay libvirt|proxmox|vsphere …`: the relays' own entry point (``replayguard-relay``)."""
    from ..relay.cli import main as relay_main

    return relay_main(list(args.relay_args))


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from ..runtime import open_runtime

    async def run() -> int:
        async with open_runtime(settings) as runtime:
            if args.token_command == "create":  # noqa: S105 - a subcommand name, not a password
                _, token = await runtime.api_tokens.create(args.role, args.name, args.vm)
                print(token)
            elif args.token_command == "revoke":  # noqa: S105 - a subcommand name, not a password
                count = await runtime.api_tokens.revoke(args.ident)
                print(f"revoked {count} token(s)", file=sys.stderr)
            else:
                print("id\trole\tname\tstate\tvms")
                for row in await runtime.api_tokens.list():
                    state = "revoked" if row["revoked_at"] else "active"
                    vms = ",".join(cast("list[str]", row["vm_patterns"])) or "*"
                    print(f"{row['id']}\t{row['role']}\t{row['name']}\t{state}\t{vms}")
        return 0

    return run_async(run())


# --- serve ----------------------------------------------------------------------------

def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _serve_worker_process(settings: Settings, dsn: str, parent_pid: int, metrics_dir: Path) -> None:
    """One worker of ``serve --workers N`` (a spawned process): a failure a user can cause (its
    start refused: other keys on the database, ...) is one line on stderr and exit status 2."""
    try:
        _serve_worker(settings, dsn, reuse_port=True, parent_pid=parent_pid, metrics_dir=metrics_dir)
    except (ReplayGuardError, OSError) as exc:
        sys.exit(_fail(_one_line(exc)))
    except KeyboardInterrupt:
        sys.exit(130)


def _serve_worker(settings: Settings, dsn: str, reuse_port: bool, parent_pid: int | None = None,
                  metrics_dir: Path | None = None) -> None:
    from ..http.app import create_app
    from ..http.server import serve

    rglog.configure(settings.log_level)
    rglog.bridge_stdlib(settings.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = create_app(settings, dsn=dsn, metrics_dir=metrics_dir)
    asyncio.run(serve(app, settings, reuse_port=reuse_port, parent_pid=parent_pid))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from ..http.server import raise_fd_limit
    from ..keys import load_keys
    from ..pg.connections import warn_about_settings
    from ..runtime import prepare_database

    raise_fd_limit(settings)  # before the workers, who inherit it
    load_keys(settings)  # creates keys once, before workers race for them
    if settings.port == 0 and settings.workers > 1:
        raise ConfigError("port 0 (any free port) needs workers = 1: each worker would get its own port")
    _check_port(settings.host, settings.port)
    dsn = run_async(prepare_database(settings))
    run_async(warn_about_settings(dsn))  # serve and migrate say it; the one-shot commands keep stderr to one line
    log = rglog_logger()
    log.info("serving", host=settings.host, port=settings.port, workers=settings.workers,
             embedded=settings.embedded, redis=settings.redis_url is not None)
    if settings.workers == 1:
        _serve_worker(settings, dsn, reuse_port=False)
        return 0
    return _serve_many(settings, dsn)


def _serve_many(settings: Settings, dsn: str) -> int:
    """Runs the workers until they stop. A worker that exits with a failure (one refused at
    start says why in one line and exits 2) stops the others, and ``serve`` exits with its
    status, so a supervisor sees a failure, never a clean stop of a service that serves nothing.

    The workers share their metrics through a directory of this ``serve``'s own (0700, made
    empty here and removed when the workers have stopped: ``metrics_shared``)."""
    from ..metrics_shared import make_directory, remove_directory

    metrics_dir = make_directory()
    try:
        return _run_workers(settings, dsn, metrics_dir)
    finally:
        remove_directory(metrics_dir)


def _run_workers(settings: Settings, dsn: str, metrics_dir: Path) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_serve_worker_process, args=(settings, dsn, os.getpid(), metrics_dir), daemon=False)
             for _ in range(settings.workers)]
    for proc in procs:
        proc.start()
    stopping = False

    def stop_all() -> None:
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    running = list(procs)
    while running:
        multiprocessing.connection.wait([proc.sentinel for proc in running])
        for proc in [proc for proc in running if not proc.is_alive()]:
            running.remove(proc)
            proc.join()
            code = proc.exitcode or 0
            if code != 0 and not stopping and status == 0:
                status = code if code > 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says
                stop_all()
    return status


def rglog_logger() -> Any:
    import structlog

    return structlog.get_logger("replayguard")


_HANDLERS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "serve": cmd_serve,
    "migrate": cmd_migrate,
    "token": cmd_token,
}


if __name__ == "__main__":
    sys.exit(main())
