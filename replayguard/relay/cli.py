"""``replayguard-relay libvirt|proxmox|vsphere ...``: the one entry point of the relays.

``libvirt``'s flags are parsed here (flags and environment → ``RelayConfig`` → the relay);
``proxmox`` and ``vsphere`` hand the rest of the command line to their modules' ``main``
(``replayguard relay …`` comes here too). Every flag also reads ``REPLAYGUARD_RELAY_<FLAG>``;
the token comes from a file (``--token-file``) or from ``REPLAYGUARD_RELAY_TOKEN`` and is
never printed; so does the event signing secret (``--event-hmac-secret-file`` or
``REPLAYGUARD_RELAY_EVENT_HMAC_SECRET``), the service's ``event_hmac_secret``, which every
relay must be given when the service has one (``options.py``, shared by the three). A bad
configuration is one line on stderr and exit status 2, never a traceback, so a service
manager's log says what to fix.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError
from . import proxmox, vsphere
from .libvirt_relay import RelayConfig, run_relay
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

PROG = "replayguard-relay"
# The relays that parse their own command lines; libvirt's is parsed here.
OTHER_RELAYS: dict[str, Callable[[list[str]], int]] = {"proxmox": proxmox.main, "vsphere": vsphere.main}


def _parser() -> Parser:
    parser = Parser(prog=PROG, description="Relay hypervisor events to replayguard "
                    "(proxmox and vsphere: `replayguard-relay proxmox|vsphere --help`).")
    sub = parser.add_subparsers(dest="hypervisor", parser_class=Parser)
    lv = sub.add_parser("libvirt", help="watch a libvirt connection")
    lv.add_argument("--uri", help="libvirt URI, e.g. qemu:///system")
    lv.add_argument("--service-url", help="replayguard base URL, e.g. http://127.0.0.1:8080")
    lv.add_argument("--token-file", help="file holding a token of role hypervisor")
    lv.add_argument("--spool-dir", help="directory of events not yet acknowledged")
    lv.add_argument("--poll-interval", help="seconds between snapshot polls (default 5)")
    lv.add_argument("--host", help="host name reported in events (default: this machine's)")
    add_secret_flag(lv)
    return parser


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


def load_config(argv: Sequence[str], env: Mapping[str, str], default_host: str) -> RelayConfig:
    """Build and validate the relay's configuration; every problem is a ConfigError."""
    args = _parser().parse_args(list(argv))
    if args.hypervisor != "libvirt":
        raise ConfigError("choose a hypervisor: replayguard-relay libvirt|proxmox|vsphere ...")
    host = pick(args.host, env, "host") or default_host
    if not host.isprintable() or len(host) > 128:
        raise ConfigError("--host must be printable and at most 128 characters", field="host")
    return RelayConfig(
        uri=required(pick(args.uri, env, "uri"), "uri"),
        service_url=checked_service_url(required(pick(args.service_url, env, "service-url"), "service-url")),
        token=read_token(pick(args.token_file, env, "token-file"), env),
        spool_dir=Path(required(pick(args.spool_dir, env, "spool-dir"), "spool-dir")),
        poll_interval=_poll_interval(pick(args.poll_interval, env, "poll-interval")),
        host=host,
        event_secret=event_secret(pick(args.event_hmac_secret_file, env, "event-hmac-secret-file"), env),
    )


async def _serve(config: RelayConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_relay(config, stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``replayguard-relay``; returns the process exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in OTHER_RELAYS:
        return OTHER_RELAYS[args[0]](args[1:])
    try:
        config = load_config(args, os.environ, socket.gethostname())
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
