"""An HTTP client of a running replayguard service, for the operator's commands.

The URL comes from ``--url`` or ``REPLAYGUARD_URL`` (default ``http://127.0.0.1:8080``),
the token from ``--token-file``, ``REPLAYGUARD_TOKEN_FILE`` or ``REPLAYGUARD_TOKEN``. A
failed request becomes ``CommandFailed`` carrying the exit status it maps to (see
``cli/operator.py``). Standard library only (``urllib``): one request at a time, and the
alert stream read line by line.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def printable(value: object) -> str:
    """``value`` as one line of text, with every control or format character escaped."""
    text = "—" if value is None else str(value)
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


DEFAULT_URL = "http://127.0.0.1:8080"
ENV_VARIABLES = ("REPLAYGUARD_URL", "REPLAYGUARD_TOKEN", "REPLAYGUARD_TOKEN_FILE")
TIMEOUT_S = 30.0
FOLLOW_READ_TIMEOUT_S = 60.0  # the stream sends a heartbeat every sse_heartbeat_s (15 s by default)
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED, EXIT_NOT_FOUND, EXIT_REFUSED = range(7)


class CommandFailed(Exception):
    """A request that did not succeed, with the exit status it maps to."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = status


# --- HTTP -------------------------------------------------------------------------------

class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._token = token

    def _request(self, method: str, path: str, body: object = None,
                 headers: dict[str, str] | None = None) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)  # noqa: S310 - client_from_args accepts only http:// and https:// URLs

    def call(self, method: str, path: str, body: object = None, *, auth: bool = True) -> Any:
        request = self._request(method, path, body)
        if not auth:
            request.remove_header("Authorization")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:  # noqa: S310 - the operator's URL
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _failure(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CommandFailed(f"cannot reach {self.url}: {_reason(exc)}", EXIT_UNREACHABLE) from None
        except ValueError:  # http.client.InvalidURL: a URL check_url let through
            raise _bad_url(self.url) from None
        return _json(raw, self.url)

    def status_of(self, path: str) -> int:
        """The HTTP status of an unauthenticated GET (health and readiness)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=TIMEOUT_S) as resp:  # noqa: S310
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError) as exc:
            raise CommandFailed(f"cannot reach {self.url}: {_reason(exc)}", EXIT_UNREACHABLE) from None
        except ValueError:
            raise _bad_url(self.url) from None

    def events(self, last_id: str | None) -> Iterator[tuple[str | None, dict[str, Any] | None]]:
        """The alert stream's (id, alert) pairs until the connection ends; (id, None) for an
        event that only moves the position (the stream opens with one), where a reconnect
        resumes."""
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            resp = urllib.request.urlopen(self._request("GET", "/v1/alerts/stream", headers=headers),  # noqa: S310
                                          timeout=FOLLOW_READ_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise _failure(exc) from None
        except ValueError:
            raise _bad_url(self.url) from None
        with resp:
            event_id: str | None = None
            kind, data, has_id = "message", list[str](), False
            for raw in resp:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line == "":
                    if kind == "alert" and data:
                        yield event_id, _json("\n".join(data).encode(), self.url)
                    elif has_id:
                        yield event_id, None
                    kind, data, has_id = "message", [], False
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "id":
                    event_id, has_id = value, True
                elif name == "event":
                    kind = value
                elif name == "data":
                    data.append(value)


def _bad_url(url: str) -> CommandFailed:
    return CommandFailed(f"the service URL {printable(url)!r} is not a valid URL", EXIT_USAGE)


def _json(raw: bytes, url: str) -> Any:
    """The answer's JSON document; anything else (a proxy's or a portal's page) means the
    URL does not lead to a working replayguard service."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        raise CommandFailed(f"{url} did not answer with JSON: is it a replayguard service?",
                            EXIT_UNREACHABLE) from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return printable(reason if reason is not None else exc)


def _failure(exc: urllib.error.HTTPError) -> CommandFailed:
    try:
        message = json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = exc.reason
    text = f"{exc.code}: {printable(message)}"
    if exc.code in (401, 403):
        return CommandFailed(text, EXIT_DENIED)
    if exc.code == 404:
        return CommandFailed(text, EXIT_NOT_FOUND)
    if exc.code >= 500:
        return CommandFailed(text, EXIT_UNREACHABLE)
    return CommandFailed(text, EXIT_REFUSED)


def check_url(url: str) -> None:
    """Refuses (``ConfigError``, one line) a service URL the client could not use: another
    scheme, an unclosed IPv6 bracket, a port that is not a number, a missing host or one with
    a space or a control character."""
    shown = printable(url)
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError when not a number in range
    except ValueError:
        raise ConfigError(f"the service URL {shown!r} is not a valid URL (its host or port)") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"the service URL must be http:// or https://, not {shown!r}")
    host = parts.hostname or ""
    if not host or any(ch.isspace() or not ch.isprintable() for ch in host):
        raise ConfigError(f"the service URL {shown!r} has no valid host (http(s)://HOST[:PORT])")


def client_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> Client:
    """The URL and token from flags and the environment; a missing token is a usage error."""
    env = dict(os.environ) if env is None else env
    url = args.url or env.get("REPLAYGUARD_URL") or DEFAULT_URL
    check_url(url)
    token_file = args.token_file or env.get("REPLAYGUARD_TOKEN_FILE")
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"the token file {token_file} is not UTF-8 text") from None
    else:
        token = env.get("REPLAYGUARD_TOKEN", "").strip()
    if not token:
        raise ConfigError("set REPLAYGUARD_TOKEN (or REPLAYGUARD_TOKEN_FILE, --token-file) to an API token")
    if not (token.isascii() and token.isprintable() and " " not in token):  # it goes in a header; never echo it
        raise ConfigError("the API token must be one line of printable ASCII (a token file holds the token alone)")
    return Client(url, token)
