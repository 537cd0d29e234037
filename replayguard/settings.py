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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url as redis_url_options

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
    """As root, /var/lib/replayguard (the embedded server's user must reach it); else XDG's."""
    if os.geteuid() == 0:
        return Path("/var/lib/replayguard")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "replayguard"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: Secret | None = None
    redis_url: Secret | None = None
    data_dir: Path = field(default_factory=_default_data_dir)
    embedded_shared_buffers_mb: int = 0
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


@dataclass(frozen=True)
class Option:
    """One setting: its flag, environment variable, TOML key, help, default and bounds."""

    name: str
    kind: str  # "str", "int", "bool", "path", "secret" or "list"
    default: str  # as the README and --help show it
    help: str
    bounds: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()
    alias: str | None = None  # a shorter flag, e.g. --witness for a repeatable list

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag,) if self.alias is None else (self.alias, self.flag)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# The one table of settings: flags, environment, TOML keys, help, validation and the
# README's table all come from it (tests/unit/test_settings.py compares them).
OPTIONS: tuple[Option, ...] = (
    Option("host", "str", "127.0.0.1", "address to listen on"),
    Option("port", "int", "8080", "port to listen on; 0 takes any free port (one worker only), named by the "
           "`listening` log line", bounds=(0, 65535)),
    Option("database_url", "secret", "(none: embedded PostgreSQL under data_dir/pg)",
           "PostgreSQL URL; without it the service runs its embedded PostgreSQL"),
    Option("redis_url", "secret", "(none)", "Redis for the alert fan-out between instances (never part of a decision)"),
    Option("data_dir", "path", "~/.local/share/replayguard (root: /var/lib/replayguard)",
           "keys, embedded database, outbox; token create, migrate and ledger need the same one as serve"),
    Option("embedded_shared_buffers_mb", "int", "0", "the embedded PostgreSQL's shared buffers, set when it "
           "starts; 0: a quarter of the memory (the cgroup's limit when lower), between 128 and 2048",
           bounds=(0, 1_048_576)),
    Option("workers", "int", "1", "worker processes sharing the port (SO_REUSEPORT); a worker whose "
           "parent was killed hard exits within a second; one that fails (at start: one line) stops the "
           "others and serve exits with its status; /metrics counts them all, whichever answers",
           bounds=(1, 64)),
    Option("log_level", "str", "info", "JSON log lines on stderr, each with the request id, route and "
           "caller token id; routine lines batched at least every 50 ms, warnings and errors at once",
           choices=("debug", "info", "warning", "error")),
    Option("db_pool_size", "int", "8", "connections per worker (the group-commit appender and the "
           "token reader each keep one; beside the pool, the alert feed has one of its own, and the "
           "chain check's child process, on the worker that signs checkpoints, one more)", bounds=(3, 256)),
    Option("statement_timeout_ms", "int", "5000", "every statement is cancelled after this (then 503); a call or a "
           "connection attempt with no answer a second later fails on the client (a half-open connection)",
           bounds=(100, 600_000)),
    Option("totp_drift_steps", "int", "1", "TOTP steps accepted either side of now", bounds=(0, 10)),
    Option("hotp_look_ahead", "int", "10", "HOTP counters searched ahead", bounds=(1, 1000)),
    Option("lockout_threshold", "int", "5", "consecutive invalid codes that lock a principal "
           "(RFC 4226 section 7.3)", bounds=(1, 1000)),
    Option("lockout_period_s", "int", "300", "how long a lockout lasts", bounds=(1, 86400 * 30)),
    Option("nonce_max_ttl_s", "int", "604800", "largest nonce ttl; the validity of a nonce without issued_at; "
           "how long an OTP code's use row is kept", bounds=(1, 86400 * 365)),
    Option("receipt_reaction", "str", "flag", "flag, or refuse: reject every decision of a VM rolled back "
           "or cloned (reported by the hypervisor, or shown by a stale or foreign receipt) until an admin "
           "clears it", choices=("flag", "refuse")),
    Option("checkpoint_every", "int", "1000", "ledger entries between signed checkpoints",
           bounds=(1, 10_000_000)),
    Option("checkpoint_interval_s", "int", "60", "seconds between signed checkpoints", bounds=(1, 86400)),
    Option("pepper_file", "path", "data_dir/keys/pepper.key", "key file of the credential digests"),
    Option("secret_key_file", "path", "data_dir/keys/secret.key", "key file encrypting token secrets"),
    Option("receipt_key_file", "path", "data_dir/keys/receipt.key", "key file of the receipts' MAC"),
    Option("signing_key_file", "path", "data_dir/keys/signing.key", "key file signing checkpoints"),
    Option("event_hmac_secret", "secret", "(none)", "require hypervisor events signed with this key"),
    Option("event_hmac_tolerance_s", "int", "300", "how old a signed event's timestamp may be",
           bounds=(1, 86400)),
    Option("sinks", "list", "(none)", "alert sinks, comma-separated or repeated: file:PATH, "
           "syslog+udp://H:P, syslog+tcp://H:P, webhook:URL, splunk+https://H:P?token_file=F; "
           "ecs+ or ocsf+ before file: or webhook: for ECS or OCSF"),
    Option("webhook_secret", "secret", "(none)", "key signing the requests of webhook: sinks"),
    Option("max_connections", "int", "1024", "open connections cap per worker (over it: 503); it, "
           "db_pool_size and 64 must fit under the open-files limit, whose soft value serve raises to the hard "
           "one (else start-up stops)", bounds=(1, 1_000_000)),
    Option("max_sse_subscribers", "int", "64", "alert stream subscribers cap (over it: 503)",
           bounds=(0, 100_000)),
    Option("idle_timeout_s", "int", "15", "idle keep-alive and slow-header cut-off", bounds=(1, 3600)),
    Option("request_timeout_s", "int", "30", "body read deadline (then 408)", bounds=(1, 3600)),
    Option("http_front", "str", "fast", "who answers the decision routes: fast (a small httptools front, "
           "about a quarter less CPU per decision) or aiohttp", choices=("fast", "aiohttp")),
    Option("sse_heartbeat_s", "int", "15", "heartbeat comment on the alert stream", bounds=(1, 3600)),
    Option("witnesses", "list", "(none)", "where every signed checkpoint is also held, comma-separated or "
           "repeated: file:/PATH (storage the database does not share) or another deployment's "
           "https://HOST[:PORT] (its /v1/witness/ID is appended)", alias="--witness"),
    Option("witness_required", "bool", "false", "refuse decisions while a witness cannot be reached "
           "(else an unreachable witness raises witness_unreachable and decisions go on); needs witnesses"),
    Option("witness_token", "secret", "(none)", "bearer token (role witness) for the HTTP witnesses"),
)
OPTION = {option.name: option for option in OPTIONS}

