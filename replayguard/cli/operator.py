"""The operator's commands against a running service: alerts, VMs, principals, status.

They talk HTTP to ``REPLAYGUARD_URL`` (default ``http://127.0.0.1:8080``) with the token
of ``REPLAYGUARD_TOKEN`` or the file named by ``REPLAYGUARD_TOKEN_FILE`` / ``--token-file``
(never a flag holding the token itself: it would show in ``ps``). People get aligned
tables; scripts get ``--json`` (one JSON document, or one JSON line per alert for
``follow``). Text from the service is printed with control characters escaped, so an
identifier or a note cannot drive the terminal.

Exit status: 0 done; 1 the service answered but something is wrong (``status``: not
ready, the ledger does not verify, or its continuity is not ok: a witness unreachable, or
the ledger went back in time); 2 usage or configuration (no token); 3 the
service is unreachable or failed (5xx, or an answer that is not JSON: the URL leads to
something else); 4 the token was refused (401, 403); 5 not found;
6 the service refused the request (another 4xx).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .service_client import (
    DEFAULT_URL,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Client,
    CommandFailed,
    client_from,
    printable,
)

# --- output -----------------------------------------------------------------------------

def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows as aligned columns under upper-case headers; numbers right-aligned."""
    cells = [[printable(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int) and not isinstance(row[i], bool) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line([h.upper() for h in headers])] + [line(r) for r in cells])


def short_time(iso: object) -> str:
    return "—" if not isinstance(iso, str) else iso.replace("T", " ").split(".")[0] + "Z"


# --- commands ---------------------------------------------------------------------------

def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str], out: TextIO) -> None:
    out.write((json.dumps(data, ensure_ascii=False) if args.json else human(data)) + "\n")


def _alert_rows(items: list[dict[str, Any]]) -> str:
    if not items:
        return "no alerts"
    return table([[a["id"], a["severity"], a["kind"], a["status"], a["vm_id"], a["principal"], a["count"],
                   short_time(a["last_seen"])] for a in items],
                 ["id", "severity", "kind", "status", "vm", "principal", "count", "last seen"])


def alerts_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    params = {"severity": args.severity, "kind": args.kind, "status": args.status, "vm_id": args.vm,
              "principal": args.principal, "since": args.since, "until": args.until, "limit": args.limit}
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
    page = client.call("GET", f"/v1/alerts?{query}")
    _emit(args, page, lambda p: _alert_rows(p["items"]), out)
    return EXIT_OK


def _alert_detail(alert: dict[str, Any]) -> str:
    ack = alert.get("acknowledged") or {}
    facts = [("alert", alert["id"]), ("severity", alert["severity"]), ("kind", alert["kind"]),
             ("status", alert["status"]), ("vm", alert["vm_id"]), ("principal", alert["principal"]),
             ("count", alert["count"]), ("first seen", short_time(alert["first_seen"])),
             ("last seen", short_time(alert["last_seen"])), ("summary", alert["summary"])]
    if ack:
        facts += [("acknowledged", f"{short_time(ack.get('at'))} by {ack.get('by')}"), ("note", ack.get("note"))]
    width = max(len(name) for name, _ in facts)
    lines = [f"{name.ljust(width)}  {printable(value)}" for name, value in facts]
    entries = alert.get("entries", [])
    lines += ["", f"ledger entries ({alert.get('entries_total', len(entries))})",
              table([[e["seq"], short_time(e["time"]), e["kind"], e["vm_id"], e["subject"], e["decision"],
                      e["reason"]] for e in entries],
                    ["seq", "time", "kind", "vm", "subject", "decision", "reason"])]
    windows = alert.get("rollback_windows", [])
    if windows:
        lines += ["", "rollback windows", table(
            [[w["id"], w["vm_id"], short_time(w["start"]) if w["start"] else "unknown", short_time(w["end"]),
              w["cause"], w["event_id"]] for w in windows], ["id", "vm", "start", "end", "cause", "event"])]
    events = alert.get("hypervisor_events", [])
    if events:
        lines += ["", "hypervisor events", table(
            [[e["seq"], short_time(e["received_at"]), e["type"], e["vm_id"], e["event_id"]] for e in events],
            ["seq", "received", "type", "vm", "event"])]
    return "\n".join(lines)


