"""What every relay's command line shares: flags or ``REPLAYGUARD_RELAY_<FLAG>``, the
hypervisor token and the event signing secret from files or the environment (never
printed), the spool directory's checks, and JSON logs on stderr.

Every problem is a ``ConfigError``, which each relay's ``main`` prints as one line on
stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import structlog

from ..errors import ConfigError
from ..settings import Secret
from .spool import private_dir

ENV_PREFIX = "REPLAYGUARD_RELAY_"


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def add_secret_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--event-hmac-secret-file",
                        help="file holding the service's event_hmac_secret: every event is signed with it")


def pick(flag: str | None, env: Mapping[str, str], name: str) -> str | None:
    """The flag if given, else ``REPLAYGUARD_RELAY_<NAME>``, else None."""
    if flag is not None:
        return flag
    return env.get(ENV_PREFIX + name.upper().replace("-", "_")) or None


def required(value: str | None, name: str) -> str:
    if value is None or not value.strip():
        env = ENV_PREFIX + name.upper().replace("-", "_")
        raise ConfigError(f"--{name} is required (or set {env})", field=name)
    return value.strip()


def checked_service_url(value: str, flag: str = "--service-url") -> str:
    """An http(s) URL with a host, no user or password, and no query or fragment, as
    given; anything else is a ConfigError that does not repeat the URL: the relays log
    their URLs, they authenticate with tokens (never a URL's userinfo or a query's key),
    a malformed URL may still hold a password, and a query or fragment would end up in
    front of the path the relay appends (``/v1/hypervisor/events?...``, ``/api2/json``)."""
    field = flag.lstrip("-")
    try:
        parts = urlsplit(value)
    except ValueError:  # an unbalanced [ of an IPv6 host
        raise ConfigError(f"{flag} is not a URL", field=field) from None
    if parts.username is not None or parts.password is not None or "@" in value:
        raise ConfigError(f"{flag} must not hold a user or password (the URL is not repeated here):"
                          " the relay authenticates with its token file", field=field)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag} must be an http(s) URL with a host, such as https://replayguard.example:8080"
                          " (the value is not repeated here)", field=field)
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ConfigError(f"{flag} must not hold a query or fragment (the URL is not repeated here):"
                          " the relay appends the endpoint's path to it", field=field)
    return value


def read_token(token_file: str | None, env: Mapping[str, str]) -> Secret:
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
