"""Sink specs → validated ``SinkConfig``: the one place that knows the spec syntax.

Pure parsing, no I/O: ``file:/abs/path``, ``syslog+udp://h:p``, ``syslog+tcp://h:p?facility=f``,
``webhook:https://...`` and ``splunk+https://h:8088?token_file=/path`` (Splunk HTTP Event
Collector), each refused with a sentence an operator can act on. A ``file:`` or
``webhook:`` spec prefixed ``ecs+`` or ``ocsf+`` carries Elastic Common Schema documents
or OCSF Detection Findings instead of replayguard's own JSON (``core/siem.py``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from ..core.cef import FACILITIES
from ..settings import Secret

SinkKind = Literal["file", "syslog", "webhook", "splunk"]
SinkFormat = Literal["json", "ecs", "ocsf"]
SPLUNK_PATH = "/services/collector/event"

_USERINFO_RE = re.compile(r"//[^/?#]*@")
_ORIGIN_RE = re.compile(r"^[^/?#]*//[^/?#]*|^[^/?#]*")  # up to the end of the host (or of a scheme without one)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_PORTS = {"udp": 514, "tcp": 601}


@dataclass(frozen=True)
class SinkConfig:
    """One sink, validated. ``name`` names its spool files, so it must stay stable."""

    name: str
    kind: SinkKind
    path: Path | None = None
    transport: Literal["udp", "tcp"] | None = None
    host: str | None = None
    port: int | None = None
    facility: int = FACILITIES["authpriv"]
    url: str | None = None
    secret: Secret | None = None
    format: SinkFormat = "json"
    token_file: Path | None = None  # splunk: the HEC token, read when the sink starts
    index: str | None = None
    sourcetype: str = "replayguard:alert"

    def describe(self) -> str:
        """A log-safe target: webhook paths and queries often embed tokens, so only the origin."""
        prefix = "" if self.format == "json" else f"{self.format}+"
        if self.kind == "file":
            return f"{prefix}file:{self.path}"
        if self.kind == "syslog":
            return f"syslog+{self.transport}://{self.host}:{self.port}"
        parts = urlsplit(self.url or "")
        return f"{prefix}{self.kind}:{parts.scheme}://{parts.netloc}"


def parse_sink_spec(spec: str, *, secret: Secret | None = None, name: str | None = None) -> SinkConfig:
    """Parse ``file:/abs/path``, ``syslog+udp://h:p``, ``syslog+tcp://h:p?facility=f`` or
    ``webhook:https://...``; raise ValueError with a sentence an operator can act on."""
    spec = spec.strip()
    shown = _shown(spec)
    original = spec
    shape: SinkFormat = "json"
    for prefix in ("ecs+", "ocsf+"):
        if spec.startswith(prefix):
            shape = "ecs" if prefix == "ecs+" else "ocsf"
            spec = spec.removeprefix(prefix)
            if not spec.startswith(("file:", "webhook:")):
                raise ValueError(f"sink {shown!r}: {prefix} goes before file: or webhook:")
    if spec.startswith(("splunk+https://", "splunk+http://")):
        config = _parse_splunk(spec, shown)
    elif spec.startswith("file:"):
        config = _parse_file(spec.removeprefix("file:"))
    elif spec.startswith(("syslog+udp://", "syslog+tcp://")):
        config = _parse_syslog(spec, shown)
    elif spec.startswith("webhook:"):
        config = _parse_webhook(spec.removeprefix("webhook:"))
    elif spec.startswith("syslog:"):
        raise ValueError(f"sink {shown!r}: say syslog+udp:// or syslog+tcp://")
    else:
        raise ValueError(f"sink {shown!r}: expected file:, syslog+udp://, syslog+tcp://, webhook: or splunk+https://")
    if secret is not None and config.kind != "webhook":
        raise ValueError(f"sink {config.describe()}: only webhook sinks take a secret")
    default = f"{config.kind}-{hashlib.sha256(original.encode()).hexdigest()[:12]}"
    if name is not None and not _NAME_RE.fullmatch(name):
        raise ValueError(f"sink name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return replace(config, name=name or default, secret=secret, format=shape)


def _shown(spec: str) -> str:
    """The spec as error messages name it: like ``SinkConfig.describe()``, a file's path, or
    else the scheme and host alone, since a URL's password, path or query may hold a token."""
    if spec.removeprefix("ecs+").removeprefix("ocsf+").startswith("file:"):
        return spec
    match = _ORIGIN_RE.match(spec)
    origin = match.group(0) if match is not None else ""
    return _USERINFO_RE.sub("//***@", origin) + ("…" if len(origin) < len(spec) else "")


def parse_sink(value: str | Mapping[str, object]) -> SinkConfig:
    """A spec string, or a dict ``{"spec": ..., "secret": ..., "name": ...}`` from a config file."""
    if isinstance(value, str):
        return parse_sink_spec(value)
    unknown = set(value) - {"spec", "secret", "name"}
    spec, secret, name = value.get("spec"), value.get("secret"), value.get("name")
    if unknown or not isinstance(spec, str):
        raise ValueError(f"sink table needs a 'spec' string and only spec, secret, name; got {sorted(value)}")
    if secret is not None and not isinstance(secret, str | Secret):
        raise ValueError("sink secret must be a string")
    if name is not None and not isinstance(name, str):
        raise ValueError("sink name must be a string")
    wrapped = Secret(secret) if isinstance(secret, str) else secret
    return parse_sink_spec(spec, secret=wrapped, name=name)


def _parse_file(rest: str) -> SinkConfig:
    path = rest.removeprefix("//") if rest.startswith("///") else rest
    if not path:
        raise ValueError("sink 'file:': give an absolute path, e.g. file:/var/log/replayguard/alerts.jsonl")
    if not path.startswith("/"):
        raise ValueError(f"sink 'file:{rest}': the path must be absolute")
    if path.endswith("/"):
        raise ValueError(f"sink 'file:{rest}': the path names a directory, not a file")
    return SinkConfig(name="", kind="file", path=Path(path))


def _parse_syslog(spec: str, shown: str) -> SinkConfig:
    parts = urlsplit(spec)
    transport: Literal["udp", "tcp"] = "udp" if parts.scheme == "syslog+udp" else "tcp"
    port = _port(shown, parts.netloc) or DEFAULT_PORTS[transport]
    if not parts.hostname:
        raise ValueError(f"sink {shown!r}: a host is required, e.g. syslog+{transport}://127.0.0.1:514")
    if parts.path not in ("", "/") or parts.username or parts.password:
        raise ValueError(f"sink {shown!r}: only host, port and ?facility= are allowed")
    facility = FACILITIES["authpriv"]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "facility":
            raise ValueError(f"sink {shown!r}: unknown option {key!r} (only facility)")
        facility = _facility(shown, value)
    return SinkConfig(name="", kind="syslog", transport=transport, host=parts.hostname, port=port,
                      facility=facility)  # fmt: skip


def _facility(shown: str, value: str) -> int:
    if value in FACILITIES:
        return FACILITIES[value]
    if value.isdigit() and int(value) <= 23:
        return int(value)
    raise ValueError(f"sink {shown!r}: unknown facility {value!r} (e.g. authpriv, local0..local7, 0-23)")


def _parse_webhook(url: str) -> SinkConfig:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("sink 'webhook:…': give an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("sink 'webhook:…': credentials do not belong in the URL; pass a secret")
    _port("webhook:…", parts.netloc)
    return SinkConfig(name="", kind="webhook", url=url)


def _parse_splunk(spec: str, shown: str) -> SinkConfig:
    """``splunk+https://host:8088[/path]?token_file=/abs/path[&index=i][&sourcetype=s]``."""
    parts = urlsplit(spec.removeprefix("splunk+"))
    if not parts.hostname or parts.username or parts.password:
        raise ValueError(f"sink {shown!r}: give a host, and the token in a file (?token_file=/path), not the URL")
    _port(shown, parts.netloc)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - {"token_file", "index", "sourcetype"})
    if unknown:
        raise ValueError(f"sink {shown!r}: unknown option {unknown[0]!r} (token_file, index, sourcetype)")
    token_file = options.get("token_file", "")
    if not token_file.startswith("/"):
        raise ValueError(f"sink {shown!r}: ?token_file= must name the HEC token's file by absolute path")
    path = parts.path if parts.path not in ("", "/") else SPLUNK_PATH
    url = f"{parts.scheme}://{parts.netloc}{path}"
    return SinkConfig(name="", kind="splunk", url=url, token_file=Path(token_file),
                      index=options.get("index") or None,
                      sourcetype=options.get("sourcetype") or "replayguard:alert")


def _port(shown: str, netloc: str) -> int | None:
    """The explicit port of a URL's netloc, if any; 0 is refused rather than read as "default"."""
    try:
        port = urlsplit(f"//{netloc}").port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"sink {shown!r}: the port must be a number between 1 and 65535")
    return port