def _alert_path(alert_id: str) -> str:
    return "/v1/alerts/" + urllib.parse.quote(alert_id, safe="")


def alerts_show(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _emit(args, client.call("GET", _alert_path(args.id)), _alert_detail, out)
    return EXIT_OK


def alerts_ack(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    done = client.call("POST", _alert_path(args.id) + "/acknowledge", {"note": args.note})
    _emit(args, done, lambda a: f"alert {printable(a['id'])} acknowledged (ledger seq {a['ack_seq']})", out)
    return EXIT_OK


FOLLOW_REMEMBERED = 50_000  # ids of the alert events ``follow`` printed that it keeps


def _first_time(printed: OrderedDict[str, None], event_id: str | None) -> bool:
    """Whether ``follow`` has not printed the alert event ``event_id`` yet; remembers it. A
    bare change number (a service whose ids carry no digest) names no content: always new."""
    if event_id is None or "." not in event_id:
        return True
    if event_id in printed:
        return False
    printed[event_id] = None
    if len(printed) > FOLLOW_REMEMBERED:
        printed.popitem(last=False)
    return True


def alerts_follow(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Prints each new or changed alert as it comes; reconnects with Last-Event-ID (the
    stream's position, which it sends on opening and with every alert). A stream resumed
    from an id that shows the database went back in time replays every change from the
    start: an event whose id (change, alert and digests of its content) was printed
    already is that change again, as it was, and is not printed twice."""
    last, seen, delay = args.last_event_id, 0, 1.0
    printed: OrderedDict[str, None] = OrderedDict()
    while True:
        try:
            for event_id, alert in client.events(last):
                last = event_id or last
                if alert is None:
                    continue  # the stream's position only: a reconnect resumes from it
                if not _first_time(printed, event_id):
                    continue
                line = json.dumps(alert, ensure_ascii=False) if args.json else "  ".join(printable(v) for v in (
                    short_time(alert["updated_at"]), alert["severity"], alert["kind"], alert["status"],
                    f"alert={alert['id']}", f"vm={alert['vm_id']}", f"principal={alert['principal']}",
                    f"count={alert['count']}"))
                out.write(line + "\n")
                out.flush()
                seen += 1
                if args.count and seen >= args.count:
                    return EXIT_OK
                delay = 1.0
        except CommandFailed as exc:
            if exc.exit_status != EXIT_UNREACHABLE:
                raise
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(delay)  # the service went away: retry with backoff
        delay = min(delay * 2, 30.0)


def vms(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.timeline:
        return vm_timeline(client, args, out)
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = urllib.parse.urlencode({"limit": 1000, **({"cursor": cursor} if cursor else {})})
        page = client.call("GET", f"/v1/vms?{query}")
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    _emit(args, {"items": items}, lambda d: table(
        [[v["vm_id"], v["epoch"], v["rollbacks"], v["open_alerts"],
          f"yes ({v['refusing_reason']})" if v["refusing"] else "no", short_time(v["last_seen"])]
         for v in d["items"]], ["vm", "epoch", "rollbacks", "open alerts", "refusing", "last seen"])
          if d["items"] else "no VMs", out)
    return EXIT_OK


def _what(item: dict[str, Any]) -> str:
    if "event" in item:
        return str(item["event"]["type"])
    if item.get("decision"):
        return f"{item['kind']} {item['decision']} ({item['reason']})"
    return str(item["kind"])


def vm_timeline(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    base = "/v1/vms/" + urllib.parse.quote(args.timeline, safe="") + "/timeline"
    after, items, windows = 0, [], []
    while True:
        query = urllib.parse.urlencode({k: v for k, v in {"since": args.since, "until": args.until,
                                                          "after_seq": after, "limit": 1000}.items() if v})
        page = client.call("GET", f"{base}?{query}")
        items += page["items"]
        windows = page.get("rollback_windows", [])
        if page["next_after_seq"] is None:
            break
        after = page["next_after_seq"]

    def human(d: dict[str, Any]) -> str:
        rows = table([[i["seq"], short_time(i["time"]), _what(i),
                       i.get("subject") or (i.get("event") or {}).get("event_id"), ",".join(i["alert_ids"])]
                      for i in d["items"]], ["seq", "time", "what", "subject", "alerts"])
        if d["rollback_windows"]:
            rows += "\n\nrollback windows\n" + table(
                [[w["id"], short_time(w["start"]) if w["start"] else "unknown", short_time(w["end"]), w["cause"],
                  w["event_id"]] for w in d["rollback_windows"]], ["id", "start", "end", "cause", "event"])
        return rows

    _emit(args, {"vm_id": args.timeline, "items": items, "rollback_windows": windows}, human, out)
    return EXIT_OK


def vms_clear(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Lifts a VM's refusal (``receipt_reaction = "refuse"``); the note goes to the ledger."""
    if args.timeline or args.since or args.until:
        raise CommandFailed("vms clear takes no --timeline, --since or --until", EXIT_USAGE)
    path = "/v1/vms/" + urllib.parse.quote(args.vm, safe="") + "/clear"
    done = client.call("POST", path, {"note": args.note})

    def human(d: dict[str, Any]) -> str:
        was = f"yes ({printable(d['refusing_reason'])})" if d["was_refusing"] else "no"
        return f"{printable(d['vm_id'])} cleared (was refusing: {was}; ledger seq {d['seq']})"

    _emit(args, done, human, out)
    return EXIT_OK


def principals_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = urllib.parse.urlencode({"limit": 500, **({"cursor": cursor} if cursor else {})})
        page = client.call("GET", f"/v1/principals?{query}")
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    _emit(args, {"items": items}, lambda d: table(
        [[p["principal"], "yes" if p["locked"] else "no", short_time(p["locked_until"]) if p["locked"] else "",
          p["failures"], " ".join(f"{t['token_id']}({t['type']},{t['state']})" for t in p["tokens"])]
         for p in d["items"]], ["principal", "locked", "until", "failures", "tokens"])
          if d["items"] else "no principals", out)
    return EXIT_OK


def principals_unlock(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    path = "/v1/principals/" + urllib.parse.quote(args.principal, safe="") + "/unlock"
    done = client.call("POST", path, {"note": args.note})
    _emit(args, done, lambda d: (f"{printable(d['principal'])} unlocked (was locked: "
                                 f"{'yes' if d['was_locked'] else 'no'}, failures reset from "
                                 f"{d['failures_before']}; ledger seq {d['seq']})"), out)
    return EXIT_OK


def status(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    health, ready = client.status_of("/healthz"), client.status_of("/readyz")
    report = {"url": client.url, "healthy": health == 200, "ready": ready == 200, **client.call("GET", "/v1/status")}
    if args.verify:
        report["verify"] = client.call("GET", "/v1/ledger/verify")
    report.setdefault("witnesses", None)

    def human(r: dict[str, Any]) -> str:
        head, cp = r["ledger"]["head"], r["ledger"]["last_checkpoint"]
        facts = [("service", f"{r['url']} (replayguard {r['version']})"),
                 ("health", "ok" if r["healthy"] else "FAILING"), ("ready", "yes" if r["ready"] else "NO"),
                 ("ledger head", f"seq {head['seq']} hash {head['hash'][:16]}…"),
                 ("last checkpoint", f"seq {cp['seq']} signed {short_time(cp['created_at'])}" if cp else "none yet")]
        if "verify" in r:
            v = r["verify"]
            facts.append(("verify", f"ok, {v['checked']} entries" if v["ok"]
                          else f"FAILED: {v.get('problem')} at seq {v.get('first_bad_seq')}"))
        facts.append(("continuity", r.get("continuity") or "not reported"))
        witnesses = r["witnesses"]
        facts.append(("witnesses", "not reported by this service" if witnesses is None else "none configured"
                      if not witnesses else ", ".join(
                          f"{w['name']}: {w['state']}" + (f" (holds {w['held_seq']}, {w['verdict']})"
                                                          if w.get("held_seq") is not None else "")
                          for w in witnesses)))
        width = max(len(n) for n, _ in facts)
        text = "\n".join(f"{n.ljust(width)}  {printable(v)}" for n, v in facts)
        sinks = r["sinks"]
        text += "\n\nsinks" + (" (this instance does not feed them now)" if not r["leader"] else "") + "\n"
        text += table([[s["name"], s["backlog"], s["delivered"], s["failed_attempts"], s["last_error"]]
                       for s in sinks], ["sink", "backlog", "delivered", "failed", "last error"]) if sinks else "none"
        return text

    _emit(args, report, human, out)
    bad = (not (report["healthy"] and report["ready"]) or ("verify" in report and not report["verify"]["ok"])
           or report.get("continuity", "ok") != "ok")
    return EXIT_PROBLEM if bad else EXIT_OK


# --- wiring -----------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, handler: Callable[[Client, argparse.Namespace, TextIO], int],
            *, nested: bool = False) -> None:
    """``nested``: a subcommand of a command that has these flags too (``vms clear``), so
    that they may come before the subcommand as well as after it."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
    parser.add_argument("--url", help=f"the service (REPLAYGUARD_URL; default {DEFAULT_URL})", **unset)
    parser.add_argument("--token-file", help="a file holding the API token (REPLAYGUARD_TOKEN_FILE); "
                                             "or set REPLAYGUARD_TOKEN", **unset)
    parser.add_argument("--json", action="store_true", help="JSON for scripts instead of a table", **unset)
    parser.set_defaults(handler=_runner(handler))


def _runner(handler: Callable[[Client, argparse.Namespace, TextIO], int]) -> Callable[..., int]:
    def run(args: argparse.Namespace, _settings: object) -> int:
        client = client_from(args)
        try:
            return handler(client, args, sys.stdout)
        except CommandFailed as exc:
            print(f"replayguard: {exc.message}", file=sys.stderr)
            return exc.exit_status
        except BrokenPipeError:
            return EXIT_OK

    return run


def register(sub: Any) -> None:
    alerts = sub.add_parser("alerts", help="alerts of a running service (REPLAYGUARD_URL, REPLAYGUARD_TOKEN)")
    cmds = alerts.add_subparsers(dest="alerts_command", required=True)
    listing = cmds.add_parser("list", help="alerts, newest first")
    for flag in ("severity", "kind", "status", "vm", "principal", "since", "until"):
        listing.add_argument(f"--{flag}")
    listing.add_argument("--limit", type=int, default=50)
    _common(listing, alerts_list)
    show = cmds.add_parser("show", help="one alert with its ledger entries, windows and events")
    show.add_argument("id")
    _common(show, alerts_show)
    ack = cmds.add_parser("ack", help="acknowledge an alert (written to the ledger)")
    ack.add_argument("id")
    ack.add_argument("--note")
    _common(ack, alerts_ack)
    follow = cmds.add_parser("follow", help="print alerts as they are raised or change")
    follow.add_argument("--last-event-id", help="resume after this event id (as the stream sent it)")
    follow.add_argument("--count", type=int, default=0, help="exit after this many alerts")
    _common(follow, alerts_follow)

    vm_parser = sub.add_parser("vms", help="VMs of a running service, or one VM's timeline, or clear a VM")
    vm_parser.add_argument("--timeline", metavar="VM", help="the timeline of this VM")
    vm_parser.add_argument("--since")
    vm_parser.add_argument("--until")
    _common(vm_parser, vms)
    vcmds = vm_parser.add_subparsers(dest="vms_command")
    clear = vcmds.add_parser("clear", help="lift a VM's refusal (receipt_reaction = refuse; admin token; "
                                           "written to the ledger)")
    clear.add_argument("vm", metavar="VM")
    clear.add_argument("--note", required=True, help="why (written to the ledger; one line)")
    _common(clear, vms_clear, nested=True)

    principals = sub.add_parser("principals", help="principals of a running service (admin token)")
    pcmds = principals.add_subparsers(dest="principals_command", required=True)
    _common(pcmds.add_parser("list", help="principals with tokens, failures and lockout"), principals_list)
    unlock = pcmds.add_parser("unlock", help="end a lockout and reset failures (written to the ledger)")
    unlock.add_argument("principal")
    unlock.add_argument("--note")
    _common(unlock, principals_unlock)

    status_parser = sub.add_parser("status", help="health, readiness, ledger head, last checkpoint, sinks")
    status_parser.add_argument("--verify", action="store_true", help="also verify the whole hash chain")
    _common(status_parser, status)
