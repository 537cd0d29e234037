"""Differential runs of the decision core against the contract model (decision_model.py).

Seeded random sequences of OTP verifications and nonce consumptions, with: long clock jumps
forward and back, retention purges, restarts of the service with other settings (drift,
lockout threshold and period, nonce_max_ttl_s, HOTP look-ahead), a second instance on the
same database, enrolments of equivalent secret forms (case, spaces, zero padding, a long
key and its hash) with 6/7/8 digits and SHA1/SHA256/SHA512, deletions, unlocks, hypervisor
snapshot/revert events (some reported only when a polling relay would see them, after the
reverted guest may have spoken, and then reverted once more unreported) and clones into new
VMs, receipts (current, stale, foreign, forged,
missing, lost-answer claims right and wrong) and bursts of identical requests. Every answer
must be the model's, and no credential is ever accepted twice (checked on the ledger itself).

A small run by default (3 seeds of 150 steps); RG_DECISION_FUZZ_SEEDS and
RG_DECISION_FUZZ_STEPS make it larger.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from replayguard.services.retention import purge_expired
from replayguard.settings import Settings
from tests.conftest import Api, FakeClock, start_api, uid
from tests.integration.decision_driver import ModelDriver
from tests.integration.decision_model import Model, Tok, Verdict, Vm, claims

SEEDS = int(os.environ.get("RG_DECISION_FUZZ_SEEDS", "3"))
STEPS = int(os.environ.get("RG_DECISION_FUZZ_STEPS", "150"))


def b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode()


def pick_settings(r: random.Random) -> dict[str, Any]:
    return {"totp_drift_steps": r.choice([0, 1, 1, 2, 3]), "lockout_threshold": r.choice([1, 3, 5, 10]),
            "lockout_period_s": r.choice([30, 90, 600]), "nonce_max_ttl_s": r.choice([60, 400, 3600, 604800]),
            "hotp_look_ahead": r.choice([1, 3, 5, 10]), "receipt_reaction": r.choice(["flag", "flag", "refuse"])}


class Driver(ModelDriver):
    def __init__(self, rng: random.Random, make_settings: Callable[..., Settings], clock: FakeClock) -> None:
        self.make_settings, self.settings = make_settings, pick_settings(rng)
        super().__init__(rng, Model(self.settings["lockout_threshold"], self.settings["lockout_period_s"],
                                    self.settings["totp_drift_steps"], self.settings["hotp_look_ahead"],
                                    self.settings["nonce_max_ttl_s"]), clock)
        self.sources = list(self.vms)  # the VMs events name; clones join self.vms for requests and clears
        raw = [os.urandom(20) for _ in range(2)]
        long_key = os.urandom(70)
        # Forms that give the same codes, grouped: the model names them by the HMAC key.
        self.secrets = [b32(raw[0]), b32(raw[0]).lower(), " ".join(b32(raw[0])[i:i + 4] for i in range(0, 32, 4)),
                        b32(raw[0] + b"\x00\x00\x00\x00\x00"), b32(raw[1]), b32(long_key),
                        b32(hashlib.sha1(long_key, usedforsecurity=False).digest())]
        self.issued_at: dict[str, list[float]] = {vm: [] for vm in self.vms}  # when each of receipts was
        # per VM: a receipt a reverted guest's (or a clone's) disk may hold (sent by its next request, mostly)
        self.rewound: dict[str, str] = {}
        # per VM: (receipt presented, request id) of each request that presented its own valid receipt
        self.moves: dict[str, list[tuple[str, str | None]]] = {vm: [] for vm in self.vms}
        self.snapshots: dict[str, list[float]] = {vm: [] for vm in self.vms}
        # reverts done but not yet reported: (vm, type, state time, receipt its disk went back
        # to), reported as a polling relay does, at the time it sees them, when its guest may
        # already have spoken
        self.polled: list[tuple[str, str, float, str | None]] = []
        self.twin: Api | None = None
        self.model.refuse = self.settings["receipt_reaction"] == "refuse"

    async def start(self) -> None:
        settings = self.make_settings(**self.settings)
        self.api = await start_api(settings, self.clock)
        self.twin = await start_api(settings, self.clock)

    async def stop(self) -> None:
        for a in (self.api, self.twin):
            if a is not None:
                await a.client.close()
        self.api = self.twin = None

    async def restart(self) -> None:
        await self.stop()
        self.settings = pick_settings(self.rng)
        m = self.model
        m.threshold, m.lock_period = self.settings["lockout_threshold"], self.settings["lockout_period_s"]
        m.refuse = self.settings["receipt_reaction"] == "refuse"
        m.drift, m.look_ahead, m.max_ttl = (self.settings["totp_drift_steps"], self.settings["hotp_look_ahead"],
                                            self.settings["nonce_max_ttl_s"])
        await self.start()
        self.log.append(f"restart {self.settings}")

    # --- admin ----------------------------------------------------------------------
    async def enroll(self) -> None:
        assert self.api is not None
        p = self.rng.choice(self.principals)
        kind = self.rng.choice(["totp", "totp", "hotp"])
        secret = self.rng.choice(self.secrets)
        digits = self.rng.choice([6, 6, 7, 8])
        period = self.rng.choice([30, 30, 60]) if kind == "totp" else 30
        alg = self.rng.choice(["SHA1", "SHA1", "SHA256", "SHA512"])
        data = await self.api.enroll(p, type=kind, secret=secret, digits=digits, period=period, algorithm=alg)
        self.model.tokens.append(Tok(data["token_id"], p, kind, secret, digits, period, alg))
        self.log.append(f"enroll {p} {kind} s{self.secrets.index(secret)} d{digits} P{period} {alg}")
        await asyncio.sleep(0.05)  # the twin hears the announcement

    async def delete(self) -> None:
        await super().delete()
        await asyncio.sleep(0.05)  # the twin hears the announcement

    async def event(self) -> None:
        assert self.api is not None
        if self.polled:
            vm, kind, t, held_then = self.polled.pop(0)
            await self.report(vm, kind, t, self.now)
            if held_then is not None and self.rng.random() < 0.5:  # reverted once more, unreported
                self.rewound[vm] = held_then
            return
        vm = self.rng.choice(self.sources)
        if self.rng.random() < 0.2:
            await self.clone(vm)
            return
        if not self.snapshots[vm] or self.rng.random() < 0.5:
            body = {"event_id": uid("evt"), "type": "snapshot.created", "vm_id": vm, "snapshot_id": uid("snap"),
                    "snapshot_created_at": self.now, "occurred_at": self.now}
            self.snapshots[vm].append(self.now)
            what = f"snapshot {vm}"
        else:
            t = self.rng.choice(self.snapshots[vm])
            kind = self.rng.choice(["snapshot.reverted", "vm.restored"])
            held = [r for r, at in zip(self.receipts[vm], self.issued_at[vm], strict=True) if at < t]
            if held:  # the one held at t, mostly; an older one (a revert further back) too
                self.rewound[vm] = held[-1] if self.rng.random() < 0.7 else self.rng.choice(held)
            if self.rng.random() < 0.2:
                self.polled.append((vm, kind, t, self.rewound.get(vm)))
                self.log.append(f"{kind} {vm} to {t:.0f}, reported when seen")
                return
            await self.report(vm, kind, t, self.now - self.rng.choice([0, 0, 3, 40, 400]))  # reports arrive late too
            return
        status, answer = await self.api.post("/v1/hypervisor/events", body, role="hypervisor")
        assert status == 202, answer
        self.log.append(what)

    async def report(self, vm: str, kind: str, t: float, occurred: float) -> None:
        """Reports a revert or restore of ``vm`` to the state of ``t``, as happened at ``occurred``."""
        assert self.api is not None
        body = {"event_id": uid("evt"), "type": kind, "vm_id": vm, "snapshot_id": uid("snap"),
                "snapshot_created_at": t, "occurred_at": occurred}
        self.model.windows.append((vm, t if t <= occurred else None, occurred))
        self.model.reverted(vm, t if t <= occurred else None, occurred)
        if self.model.refuse:  # a reported revert or restore refuses the VM until it is cleared
            self.model.vms.setdefault(vm, Vm()).refusing = True
        status, answer = await self.api.post("/v1/hypervisor/events", body, role="hypervisor")
        assert status == 202, answer
        self.log.append(f"{kind} {vm} to {t:.0f} at {occurred:.0f}")

    async def clone(self, source: str) -> None:
        """A clone of ``source`` into a new VM, as of one of its snapshots or of an unknown
        time; its guest presents, mostly, a receipt of the source its disk holds. Clones are
        never the subject of events, so no window reaches them through their lineage."""
        assert self.api is not None
        clone = uid("clone")
        t = self.rng.choice([*self.snapshots[source], None])
        occurred = self.now - self.rng.choice([0, 0, 3, 40])
        body: dict[str, Any] = {"event_id": uid("evt"), "type": "vm.cloned", "vm_id": clone,
                                "source_vm_id": source, "occurred_at": occurred}
        if t is not None:
            body["snapshot_created_at"] = t
        state = t if t is not None and t <= occurred else None
        status, answer = await self.api.post("/v1/hypervisor/events", body, role="hypervisor")
        assert status == 202, answer
        self.model.windows.append((source, state, occurred))
        self.model.cloned(clone, source, state, occurred)
        bound = occurred if state is None else state
        held = [r for r, at in zip(self.receipts[source], self.issued_at[source], strict=True) if at <= bound]
        pick = self.rng.random()  # the one held at the state, mostly; an older one, or any, too
        pool = held if pick < 0.75 else self.receipts[source]
        if pool:
            self.rewound[clone] = pool[-1] if pick < 0.5 else self.rng.choice(pool)
        self.vms.append(clone)
        for per_vm in (self.receipts, self.issued_at, self.moves, self.snapshots):
            per_vm[clone] = []
        self.model.vms.setdefault(clone, Vm()).refusing = self.model.refuse
        self.log.append(f"clone {source} to {clone} as of {state} at {occurred:.0f}")

    async def clear(self) -> None:
        vm = self.rng.choice(self.vms)
        if await self.admin(f"/v1/vms/{vm}/clear"):
            self.model.vms.setdefault(vm, Vm()).refusing = False
            self.log.append(f"clear {vm}")

    async def purge(self) -> None:
        assert self.api is not None
        while await purge_expired(self.api.runtime.pool, int(self.now * 1e6), limit=1000) > 0:
            pass
        self.model.max_now = max(self.model.max_now, self.now)
        self.log.append("purge")

    # --- requests -----------------------------------------------------------------------
    def pick_receipt(self, vm: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The body fields and the model's view of them."""
        own, rng = self.receipts[vm], self.rng
        choice = rng.random()
        request = uid("req-") + "x" * 16 if rng.random() < 0.7 else None
        extra: dict[str, Any] = {}
        if request is not None:
            extra["receipt_request"] = request
        if vm in self.rewound and rng.random() < 0.8:
            held = self.rewound.pop(vm)
            v, s = claims(held)
            return {"receipt": held, **extra}, {"kind": "valid", "vm": v, "seq": s, "request": request}
        if choice < 0.06:
            return {"receipt": "rg1.AAAA.BBBB", **extra}, {"kind": "forged", "request": request}
        if choice < 0.12:
            others = [r for v, rs in self.receipts.items() if v != vm for r in rs]
            if others:
                r = rng.choice(others)
                v, s = claims(r)
                return {"receipt": r, **extra}, {"kind": "valid", "vm": v, "seq": s, "request": request}
        if choice < 0.22 and self.moves[vm]:
            # a lost-answer claim: the last moving request's receipt and id (right), or an older one (wrong)
            receipt, rid = self.moves[vm][-1] if rng.random() < 0.7 else rng.choice(self.moves[vm])
            unanswered = rid if rid is not None and rng.random() < 0.8 else uid("req-") + "y" * 16
            v, s = claims(receipt)
            return ({"receipt": receipt, "receipt_unanswered": unanswered, **extra},
                    {"kind": "valid", "vm": v, "seq": s, "request": request, "unanswered": unanswered})
        if not own or choice < 0.27:
            if choice < 0.25:
                return {"receipt_kept": True, **extra}, {"kind": "missing", "request": request}
            return dict(extra), {"kind": "absent", "request": request}
        r = rng.choice(own) if choice < 0.35 else own[-1]
        v, s = claims(r)
        return {"receipt": r, **extra}, {"kind": "valid", "vm": v, "seq": s, "request": request}

    def pick_code(self, p: str) -> str:
        toks = [t for t in self.model.tokens if t.principal == p] or self.model.tokens
        if not toks or self.rng.random() < 0.08:
            return "".join(self.rng.choice("0123456789") for _ in range(self.rng.choice([6, 7, 8])))
        tok = self.rng.choice(toks)
        if tok.type == "totp":
            step = int(self.now // tok.period) + self.rng.choice([-2, -1, -1, 0, 0, 0, 0, 0, 1, 1, 2])
        else:
            h = self.model.high.get(tok.cred, -1)
            la = self.model.look_ahead
            step = max(0, h + self.rng.choice([-la, -2, -1, 0, 1, 1, 1, 1, 2, la, la + 1]))
        code = tok.code(step)
        if self.rng.random() < 0.2:  # the same counter under another token of the same key and digits
            code = code[-6:] if tok.digits > 6 and self.rng.random() < 0.5 else code
        return code

    def prepare_verify(self) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], Verdict], str, str]:
        p, vm = self.rng.choice(self.principals), self.rng.choice(self.vms)
        code = self.pick_code(p)
        fields, r = self.pick_receipt(vm)
        body: dict[str, Any] = {"vm_id": vm, "principal": p, "otp": code, **fields}
        now, seen = self.now, dict(self.model.high)

        def expect(answer: dict[str, Any]) -> Verdict:
            return self.model.otp(vm, p, code, r, now, answer["seq"], seen, answer["reason"])
        return "/v1/otp/verify", body, expect, f"otp {vm} {p} {code} {r}", p

    def prepare_consume(self) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], Verdict], str, str]:
        vm, scope = self.rng.choice(self.vms), self.rng.choice(self.scopes)
        nonce = f"n{self.rng.randrange(40)}"
        max_ttl = self.settings["nonce_max_ttl_s"]
        ttl = min(max_ttl, self.rng.choice([1, 30, 300, 3600, 86400]))
        issued = self.rng.choice([None, None, self.now, self.now - 20, self.now - 400, self.now + 50])
        fields, r = self.pick_receipt(vm)
        body: dict[str, Any] = {"vm_id": vm, "scope": scope, "nonce": nonce, "ttl_s": ttl, **fields}
        if issued is not None:
            body["issued_at"] = issued
        now = self.now

        def expect(answer: dict[str, Any]) -> Verdict:
            return self.model.nonce(vm, scope, nonce, ttl, issued, r, now, answer["seq"])
        return "/v1/nonces/consume", body, expect, f"nonce {vm} {scope} {nonce} ttl={ttl} issued={issued} {r}", ""

    def hotp_principal(self, p: str) -> bool:
        return any(t.type == "hotp" for t in self.model.active(p))

    async def send(self, n: int, burst: bool = False) -> None:
        assert self.api is not None and self.twin is not None
        if burst:
            one = self.prepare_verify() if self.rng.random() < 0.5 else self.prepare_consume()
            prepared = [one] * n
        else:
            prepared = [self.prepare_verify() if self.rng.random() < 0.5 else self.prepare_consume() for _ in range(n)]
        targets = []
        for _, _, _, _, p in prepared:
            # HOTP matching starts from each instance's cached counter: keep those on one instance
            use_twin = burst and not (p and self.hotp_principal(p)) and self.rng.random() < 0.5
            targets.append(self.twin if use_twin else self.api)
        answers = await asyncio.gather(*(t.post(path, body) for t, (path, body, _, _, _) in zip(targets, prepared,
                                                                                                  strict=True)))
        done = []
        for (_path, body, expect, what, _), (status, answer) in zip(prepared, answers, strict=True):
            assert status == 200, (what, answer)
            done.append((answer["seq"], expect, what, answer, body))
        tag = "[burst] " if burst else "[batch] " if n > 1 else ""
        for _, expect, what, answer, body in sorted(done, key=lambda d: d[0]):
            self.record(tag + what, answer, expect(answer), body)

    def record(self, what: str, answer: dict[str, Any], expect: Verdict, body: dict[str, Any]) -> None:
        vm = body["vm_id"]
        self.receipts[vm].append(answer["receipt"])
        self.issued_at[vm].append(self.now)
        r = body.get("receipt")
        if r is not None and not r.startswith("rg1.AAAA"):  # its own receipt or another VM's
            self.moves[vm].append((r, body.get("receipt_request")))
        self.check(vm, what, answer, expect)

    async def move_clock(self) -> None:
        r = self.rng.random()
        if r < 0.6:
            move = self.rng.choice([1, 5, 15, 29, 30, 31, 60, 100])
        elif r < 0.75:
            move = -self.rng.choice([5, 20, 40, 100])
        elif r < 0.9:
            move = self.rng.choice([3600, 86400, 8 * 86400])
        else:
            move = -self.rng.choice([3600, 86400])
        self.clock.advance(move)
        self.log.append(f"clock {move:+}")

    async def step(self) -> None:
        await self.step_among([
            (0.07, self.enroll), (0.09, self.delete), (0.105, self.unlock), (0.11, self.clear),
            (0.20, self.move_clock), (0.22, self.purge), (0.235, self.restart), (0.27, self.event),
            (0.32, lambda: self.send(self.rng.choice([2, 3, 4]), burst=True)),
            (0.37, lambda: self.send(self.rng.choice([2, 3, 4])))], lambda: self.send(1))


async def double_accepts(api: Api) -> list[Any]:
    async with api.runtime.pool.acquire() as conn:
        return list(await conn.fetch(
            "SELECT cred_digest, count(*) FROM ledger WHERE decision = 'accept' GROUP BY cred_digest"
            " HAVING count(*) > 1"))


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_service_agrees_with_the_model_under_changing_settings(seed: int,
                                                                     make_settings: Callable[..., Settings]) -> None:
    """STEPS random steps (see the module docstring) per seed: every answer is the model's,
    and the ledger holds no credential digest accepted twice."""
    clock = FakeClock(1_790_000_000.0 + seed * 13)
    driver = Driver(random.Random(seed), make_settings, clock)
    await driver.start()
    try:
        for _ in range(STEPS):
            await driver.step()
        assert driver.api is not None
        assert await double_accepts(driver.api) == []
    finally:
        await driver.stop()

