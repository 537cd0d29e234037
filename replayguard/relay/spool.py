"""The relays' durable spool and its delivery to the service, shared by every hypervisor.

A relay writes each event to the spool directory (one JSON file per event, tmp + fsync +
rename) before anything is sent, so a dead service or a ``kill -9`` delays an event but
never loses it, and re-posting it is idempotent on the service side. Delivery drains the
spool oldest first: a 2xx or 409 removes the file; a 401, 403 or 413 (a wrong token, a
missing or wrong event signature, a body the service will not take), a redirect, a 404 or
a 405 (a ``--service-url`` that does not reach the events endpoint: the service itself
never answers it so) keeps it, logged as an error, because the fix is the operator's and
the event must still arrive afterwards; any other 4xx with the service's error body
parks it in ``dead/`` (bounded: the oldest letters go first, each drop logged), and one
without it (a proxy between relay and service: TLS or a client certificate it wants) is
kept like a wrong URL, since only the service can say that resending cannot help; anything
else keeps it and backs off. A 403
(a token bound to other VMs than this event's) or a 413 refuses that one event: the
events behind it are still sent, out of order, as the service allows. A run with an end
(``drain(..., set_aside=True)``: a Proxmox ``--once`` run, which would otherwise report
the same refusal as unfinished work at every run) moves such an event to ``dead/`` once
its attempts are spent, logged ``event_set_aside``.

The spool directory and ``dead/`` are the relay's alone: created 0700, and refused when
another user owns them, they are writable by group or others, or they are symlinks,
since anyone who can drop a file there can have the relay deliver a forged revert with
its token. Every write goes to a fresh ``O_EXCL | O_NOFOLLOW`` temp file in the same
directory, then is renamed over the target, so a planted symlink is never followed.

When ``secret`` is given, every POST is signed as ``core.signatures`` documents
(``X-Replayguard-Timestamp`` and ``X-Replayguard-Signature: v1=…`` over the raw body, with
the time of sending), the scheme the service checks when ``event_hmac_secret`` is set.

Records are keyed generically: ``id_key`` names the field that holds a record's id
(``event_id`` in the native JSON, ``upid`` for Proxmox tasks, ``id`` for CloudEvents).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import structlog

from ..core.signatures import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from ..durable import atomic_write, fsync_dir
from ..errors import ConfigError
from ..settings import Secret

DEFAULT_ID_KEY = "event_id"  # the id field of the service's native event JSON
DEAD_MAX = 1000  # letters kept in dead/; with bodies under 64 KiB, at most ~64 MB
REFUSED_STATUSES = (401, 403, 404, 405, 413)  # and every 3xx: redirects are not followed
PER_EVENT_REFUSALS = (403, 413)  # refusals of one event: the events behind it are still sent

log = structlog.get_logger("replayguard.relay.spool")


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx, or 409: the service already holds this id
    RETRY = "retry"  # service down, 5xx, 408, 429: keep the event and back off
    REFUSED = "refused"  # 3xx, 401, 403, 404, 405, 413, a 4xx not from the service: the operator's; keep
    DEAD = "dead"  # any other answer of the service: retrying cannot help, park it in dead/


# ---------------------------------------------------------------- pure: answers and backoff


def backoff_delay(attempt: int, rand: float, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with jitter in [ceiling/2, ceiling), ceiling capped at ``cap``.

    ``rand`` is a number in [0, 1) so the schedule is testable; jitter keeps many relays
    from hammering a recovering service in step.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * min(max(rand, 0.0), 1.0))


def classify_status(status: int | None) -> Outcome:
    """What an HTTP answer (None: no answer at all) means for a spooled event."""
    if status is None or status in (408, 429) or status >= 500:
        return Outcome.RETRY
    if 200 <= status < 300 or status == 409:
        return Outcome.DELIVERED
    if status in REFUSED_STATUSES or 300 <= status < 400:
        return Outcome.REFUSED
    return Outcome.DEAD


def settle(answer: Answer) -> Outcome:
    """What an answer means for a spooled event: ``classify_status``, except that a
    rejection parks the event only when the service made it (its error body, CONTRACT §3);
    the same status from a proxy in front of it is the operator's to fix: kept."""
    outcome = classify_status(answer.status)
    if outcome is Outcome.DEAD and not from_service(answer.body):
        return Outcome.REFUSED
    return outcome


def from_service(body: Any) -> bool:
    """Whether an answer's body is a service error body: ``{"error": {"code": ...}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("code"), str)


# ---------------------------------------------------------------- the spool


def private_dir(path: Path, what: str = "--spool-dir") -> None:
    """Create ``path`` 0700, or check that an existing one is this user's alone.

    Raises ``ConfigError`` (one line, naming the fix) for a symlink, a non-directory, a
    directory owned by another user, or one writable by group or others.
    """
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}", field=what.lstrip("-")) from exc
    st = os.lstat(path)
    problem = _dir_problem(st, os.geteuid())
    if problem is not None:
        raise ConfigError(f"{what} {path} {problem}", field=what.lstrip("-"))


def _dir_problem(st: os.stat_result, uid: int) -> str | None:
    """Why a directory with this ``lstat`` may not hold a relay's spool, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink: name the real directory"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this relay's user (uid {uid}): chown it or choose another"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 0700 it"
    return None


