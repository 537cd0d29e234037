"""The contract model (CONTRACT §4/§5) the differential tests compare the service with.

Written from the contract, not from rg_decide: uses by (credential, step) where the
credential is the key HMAC really uses (so equivalent secret forms are one credential),
receipt positions with lost-answer claims, rollback windows (hypervisor reverts, and stale
or foreign receipts bounded by the ledger's entries), the host clock guard, lockout,
refusals under receipt_reaction = refuse (a reported revert or restore accounting for the
one stale receipt its snapshot explains, a reported clone for the one receipt of its source
its state holds), and settings that change between runs of the
service. A nonce's first use is known for good (spent_nonces names its entry); where
retention may have dropped an OTP use's details, either `reused` or the detailed reason
is allowed (a reason "a|b": either). Driven by test_decision_model.py (one instance, fixed
settings) and test_decision_fuzz.py (everything above), through decision_driver.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

BLOCK = {"SHA1": 64, "SHA256": 64, "SHA512": 128}
REPLAY_BEHIND = 100  # replayguard.core.otp.HOTP_REPLAY_BEHIND, restated
ORDER_SLACK_US = 5_000_000

Cred = tuple[str, str, int, bytes]  # Tok.cred: (type, alg, period or 0, the key HMAC uses)
# What an accept spends: an OTP's (credential, step), or a nonce's ("nonce", scope, nonce).
Spent = tuple[Cred, int] | tuple[str, str, str]
Outcome = tuple[str, str, list[str]]  # (decision, reason, flags)
Verdict = tuple[str, str, list[str], Spent | None]  # Model.otp's and Model.nonce's: an Outcome and what it spent


def claims(receipt: str) -> tuple[str, int]:
    """The VM and seq a receipt the service issued names."""
    payload = receipt.split(".")[-2]
    vm, seq, _ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return vm, seq


def settle(answer: dict[str, Any], expect: Verdict) -> tuple[Outcome, Outcome]:
    """The service's (decision, reason, flags) and the model's, the model's reason "a|b"
    settled by the service's when it is either."""
    got: Outcome = (answer["decision"], answer["reason"], sorted(answer["flags"]))
    want: Outcome = (expect[0], expect[1], sorted(expect[2]))
    if "|" in want[1] and got[1] in want[1].split("|"):
        want = (want[0], got[1], want[2])
    return got, want


def key_of(secret_b32: str) -> bytes:
    text = secret_b32.replace(" ", "").upper().rstrip("=")
    return base64.b32decode(text + "=" * (-len(text) % 8))


def hmac_key(alg: str, key: bytes) -> bytes:
    if len(key) > BLOCK[alg]:
        key = hashlib.new(alg.lower(), key).digest()
    return key.rstrip(b"\x00")


def hotp(key: bytes, counter: int, digits: int, alg: str) -> str:
    mac = hmac.new(key, counter.to_bytes(8, "big"), alg.lower()).digest()
    off = mac[-1] & 0x0F
    value = (int.from_bytes(mac[off:off + 4], "big") & 0x7FFFFFFF) % 10 ** digits
    return str(value).zfill(digits)


@dataclass
class Tok:
    id: str
    principal: str
    type: str
    secret: str
    digits: int
    period: int
    alg: str
    active: bool = True

    @property
    def cred(self) -> Cred:
        return (self.type, self.alg, self.period if self.type == "totp" else 0, hmac_key(self.alg, key_of(self.secret)))

    def code(self, counter: int) -> str:
        return hotp(key_of(self.secret), counter, self.digits, self.alg)


@dataclass
class Principal:
    fails: int = 0
    locked_until: float = 0.0


@dataclass
class Vm:
    position: int = 0
    receipts_seen: bool = False
    req_id: str | None = None
    req_from: int | None = None
    refusing: bool = False
    valid_seqs: list[int] = field(default_factory=list)  # decisions that presented a valid receipt
    revert_from: int | None = None  # a reported revert explains the next receipt from this seq on
    clone_from: tuple[str, int, int] | None = None  # a reported clone: (source, lowest, highest) seq it explains
    came_back: bool = False  # the decision at ``position`` presented a stale or foreign receipt