# REPLAYGUARD_* variables that are not service settings: the CLI's client side, the relays'
# own settings, and the test suite's and benchmarks' knobs.
OTHER_ENV = frozenset({"REPLAYGUARD_CONFIG", "REPLAYGUARD_URL", "REPLAYGUARD_TOKEN", "REPLAYGUARD_TOKEN_FILE",
                       "REPLAYGUARD_KEEP_FUZZ_LOG", "REPLAYGUARD_CHROMIUM", "REPLAYGUARD_UPDATE_DOCS_IMG"})
OTHER_ENV_PREFIXES = ("REPLAYGUARD_RELAY_", "REPLAYGUARD_TEST_", "REPLAYGUARD_BENCH_")
# Secrets that key a MAC or a bearer check: an empty one (a *_FILE created but never
# filled, or REPLAYGUARD_<NAME>= with nothing after it) would be a key everybody knows, or
# silently none, so it stops start-up instead.
KEYS_NEVER_EMPTY = frozenset({"event_hmac_secret", "webhook_secret", "witness_token"})


def _validate(s: Settings) -> None:
    for option in OPTIONS:
        value = getattr(s, option.name)
        if option.bounds is not None and not option.bounds[0] <= value <= option.bounds[1]:
            low, high = option.bounds
            raise ConfigError(f"{option.name} must be between {low} and {high}, got {value}")
        if option.choices and value not in option.choices:
            raise ConfigError(f"{option.name} must be one of {', '.join(option.choices)}, got {value!r}")
        if option.name in KEYS_NEVER_EMPTY and value is not None and not value.reveal().strip():
            raise ConfigError(f"{option.name} is empty: set a key, or unset it")
    if s.witness_required and not s.witnesses:
        raise ConfigError("witness_required is set but no witnesses are: name the witnesses, or unset witness_required")
    if s.database_url is not None:
        _check_url(s.database_url.reveal(), ("postgres", "postgresql"), "database_url")
        if s.embedded_shared_buffers_mb:
            raise ConfigError("embedded_shared_buffers_mb sizes the embedded PostgreSQL, and database_url names "
                              "another server: set one of them")
    for spec in s.witnesses:
        if spec.startswith("file:"):
            if not spec.startswith("file:/"):
                raise ConfigError(f"witness {spec!r}: a file witness needs an absolute path (file:/…)")
        else:
            _check_witness_url(spec)
    if s.redis_url is not None:
        _check_url(s.redis_url.reveal(), ("redis", "rediss", "unix"), "redis_url")
        try:  # its query options, as the client will read them (the message names the option, never the URL)
            redis_url_options(s.redis_url.reveal())
        except ValueError as exc:
            raise ConfigError(f"redis_url: {exc}") from None
    _check_sinks(s)


