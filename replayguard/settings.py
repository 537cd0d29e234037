"""Settings: one frozen object built from flags, environment and an optional file.

Precedence, highest first: command-line flag, ``REPLAYGUARD_<NAME>`` environment
variable, the TOML file named by ``--config`` / ``REPLAYGUARD_CONFIG``, the default.
A secret may also come from ``REPLAYGUARD_<NAME>_FILE``. Validation happens here, once,
at start-up, and every problem is one ``ConfigError`` line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "REPLAYGUARD_"


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "replayguard"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: Secret | None = None
    redis_url: Secret | None = None
    data_dir: Path = field(default_factory=_default_data_dir)
    workers: int = 1
    log_level: str = "info"
    db_pool_size: int = 8
    statement_timeout_ms: int = 5000
    totp_drift_steps: int = 1
    hotp_look_ahead: int = 10
    lockout_threshold: int = 5
    lockout_period_s: int = 300
    nonce_max_ttl_s: int = 7 * 86400
    receipt_reaction: str = "flag"
    checkpoint_every: int = 1000
    checkpoint_interval_s: int = 60
    pepper_file: Path | None = None
    secret_key_file: Path | None = None
    receipt_key_file: Path | None = None
    signing_key_file: Path | None = None
    event_hmac_secret: Secret | None = None
    event_hmac_tolerance_s: int = 300
    sinks: tuple[str, ...] = ()
    max_connections: int = 1024
    max_sse_subscribers: int = 64
    idle_timeout_s: int = 15
    request_timeout_s: int = 30
    http_front: str = "fast"
    sse_heartbeat_s: int = 15
    webhook_secret: Secret | None = None
    witnesses: tuple[str, ...] = ()
    witness_required: bool = False
    witness_token: Secret | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def embedded(self) -> bool:
        """True when no database URL is set: the service runs its own PostgreSQL."""
        return self.database_url is None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_INT_RANGES: dict[str, tuple[int, int]] = {
    "port": (0, 65535),
    "workers": (1, 64),
    "db_pool_size": (3, 256),  # the appender and the token reader each keep one
    "statement_timeout_ms": (100, 600_000),
    "totp_drift_steps": (0, 10),
    "hotp_look_ahead": (1, 1000),
    "lockout_threshold": (1, 1000),
    "lockout_period_s": (1, 86400 * 30),
    "nonce_max_ttl_s": (1, 86400 * 365),
    "checkpoint_every": (1, 10_000_000),
    "checkpoint_interval_s": (1, 86400),
    "event_hmac_tolerance_s": (1, 86400),
    "max_connections": (1, 1_000_000),
    "max_sse_subscribers": (0, 100_000),
    "idle_timeout_s": (1, 3600),
    "request_timeout_s": (1, 3600),
    "sse_heartbeat_s": (1, 3600),
}


def _validate(s: Settings) -> None:
    for name, (low, high) in _INT_RANGES.items():
        value = getattr(s, name)
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    if s.receipt_reaction not in ("flag", "refuse"):
        raise ConfigError(f"receipt_reaction must be 'flag' or 'refuse', got {s.receipt_reaction!r}")
    if s.http_front not in ("fast", "aiohttp"):
        raise ConfigError(f"http_front must be 'fast' or 'aiohttp', got {s.http_front!r}")
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {s.log_level!r}")
    if s.database_url is not None:
        _check_url(s.database_url.reveal(), ("postgres", "postgresql"), "database_url")
    for spec in s.witnesses:
        if spec.startswith("file:"):
            if not spec.startswith("file:/"):
                raise ConfigError(f"witness {spec!r}: a file witness needs an absolute path (file:/…)")
        else:
            _check_url(spec, ("http", "https"), "witnesses")
    if s.redis_url is not None:
        _check_url(s.redis_url.reveal(), ("redis", "rediss", "unix"), "redis_url")


def _check_url(url: str, schemes: tuple[str, ...], name: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL: {exc}") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(Settings)}


def _coerce(name: str, raw: Any, type_name: str) -> Any:
    """Turns a raw value (string from env/flag, or a TOML value) into the field's type."""
    if raw is None:
        return None
    try:
        if "Secret" in type_name:
            return raw if isinstance(raw, Secret) else Secret(str(raw))
        if type_name.startswith("bool"):
            return _boolean(raw)
        if type_name.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError("a boolean is not a number")
            return int(raw)
        if "Path" in type_name:
            return Path(str(raw)).expanduser()
        if type_name.startswith("tuple"):
            if isinstance(raw, str):
                return tuple(part.strip() for part in raw.split(",") if part.strip())
            return tuple(str(item) for item in raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} has an invalid value") from None


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("not a boolean")
    return text in ("true", "1", "yes")


def _from_env(env: Mapping[str, str], types: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in types:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            out[name] = env[key]
        elif "Secret" in types[name] and env.get(key + "_FILE"):
            out[name] = Secret(_read_secret_file(Path(env[key + "_FILE"]), name))
    return out


def _read_secret_file(path: Path, name: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {name} file {path}: {exc.strerror}") from None


def _from_file(path: Path, types: dict[str, str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"config file {path} has unknown settings: {', '.join(unknown)}")
    return dict(data)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Builds the settings from flags, environment and file; raises ``ConfigError``."""
    env = os.environ if env is None else env
    types = _field_types()
    merged: dict[str, Any] = {}
    file_path = config_file or (Path(env["REPLAYGUARD_CONFIG"]) if env.get("REPLAYGUARD_CONFIG") else None)
    if file_path is not None:
        merged.update(_from_file(file_path, types))
    merged.update(_from_env(env, types))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None and k in types})
    values = {name: _coerce(name, raw, types[name]) for name, raw in merged.items()}
    return Settings(**values)