@dataclass
class Use:
    vm: str
    ts: float
    expires_us: int


@dataclass
class Model:
    threshold: int
    lock_period: float
    drift: int
    look_ahead: int
    max_ttl: int
    tokens: list[Tok] = field(default_factory=list)
    principals: dict[str, Principal] = field(default_factory=dict)
    high: dict[Cred, int] = field(default_factory=dict)
    uses: dict[Spent, Use] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)
    windows: list[tuple[str, float | None, float]] = field(default_factory=list)
    seq_ts: dict[int, float] = field(default_factory=dict)
    seq_vm: dict[int, str] = field(default_factory=dict)  # the VM of each decision
    guard_us: int | None = None
    max_now: float = 0.0
    accepted: set[Spent] = field(default_factory=set)
    refuse: bool = False

    def active(self, principal: str) -> list[Tok]:
        return [t for t in self.tokens if t.principal == principal and t.active]

    def matches(self, tok: Tok, code: str, now: float, seen: dict[Cred, int] | None) -> list[int]:
        if len(code) != tok.digits or not code.isdigit():
            return []
        if tok.type == "totp":
            step = int(now // tok.period)
            cands = range(step - self.drift, step + self.drift + 1)
        else:
            h = (self.high if seen is None else seen).get(tok.cred, -1)
            cands = range(max(0, h - self.look_ahead + 1), h + self.look_ahead + 1)
        return [c for c in cands if c >= 0 and tok.code(c) == code]

    def replayed(self, toks: list[Tok], code: str, seen: dict[Cred, int] | None) -> tuple[Tok, list[int]] | None:
        """When no token matches: the first HOTP token whose code it is further behind its
        counter, up to REPLAY_BEHIND counters (a replay if that use is recorded, else invalid)."""
        for tok in toks:
            if tok.type != "hotp" or len(code) != tok.digits or not code.isdigit():
                continue
            h = (self.high if seen is None else seen).get(tok.cred, -1)
            cands = range(max(0, h - max(REPLAY_BEHIND, self.look_ahead) + 1), max(0, h - self.look_ahead + 1))
            found = [c for c in cands if tok.code(c) == code]
            if found:
                return tok, found
        return None

    # --- receipts -------------------------------------------------------------------
    def receipt_window(self, vm_id: str, rseq: int, now: float) -> tuple[str, float, float]:
        """A stale or foreign receipt's window on ``vm_id``: every decision of that VM the
        ledger recorded after the receipt's entry was undone, whatever clock stamped it."""
        later = [self.seq_ts[s] for s, v in self.seq_vm.items() if v == vm_id and s > rseq]
        return vm_id, min([self.seq_ts[rseq], *later]), max([now, *later])

    def reverted(self, vm_id: str, state: float | None, at: float) -> None:
        """A reported revert or restore to the state of time ``state`` (None: unknown), at time
        ``at``. Under refuse, the guest's next receipt may be the one its disk held then: the
        newest issued before ``state``, or any later (unknown state: any). Not when the guest
        already presented a receipt after ``at`` (the report came late), or when its newest
        receipt answered a stale or foreign one (it already came back, whatever ``at`` says)."""
        vm = self.vms.setdefault(vm_id, Vm())
        vm.revert_from = vm.clone_from = None
        if not self.refuse or (vm.position and (self.seq_ts[vm.position] > at or vm.came_back)):
            return
        older = [s for s in vm.valid_seqs if state is not None and self.seq_ts[s] < state]
        vm.revert_from = max(older, default=0)

    def cloned(self, vm_id: str, source: str, state: float | None, at: float) -> None:
        """A reported clone of ``source`` as of time ``state`` (None: unknown), made at ``at``.
        Under refuse, the clone's next receipt may be one of the source's its disk holds: issued
        at or before ``state``, from the one issued to the source's last request by then that
        presented a receipt (0: none did) up to the newest (unknown state: any up to ``at``).
        Not when the clone already presented a receipt after ``at``, or a stale or foreign one."""
        vm = self.vms.setdefault(vm_id, Vm())
        vm.revert_from = vm.clone_from = None
        if not self.refuse or (vm.position and (self.seq_ts[vm.position] > at or vm.came_back)):
            return
        bound = at if state is None else state
        held = [s for s, v in self.seq_vm.items() if v == source and self.seq_ts[s] <= bound]
        if not held:
            return
        moved = [s for s in self.vms.setdefault(source, Vm()).valid_seqs if self.seq_ts[s] <= bound]
        vm.clone_from = (source, 0 if state is None else max(moved, default=0), max(held))

    def receipt_flags(self, vm_id: str, r: dict[str, Any], now: float) -> list[str]:
        vm = self.vms.setdefault(vm_id, Vm())
        flags = self._receipt_flags(vm, vm_id, r, now)
        if r["kind"] == "valid" or flags:  # the position moves: a reported event explains no later receipt
            vm.revert_from = vm.clone_from = None
        if r["kind"] == "valid":
            vm.came_back = bool({"rollback_detected", "clone_detected"} & set(flags))
        return flags

    def _receipt_flags(self, vm: Vm, vm_id: str, r: dict[str, Any], now: float) -> list[str]:
        kind = r["kind"]
        if kind == "forged":
            return ["receipt_invalid"]
        if kind == "valid":
            if r["vm"] != vm_id and self.refuse and vm.clone_from is not None and (
                    vm.clone_from[0] == r["vm"] and vm.clone_from[1] <= r["seq"] <= vm.clone_from[2]):
                return []  # the source's receipt the reported clone holds: its window is the event's
            if r["vm"] != vm_id:
                self.windows.append(self.receipt_window(r["vm"], r["seq"], now))
                return ["clone_detected"]
            resent = (r.get("unanswered") is not None and r["seq"] < vm.position and r["seq"] == vm.req_from
                      and r.get("unanswered") == vm.req_id)
            if (r["seq"] < vm.position and not resent and self.refuse and vm.revert_from is not None
                    and r["seq"] >= vm.revert_from):
                return []  # the receipt the reported revert put back: its window is the event's
            if r["seq"] < vm.position and not resent:
                self.windows.append(self.receipt_window(vm_id, r["seq"], now))
                return ["rollback_detected"]
            return []
        if kind == "missing" and vm.receipts_seen:
            return ["receipt_missing"]
        return []

    def after(self, vm_id: str, r: dict[str, Any], seq: int, now: float) -> None:
        self.seq_ts[seq] = now
        self.seq_vm[seq] = vm_id
        if r["kind"] == "valid":
            vm = self.vms[vm_id]
            vm.position = seq
            vm.valid_seqs.append(seq)
            vm.receipts_seen = True
            vm.req_id = r.get("request")
            vm.req_from = r["seq"]

    def classify(self, use: Use | None, nonce: bool = False) -> str:
        """A nonce's first use is known for good (the ledger entry spent_nonces names); an
        OTP's only until retention may have dropped its row."""
        if use is None:
            return "reused"
        at_risk = any(w_vm == use.vm and (start is None or start <= use.ts) and use.ts <= end
                      for w_vm, start, end in self.windows)
        if not at_risk:
            return "reused"
        if not nonce and self.max_now * 1e6 > use.expires_us:
            return "reused|replay_after_rollback"  # retention may have dropped the details
        return "replay_after_rollback"

    # --- decisions --------------------------------------------------------------------
    def otp(self, vm_id: str, principal: str, code: str, r: dict[str, Any], now: float, seq: int,
            seen: dict[Cred, int] | None, got: str | None = None) -> Verdict:
        """``got``: the service's reason, which settles what the model cannot know: whether
        retention already dropped a use (the purge runs in the background too)."""
        self.max_now = max(self.max_now, now)
        flags = self.receipt_flags(vm_id, r, now)
        if self.refused(vm_id, flags):
            self.after(vm_id, r, seq, now)
            return "reject", "locked_out", flags, None
        verdict, reason, spent = self._otp(vm_id, principal, code, now, seen, got)
        self.after(vm_id, r, seq, now)
        return verdict, reason, flags, spent

    def _otp(self, vm_id: str, principal: str, code: str, now: float, seen: dict[Cred, int] | None,
             got: str | None) -> tuple[str, str, Spent | None]:
        toks = self.active(principal)
        if not toks:
            return "reject", "no_token", None
        p = self.principals.setdefault(principal, Principal())
        if p.locked_until > now:
            return "reject", "locked_out", None
        for tok in toks:
            steps = self.matches(tok, code, now, seen)
            if steps:
                break
        else:
            behind = self.replayed(toks, code, seen)
            firsts = [] if behind is None else [
                self.uses[(behind[0].cred, s)] for s in behind[1] if (behind[0].cred, s) in self.uses]
            # a use retention may have dropped counts only if the service still found it
            kept = [u for u in firsts if self.max_now * 1e6 <= u.expires_us]
            if kept or (firsts and got != "invalid"):
                return "reject", self.classify(max(firsts, key=lambda u: u.ts)), None
            p.fails += 1
            if p.fails >= self.threshold:
                p.fails = 0
                p.locked_until = now + self.lock_period
            return "reject", "invalid", None
        floor = None
        now_us = int(now * 1e6)
        if tok.type == "totp" and self.guard_us is not None:
            pu = tok.period * 1_000_000
            if (now_us + ORDER_SLACK_US) // pu < self.guard_us // pu - self.drift:
                floor = self.guard_us
        live = [s for s in steps if floor is None or s * tok.period * 1_000_000 > floor]
        h = self.high.get(tok.cred, -1)
        ahead = [s for s in live if s > h]
        if ahead:
            s = min(ahead)
            self.high[tok.cred] = s
            kept_us = now_us + self.max_ttl * 1_000_000
            if tok.type == "totp":  # never dropped while the code is still accepted (and a minute)
                kept_us = max(kept_us, ((max(steps) + self.drift + 1) * tok.period + 60) * 1_000_000)
            self.uses[(tok.cred, s)] = Use(vm_id, now, kept_us)
            p.fails = 0
            if tok.type == "totp":
                reached = min(s * tok.period * 1_000_000, now_us)
                if self.guard_us is None or self.guard_us < reached:
                    self.guard_us = reached
            return "accept", "ok", (tok.cred, s)
        firsts = [self.uses[(tok.cred, s)] for s in steps if (tok.cred, s) in self.uses]
        if not firsts and floor is not None and h < max(steps):
            return "reject", "invalid", None
        return "reject", self.classify(max(firsts, key=lambda u: u.ts) if firsts else None), None

    def nonce(self, vm_id: str, scope: str, nonce: str, ttl: int, issued_at: float | None, r: dict[str, Any],
              now: float, seq: int) -> Verdict:
        self.max_now = max(self.max_now, now)
        flags = self.receipt_flags(vm_id, r, now)
        key = ("nonce", scope, nonce)
        spent: Spent | None = None
        if self.refused(vm_id, flags):
            result = ("reject", "locked_out")
        elif issued_at is not None and issued_at + ttl < now:
            # a consumed nonce is classified as a replay, however long ago; only one never
            # consumed is expired
            result = ("reject", "expired" if key not in self.uses else self.classify(self.uses[key], nonce=True))
        elif key in self.uses:
            result = ("reject", self.classify(self.uses[key], nonce=True))
        else:
            base = now + max(ttl, self.max_ttl) if issued_at is None else max(issued_at, now) + ttl + 60
            self.uses[key] = Use(vm_id, now, int(base * 1e6))
            result = ("accept", "ok")
            spent = key
        self.after(vm_id, r, seq, now)
        return result[0], result[1], flags, spent

    def spend(self, spent: Spent | None) -> None:
        """Note what an accept the service agreed on spent (``otp``'s and ``nonce``'s last
        item): the model never accepts one credential step or nonce twice."""
        if spent is not None:
            assert spent not in self.accepted, f"model accepted twice? {spent}"
            self.accepted.add(spent)

    def refused(self, vm_id: str, flags: list[str]) -> bool:
        vm = self.vms[vm_id]
        if self.refuse and ("rollback_detected" in flags or "clone_detected" in flags):
            vm.refusing = True
        return vm.refusing

    def unlock(self, principal: str) -> None:
        p = self.principals.setdefault(principal, Principal())
        p.fails = 0
        p.locked_until = 0.0