def _check_sinks(s: Settings) -> None:
    from .sinks.config import parse_sink_spec

    for spec in s.sinks:
        try:
            parse_sink_spec(spec, secret=s.webhook_secret if spec.strip().startswith("webhook:") else None)
        except ValueError as exc:
            raise ConfigError(f"sinks: {exc}") from None


def markdown_table() -> str:
    """The README's settings table, made from ``OPTIONS``."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for o in OPTIONS:
        extra = f" (one of {', '.join(o.choices)})" if o.choices else ""
        extra += f" ({o.bounds[0]} to {o.bounds[1]})" if o.bounds else ""
        extra += f"; also `{o.env}_FILE`" if o.kind == "secret" else ""
        rows.append(f"| `{o.name}` | `{o.default}` | {o.help}{extra} |")
    return "\n".join(rows) + "\n"


def _check_url(url: str, schemes: tuple[str, ...], name: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:  # its message quotes the URL's text, where a password may be
        raise ConfigError(f"{name} is not a valid URL (a character such as / # ? @ in its password must be"
                          " percent-encoded)") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")


def _check_witness_url(spec: str) -> None:
    """An HTTP witness is named by its URL in /metrics, logs and alerts, so the URL holds no
    credentials (the bearer token is ``witness_token``), no query and no fragment."""
    _check_url(spec, ("http", "https"), "witnesses")
    parts = urlsplit(spec)
    if "@" in parts.netloc:  # the message never shows the URL: a password may be in it
        raise ConfigError("witnesses: credentials do not belong in a witness URL (it names the witness in "
                          "metrics, logs and alerts): use witness_token")
    if not parts.hostname:
        raise ConfigError("witnesses: a witness URL needs a host (http(s)://HOST[:PORT])")
    if parts.query or parts.fragment or spec.rstrip().endswith(("?", "#")):
        raise ConfigError(f"witnesses: a witness URL takes no query or fragment: {parts.scheme}://{parts.netloc}"
                          f"{parts.path}")


def _coerce(option: Option, raw: Any) -> Any:
    """Turns a raw value (a string from a flag or the environment, or a TOML value) into the setting's type."""
    if raw is None:
        return None
    try:
        if option.kind == "secret":
            return raw if isinstance(raw, Secret) else Secret(str(raw))
        if option.kind == "int":
            if isinstance(raw, (bool, float)):
                raise ValueError("not an integer")
            return int(raw)
        if option.kind == "bool":
            return _boolean(raw)
        if option.kind == "path":
            return _path(str(raw))
        if option.kind == "list":
            items = [raw] if isinstance(raw, str) else list(raw)
            if any(not isinstance(item, str) for item in items):
                raise ValueError("not a list of strings")
            return tuple(part.strip() for item in items for part in _split(item, raw) if part.strip())
        if not isinstance(raw, str):
            raise ValueError("not a string")
        return raw
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: expanduser of ~unknownuser
        raise ConfigError(f"{option.name} has an invalid value") from None