class Spool:
    """A directory of events waiting for the service: ``evt-<ns>-<hash>.json``, oldest first."""

    def __init__(self, root: Path, dead_max: int = DEAD_MAX) -> None:
        self.root = root
        self.dead = root / "dead"
        self.dead_max = dead_max
        self.dead_dropped = 0  # letters removed from dead/ by this process to respect dead_max
        private_dir(root)
        private_dir(self.dead, "--spool-dir's dead/")
        for leftover in root.glob(".*.tmp"):  # half-written by a crash: never renamed
            leftover.unlink(missing_ok=True)

    def put(self, body: Mapping[str, Any], id_key: str = DEFAULT_ID_KEY) -> Path:
        """Spool a JSON object whose id is ``body[id_key]``."""
        return self.put_bytes(str(body[id_key]), orjson.dumps(body))

    def put_bytes(self, key: str, data: bytes) -> Path:
        """Spool an already serialised body; ``key`` (its id) only names the file.

        An id already waiting in the spool is not spooled twice: the waiting file is kept.
        """
        digest = _digest(key)
        waiting = sorted(self.root.glob(f"evt-*-{digest}.json"))
        if waiting:
            return waiting[0]
        path = self.root / f"evt-{time.time_ns():020d}-{digest}.json"
        atomic_write(path, data)
        return path

    def set_aside(self, key: str, data: bytes) -> Path:
        """Write a body the service cannot take straight to dead/ (as ``bury`` would leave it)."""
        path = self.dead / f"evt-{time.time_ns():020d}-{_digest(key)}.json"
        atomic_write(path, data)
        self._bound_dead()
        fsync_dir(self.dead)
        return path

    def pending(self) -> list[Path]:
        return sorted(self.root.glob("evt-*.json"))

    def dead_letters(self) -> list[Path]:
        return sorted(self.dead.glob("evt-*.json"))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_dir(self.root)

    def bury(self, path: Path) -> None:
        """Move a refused event to dead/, dropping the oldest letters beyond ``dead_max``."""
        os.replace(path, self.dead / path.name)
        self._bound_dead()
        fsync_dir(self.dead)
        fsync_dir(self.root)

    def _bound_dead(self) -> None:
        letters = self.dead_letters()
        for old in letters[:max(0, len(letters) - self.dead_max)]:
            old.unlink(missing_ok=True)
            self.dead_dropped += 1
            log.error("dead_letter_dropped", file=old.name, dead_max=self.dead_max,
                      dropped_total=self.dead_dropped)


def _digest(key: str) -> str:
    """The part of a spool file's name that stands for its event's id."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- delivery


class Answer(NamedTuple):
    status: int | None  # None: no answer at all
    body: Any


Post = Callable[[bytes], Awaitable[Answer]]


def signed_headers(secret: Secret | None, data: bytes, now: float) -> dict[str, str]:
    """The signature headers of one body sent at ``now`` (none without a secret)."""
    if secret is None:
        return {}
    timestamp = str(int(now))
    return {TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret.reveal().encode("utf-8"), timestamp, data)}


async def post_json(session: aiohttp.ClientSession, url: str, token: Secret, data: bytes,
                    secret: Secret | None = None) -> Answer:  # fmt: skip
    """POST one body with the hypervisor token (signed when ``secret`` is set); the
    service's answer, or no answer."""
    headers = {"Authorization": f"Bearer {token.reveal()}", "Content-Type": "application/json",
               **signed_headers(secret, data, time.time())}
    try:
        async with session.post(url, data=data, headers=headers, allow_redirects=False) as resp:
            raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        return Answer(None, None)
    try:
        return Answer(resp.status, orjson.loads(raw))
    except orjson.JSONDecodeError:
        return Answer(resp.status, None)


async def deliver_file(spool: Spool, path: Path, post: Post,
                       id_key: str = DEFAULT_ID_KEY) -> tuple[Outcome, Answer]:  # fmt: skip
    """Send one spooled body; remove it when delivered, park it in dead/ when refused."""
    try:
        data = path.read_bytes()
        event_id = orjson.loads(data)[id_key]
    except FileNotFoundError:
        return Outcome.DELIVERED, Answer(None, None)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.error("spool_file_corrupt", file=path.name)
        spool.bury(path)
        return Outcome.DEAD, Answer(None, None)
    answer = await post(data)
    outcome = settle(answer)
    if outcome is Outcome.DELIVERED:
        spool.remove(path)
        log.info("event_delivered", event_id=event_id, status=answer.status)
    elif outcome is Outcome.DEAD:
        spool.bury(path)
        log.error("event_rejected", event_id=event_id, status=answer.status, moved_to="dead/",
                  dead_letters=len(spool.dead_letters()), service_error=service_reason(answer.body))
    elif outcome is Outcome.REFUSED:
        log.error("event_refused", event_id=event_id, status=answer.status, kept="spool",
                  hint=refused_hint(answer.status), service_error=service_reason(answer.body))
    else:
        log.warning("event_delivery_failed", event_id=event_id, status=answer.status)
    return outcome, answer


