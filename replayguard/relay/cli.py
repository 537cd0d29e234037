"""``replayguard-relay libvirt ...``: flags and environment → ``RelayConfig`` → the relay.

Every flag also reads ``REPLAYGUARD_RELAY_<FLAG>``; the token comes from a file
(``--token-file``) or from ``REPLAYGUARD_RELAY_TOKEN`` and is never printed; so does the
event signing secret (``--event-hmac-secret-file`` or ``REPLAYGUARD_RELAY_EVENT_HMAC_SECRET``),
the service's ``event_hmac_secret``, which every relay must be given when the service has one. A bad
configuration is one line on stderr and exit status 2, never a traceback, so a service
manager's log says what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import structlog

from ..errors import ConfigError
from ..settings import Secret
from .libvirt_relay import RelayConfig, run_relay
from .spool import private_dir

ENV_PREFIX = "REPLAYGUARD_RELAY_"
PROG = "replayguard-relay"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Relay hypervisor events to replayguard.")
    sub = parser.add_subparsers(dest="hypervisor", parser_class=_Parser)
    lv = sub.add_parser("libvirt", help="watch a libvirt connection")
    lv.add_argument("--uri", help="libvirt URI, e.g. qemu:///system")
    lv.add_argument("--service-url", help="replayguard base URL, e.g. http://127.0.0.1:8080")
    lv.add_argument("--token-file", help="file holding a token of role hypervisor")
    lv.add_argument("--spool-dir", help="directory of events not yet acknowledged")
    lv.add_argument("--poll-interval", help="seconds between snapshot polls (default 5)")
    lv.add_argument("--host", help="host name reported in events (default: this machine's)")
    add_secret_flag(lv)
    return parser


def add_secret_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--event-hmac-secret-file",
                        help="file holding the service's event_hmac_secret: every event is signed with it")


def _pick(flag: str | None, env: Mapping[str, str], name: str) -> str | None:
    """The flag if given, else ``REPLAYGUARD_RELAY_<NAME>``, else None."""
    if flag is not None:
        return flag
    return env.get(ENV_PREFIX + name.upper().replace("-", "_")) or None


def _required(value: str | None, name: str) -> str:
    if value is None or not value.strip():
        env = ENV_PREFIX + name.upper().replace("-", "_")
        raise ConfigError(f"--{name} is required (or set {env})", field=name)
    return value.strip()


def _service_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--service-url must be an http(s) URL, got {value!r}", field="service-url")
    return value


def _poll_interval(value: str | None) -> float:
    if value is None:
        return 5.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 3600):
        raise ConfigError(
            f"--poll-interval must be seconds in (0, 3600], got {value!r}", field="poll-interval"
        )
    return seconds


def _token(token_file: str | None, env: Mapping[str, str]) -> Secret:
    """The hypervisor token, from the file when one is named, else from the environment."""
    if token_file is not None:
        try:
            value = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read --token-file {token_file}: {exc.strerror}", field="token-file"
            ) from exc
        except UnicodeDecodeError as exc:  # its message would quote token bytes
            raise ConfigError(f"--token-file {token_file} is not UTF-8", field="token-file") from exc
        if not value:
            raise ConfigError(f"--token-file {token_file} is empty", field="token-file")
        return Secret(value)
    value = env.get(ENV_PREFIX + "TOKEN", "").strip()
    if not value:
        raise ConfigError(
            f"no token: give --token-file or set {ENV_PREFIX}TOKEN_FILE or {ENV_PREFIX}TOKEN",
            field="token-file",
        )
    return Secret(value)


def event_secret(secret_file: str | None, env: Mapping[str, str]) -> Secret | None:
    """The event HMAC secret, from the file when one is named, else the environment, else None."""
    if secret_file is not None:
        try:
            value = Path(secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --event-hmac-secret-file {secret_file}: {type(exc).__name__}",
                              field="event-hmac-secret-file") from exc
        if not value:
            raise ConfigError(f"--event-hmac-secret-file {secret_file} is empty", field="event-hmac-secret-file")
        return Secret(value)
    value = env.get(ENV_PREFIX + "EVENT_HMAC_SECRET", "").strip()
    return Secret(value) if value else None


def load_config(argv: Sequence[str], env: Mapping[str, str], default_host: str) -> RelayConfig:
    """Build and validate the relay's configuration; every problem is a ConfigError."""
    args = _parser().parse_args(list(argv))
    if args.hypervisor != "libvirt":
        raise ConfigError("choose a hypervisor: replayguard-relay libvirt --uri URI ...")
    host = _pick(args.host, env, "host") or default_host
    if not host.isprintable() or len(host) > 128:
        raise ConfigError("--host must be printable and at most 128 characters", field="host")
    return RelayConfig(
        uri=_required(_pick(args.uri, env, "uri"), "uri"),
        service_url=_service_url(_required(_pick(args.service_url, env, "service-url"), "service-url")),
        token=_token(_pick(args.token_file, env, "token-file"), env),
        spool_dir=Path(_required(_pick(args.spool_dir, env, "spool-dir"), "spool-dir")),
        poll_interval=_poll_interval(_pick(args.poll_interval, env, "poll-interval")),
        host=host,
        event_secret=event_secret(_pick(args.event_hmac_secret_file, env, "event-hmac-secret-file"), env),
    )


def prepare_spool(spool_dir: Path) -> None:
    """Create the spool directory (0700), or refuse one that is not this user's alone."""
    private_dir(spool_dir)
    private_dir(spool_dir / "dead", "--spool-dir's dead/")
    if not os.access(spool_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--spool-dir {spool_dir} is not a writable directory", field="spool-dir")


def configure_logging() -> None:
    """JSON lines on stderr, once per process."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


async def _serve(config: RelayConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_relay(config, stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``replayguard-relay``; returns the process exit status."""
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ, socket.gethostname())
        prepare_spool(config.spool_dir)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    configure_logging()
    asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