def _path(text: str) -> Path:
    """A path setting, ``~`` expanded; a NUL character (no file name holds one) is refused."""
    if "\0" in text:
        raise ValueError("a NUL character in a path")
    return Path(text).expanduser()


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("not a boolean")
    return text in ("true", "1", "yes")


def _split(item: str, raw: Any) -> list[str]:
    """A string (flag, environment) lists items comma-separated; a TOML list holds them whole."""
    return item.split(",") if isinstance(raw, str) else [item]


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], list[Path]]:
    """Settings from ``REPLAYGUARD_*`` (and secrets' ``*_FILE``); an unknown name is an error."""
    known = {o.env: o for o in OPTIONS}
    files = {o.env + "_FILE": o for o in OPTIONS if o.kind == "secret"}
    out: dict[str, Any] = {}
    secret_files: list[Path] = []
    for key in sorted(k for k in env if k.startswith(ENV_PREFIX)):
        if key in known:
            if env[key] == "" and known[key].name in KEYS_NEVER_EMPTY:  # e.g. an unset shell variable expanded
                raise ConfigError(f"{key} is set but empty: set a key, or unset it")
            if env[key] != "":
                out[known[key].name] = env[key]
        elif key in files:
            option = files[key]
            if env[key] and option.name not in out and env.get(option.env, "") == "":
                path = Path(env[key])
                secret_files.append(path)
                out[option.name] = Secret(_read_secret_file(path, option.name))
        elif key not in OTHER_ENV and not key.startswith(OTHER_ENV_PREFIXES):
            raise ConfigError(f"unknown environment variable {key}: settings are "
                              f"{ENV_PREFIX}<NAME> with a name of 'replayguard serve --help'"
                              " (unset it or fix its name)")
    return out, secret_files


def _read_secret_file(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {name} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name} file {path} is not UTF-8 text") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (TOML is)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(OPTION))
    if unknown:
        raise ConfigError(f"config file {path} has unknown settings: {', '.join(unknown)}")
    return dict(data)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Builds the settings from flags, environment and file; raises ``ConfigError``.

    A secret read from a ``*_FILE``, and a config file that holds a secret, must pass the
    key-file rule (``replayguard.private_files``) once the data dir is known.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    file_path = config_file or (Path(env["REPLAYGUARD_CONFIG"]) if env.get("REPLAYGUARD_CONFIG") else None)
    from_file: dict[str, Any] = {}
    if file_path is not None:
        from_file = _from_file(file_path)
        merged.update(from_file)
    from_env, secret_files = _from_env(env)
    merged.update(from_env)
    merged.update({k: v for k, v in (flags or {}).items() if v is not None and k in OPTION})
    settings = Settings(**{name: _coerce(OPTION[name], raw) for name, raw in merged.items()})
    from .private_files import check_private_file

    for path in secret_files:
        check_private_file(path, "secret file", data_dir=settings.data_dir)
    if file_path is not None and any(OPTION[name].kind == "secret" for name in from_file):
        check_private_file(file_path, "config file with secrets", data_dir=settings.data_dir)
    return settings


if __name__ == "__main__":
    print(markdown_table(), end="")