MAX_REASON = 200  # characters of the service's error message a log line carries


def service_reason(body: Any) -> str | None:
    """The ``error.message`` of a service answer (CONTRACT §3), printable and cut short;
    None when the answer has none (a proxy's page, a redirect)."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        return None
    return "".join(c if c.isprintable() else "?" for c in message[:MAX_REASON])


REDIRECT_HINT = "--service-url is redirected, and relays do not follow redirects: give the URL it leads to"
REFUSED_HINTS = {
    **dict.fromkeys(range(300, 400), REDIRECT_HINT),
    404: "--service-url does not reach the service's events endpoint: check its scheme, host, port and path",
    405: "--service-url does not reach the service's events endpoint: check its scheme, host, port and path",
    401: "check the relay's token and its event HMAC secret against the service's event_hmac_secret",
    403: "the token is not of role hypervisor (or not bound to this VM)",
    413: "the body is over the service's 64 KiB limit",
}
NOT_THE_SERVICE_HINT = ("the answer is not the service's (no error body): a proxy or another server"
                        " answers --service-url; fix what it wants (TLS, a client certificate) or the URL")


def refused_hint(status: int | None) -> str:
    return REFUSED_HINTS.get(status or 0, NOT_THE_SERVICE_HINT)


@dataclass
class Retry:
    """How to back off; ``attempts`` None retries forever."""

    attempts: int | None = None
    base: float = 0.5
    rand: Callable[[], float] = random.random
    clock: Callable[[], float] = time.monotonic  # when an event refused for itself is due again


def refused_alone(status: int | None) -> bool:
    """A refusal of this one event (403: a token bound to other VMs; 413: this body is too
    large), not of everything the relay sends (a wrong token or signature, a wrong URL)."""
    return status in PER_EVENT_REFUSALS


async def drain(spool: Spool, post: Post, id_key: str, retry: Retry,
                wake: asyncio.Event | None = None, *, set_aside: bool = False) -> int:  # fmt: skip
    """Send the spool oldest first; returns how many remain once ``retry.attempts`` is spent.

    A pass over the spool stops at the first event the service cannot take now (no answer,
    5xx) or refuses whatever it is sent (401, a wrong URL); an event refused for itself
    (``refused_alone``) stays, the pass goes on with the ones behind it, and it is sent
    again only once its own backoff has passed (passes that deliver the events arriving
    behind it do not resend it each time). A pass that leaves events behind is followed
    by a backoff (cut short by ``wake``), growing while passes deliver nothing. With
    ``wake``, it never returns: an empty spool waits for the next ``wake``. With
    ``set_aside`` (a run with an end: ``--once``), the events still refused for themselves
    when the attempts are spent are moved to dead/ (logged ``event_set_aside``): resending
    the same body with the same token cannot help, so what stays is what a later run can deliver.
    """
    attempt = 0
    refused: dict[str, tuple[int, float, int | None]] = {}  # refused for itself: name → (refusals, due, status)
    while True:
        if wake is not None:
            wake.clear()  # set again by whatever is spooled from here on
        batch = spool.pending()
        if not batch:
            if wake is None:
                return 0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            continue
        names = {path.name for path in batch}
        refused = {name: due for name, due in refused.items() if name in names}
        now = retry.clock()
        held = any(due > now for _, due, _ in refused.values())
        delivered = False
        for path in batch:
            if refused.get(path.name, (0, now, None))[1] > now:
                continue
            outcome, answer = await deliver_file(spool, path, post, id_key)
            if outcome is Outcome.REFUSED and refused_alone(answer.status):
                times = refused.get(path.name, (0, now, None))[0] + 1
                due = retry.clock() + backoff_delay(times, retry.rand(), base=retry.base)
                refused[path.name] = (times, due, answer.status)
                held = True
                continue
            refused.pop(path.name, None)
            if outcome in (Outcome.RETRY, Outcome.REFUSED):
                held = True
                break
            delivered = True
        if not held:
            attempt = 0
            continue
        attempt = 0 if delivered else attempt + 1
        if retry.attempts is not None and attempt >= retry.attempts:
            if set_aside:
                _set_aside_refused(spool, id_key, {name: status for name, (_, _, status) in refused.items()})
            return len(spool.pending())
        delay = backoff_delay(attempt, retry.rand(), base=retry.base)
        if wake is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)


def _set_aside_refused(spool: Spool, id_key: str, refused: Mapping[str, int | None]) -> None:
    """Move the events refused for themselves (file name → the last status) to dead/."""
    for name, status in refused.items():
        path = spool.root / name
        try:
            event_id = orjson.loads(path.read_bytes()).get(id_key)
        except FileNotFoundError:
            continue
        except (orjson.JSONDecodeError, AttributeError):
            event_id = None
        spool.bury(path)
        log.error("event_set_aside", event_id=event_id, file=name, status=status, moved_to="dead/",
                  hint=f"{refused_hint(status)}; then move the file back into the spool directory")
