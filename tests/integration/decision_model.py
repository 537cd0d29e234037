"""A small pure-Python model of what CONTRACT §4 says each decision should be.

Not a copy of the implementation: it keeps a ledger of uses by (credential, step), a
receipt position per VM, a failure count and lock per principal, spent nonces, rollback
windows opened by stale or foreign receipts, and the host clock guard, and says what each
request should get (decision, reason, flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyotp

REPLAY_BEHIND = 100  # replayguard.core.otp.HOTP_REPLAY_BEHIND, restated


@dataclass
class Tok:
    id: str
    principal: str
    type: str
    secret: str
    digits: int
    period: int
    active: bool = True

    @property
    def cred(self) -> tuple[str, str, int]:
        return (self.type, self.secret.upper(), self.period if self.type == "totp" else 0)

    def code(self, counter: int) -> str:
        return pyotp.HOTP(self.secret, digits=self.digits).at(counter)


@dataclass
class Principal:
    fails: int = 0
    locked_until: float = 0.0


@dataclass
class Vm:
    position: int = 0  # seq of the latest decision that presented a valid receipt
    receipts_seen: bool = False


@dataclass
class Model:
    threshold: int
    lock_period: float
    drift: int
    look_ahead: int
    tokens: list[Tok] = field(default_factory=list)
    principals: dict[str, Principal] = field(default_factory=dict)
    high: dict[tuple[str, str, int], int] = field(default_factory=dict)
    uses: dict[tuple[object, ...], tuple[str, float]] = field(default_factory=dict)  # -> (vm, ts)
    vms: dict[str, Vm] = field(default_factory=dict)
    windows: list[tuple[str, float, float]] = field(default_factory=list)
    seq_ts: dict[int, float] = field(default_factory=dict)
    seq_vm: dict[int, str] = field(default_factory=dict)  # the VM of each decision
    guard_us: int | None = None
    max_now: float = 0.0  # the latest clock seen: retention may have purged up to it
    nonce_expiry: dict[tuple[str, str], float] = field(default_factory=dict)

    def active(self, principal: str) -> list[Tok]:
        return [t for t in self.tokens if t.principal == principal and t.active]

    def matches(self, tok: Tok, code: str, now: float, seen: dict | None = None) -> list[int]:
        if len(code) != tok.digits or not code.isdigit():
            return []
        if tok.type == "totp":
            step = int(now // tok.period)
            cands = range(step - self.drift, step + self.drift + 1)
        else:
            h = (self.high if seen is None else seen).get(tok.cred, -1)
            cands = range(max(0, h - self.look_ahead + 1), h + self.look_ahead + 1)
        return [c for c in cands if c >= 0 and tok.code(c) == code]

    def replayed(self, toks: list[Tok], code: str, seen: dict | None) -> tuple[Tok, list[int]] | None:
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

    def _receipt_window(self, vm_id: str, rseq: int, now: float) -> tuple[str, float, float]:
        """The window a stale or foreign receipt opens on ``vm_id``: every decision of that VM
        after the receipt's entry was undone, whatever clock stamped it."""
        later = [self.seq_ts[s] for s, v in self.seq_vm.items() if v == vm_id and s > rseq]
        return vm_id, min([self.seq_ts[rseq], *later]), max([now, *later])

    def _receipt(self, vm_id: str, receipt: tuple[str, str | None, int | None], now: float) -> list[str]:
        kind, rvm, rseq = receipt
        vm = self.vms.setdefault(vm_id, Vm())
        if kind == "forged":
            return ["receipt_invalid"]
        if kind == "valid":
            assert rvm is not None and rseq is not None
            if rvm != vm_id:
                self.windows.append(self._receipt_window(rvm, rseq, now))
                return ["clone_detected"]
            if rseq < vm.position:
                self.windows.append(self._receipt_window(vm_id, rseq, now))
                return ["rollback_detected"]
        return []

    def _after(self, vm_id: str, receipt_kind: str, seq: int, now: float) -> None:
        self.seq_ts[seq] = now
        self.seq_vm[seq] = vm_id
        if receipt_kind == "valid":
            self.vms[vm_id].position = seq
            self.vms[vm_id].receipts_seen = True

    def _classify(self, first: tuple[str, float] | None) -> str:
        if first is None:
            return "reused"
        vm, ts = first
        if any(w_vm == vm and start <= ts <= end for w_vm, start, end in self.windows):
            return "replay_after_rollback"
        return "reused"

    def otp(self, vm_id: str, principal: str, code: str, receipt: tuple[str, str | None, int | None],
            now: float, seq: int, seen: dict | None = None) -> tuple[str, str, list[str]]:
        """``seen``: the HOTP high-waters as the request's matching saw them (a batch)."""
        flags = self._receipt(vm_id, receipt, now)
        verdict, reason = self._otp(vm_id, principal, code, now, seen)
        self._after(vm_id, receipt[0], seq, now)
        return verdict, reason, flags

    def _otp(self, vm_id: str, principal: str, code: str, now: float, seen: dict | None) -> tuple[str, str]:
        toks = self.active(principal)
        if not toks:
            return "reject", "no_token"
        p = self.principals.setdefault(principal, Principal())
        if p.locked_until > now:
            return "reject", "locked_out"
        for tok in toks:
            steps = self.matches(tok, code, now, seen)
            if steps:
                break
        else:
            behind = self.replayed(toks, code, seen)
            firsts = [] if behind is None else [
                self.uses[(behind[0].cred, s)] for s in behind[1] if (behind[0].cred, s) in self.uses]
            if firsts:  # a replay, not a failure
                return "reject", self._classify(max(firsts, key=lambda f: f[1]))
            p.fails += 1
            if p.fails >= self.threshold:
                p.fails = 0
                p.locked_until = now + self.lock_period
            return "reject", "invalid"
        floor = None
        if tok.type == "totp" and self.guard_us is not None:
            pu = tok.period * 1_000_000
            if int(now * 1e6) // pu < self.guard_us // pu - self.drift:
                floor = self.guard_us
        live = [s for s in steps if floor is None or s * tok.period * 1_000_000 > floor]
        h = self.high.get(tok.cred, -1)
        ahead = [s for s in live if s > h]
        if ahead:
            s = min(ahead)
            self.high[tok.cred] = s
            self.uses[(tok.cred, s)] = (vm_id, now)
            p.fails = 0
            if tok.type == "totp":
                reached = min(s * tok.period * 1_000_000, int(now * 1e6))
                if self.guard_us is None or self.guard_us < reached:
                    self.guard_us = reached
            return "accept", "ok"
        firsts = [self.uses[(tok.cred, s)] for s in steps if (tok.cred, s) in self.uses]
        if not firsts and floor is not None and h < max(steps):
            return "reject", "invalid"  # a code for a time the host left behind, and no later step accepted
        return "reject", self._classify(max(firsts, key=lambda f: f[1]) if firsts else None)

    def nonce(self, vm_id: str, scope: str, nonce: str, ttl: int, issued_at: float | None,
              receipt: tuple[str, str | None, int | None], now: float, seq: int) -> tuple[str, str, list[str]]:
        self.max_now = max(self.max_now, now)
        flags = self._receipt(vm_id, receipt, now)
        if issued_at is not None and issued_at + ttl < now and ("nonce", scope, nonce) not in self.uses:
            result = ("reject", "expired")
        elif issued_at is not None and issued_at + ttl < now:
            first = self.uses[("nonce", scope, nonce)]
            reason = self._classify(first)
            if self.max_now * 1e6 > self.nonce_expiry[(scope, nonce)]:
                reason += "|expired"  # retention may have forgotten the use: then it is expired
            result = ("reject", reason)
        elif ("nonce", scope, nonce) in self.uses:
            first = self.uses[("nonce", scope, nonce)]
            reason = self._classify(first)
            self.max_now = max(self.max_now, now)
            if self.max_now * 1e6 > self.nonce_expiry[(scope, nonce)] and reason == "replay_after_rollback":
                # retention may have dropped the use's details (documented): either is fine
                reason = "reused|replay_after_rollback"
            result = ("reject", reason)
        else:
            self.uses[("nonce", scope, nonce)] = (vm_id, now)
            base = now + max(ttl, 7 * 86400) if issued_at is None else max(issued_at, now) + ttl + 60
            self.nonce_expiry[(scope, nonce)] = base * 1e6
            result = ("accept", "ok")
        self._after(vm_id, receipt[0], seq, now)
        return result[0], result[1], flags

    def unlock(self, principal: str) -> None:
        p = self.principals.setdefault(principal, Principal())
        p.fails = 0
        p.locked_until = 0.0
