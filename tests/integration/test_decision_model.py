"""Differential run: the service (one instance, default settings but for the lockout, drift
and look-ahead below) and the contract model (decision_model.py) answer the same random
sequences of OTP verifications, nonce consumptions, enrolments, deletions, unlocks,
receipts (current, old, foreign, forged) and clock moves; every answer must agree, and the
model never accepts one credential step or nonce twice. test_decision_fuzz.py drives the
same model through far more (settings, restarts, purges, events, refuse mode)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.settings import Secret, Settings
from tests.conftest import Api, FakeClock
from tests.integration.decision_driver import ModelDriver
from tests.integration.decision_model import Model, Tok, Verdict, claims

THRESHOLD, LOCK_S, DRIFT, LOOK_AHEAD = 3, 90, 1, 5
MAX_TTL = Settings.nonce_max_ttl_s  # the default


class Driver(ModelDriver):
    def __init__(self, api: Api, rng: random.Random) -> None:
        super().__init__(rng, Model(THRESHOLD, LOCK_S, DRIFT, LOOK_AHEAD, MAX_TTL), api.clock)
        self.api = api
        self.secrets = [pyotp.random_base32() for _ in range(3)]
        self.clock_back = False
        self.batches = False

    async def enroll(self) -> None:
        p = self.rng.choice(self.principals)
        kind = self.rng.choice(["totp", "totp", "hotp"])
        secret = self.rng.choice(self.secrets)
        digits = self.rng.choice([6, 6, 8])
        period = self.rng.choice([30, 30, 60]) if kind == "totp" else 30
        assert self.api is not None
        data = await self.api.enroll(p, type=kind, secret=secret, digits=digits, period=period)
        self.model.tokens.append(Tok(data["token_id"], p, kind, secret, digits, period, "SHA1"))  # the default
        self.log.append(f"enroll {p} {kind} s{self.secrets.index(secret)} d{digits} P{period}")

    def pick_receipt(self, vm: str) -> tuple[str | None, dict[str, Any]]:
        """The receipt to send (None: none) and the model's view of it."""
        own = self.receipts[vm]
        choice = self.rng.random()
        if choice < 0.08:
            return "rg1.AAAA.BBBB", {"kind": "forged"}
        if choice < 0.16:
            others = [r for v, rs in self.receipts.items() if v != vm for r in rs]
            if others:
                r = self.rng.choice(others)
                return r, self.valid(r)
        if not own:
            return None, {"kind": "absent"}
        r = self.rng.choice(own) if choice < 0.28 else own[-1]
        return r, self.valid(r)

    @staticmethod
    def valid(receipt: str) -> dict[str, Any]:
        vm, seq = claims(receipt)
        return {"kind": "valid", "vm": vm, "seq": seq}

    def pick_code(self, p: str) -> str:
        toks = [t for t in self.model.tokens if t.principal == p] or self.model.tokens
        if not toks or self.rng.random() < 0.2:
            return "".join(self.rng.choice("0123456789") for _ in range(self.rng.choice([6, 8])))
        tok = self.rng.choice(toks)
        if tok.type == "totp":
            step = int(self.now // tok.period) + self.rng.choice([-2, -1, -1, 0, 0, 0, 1, 2])
        else:
            h = self.model.high.get(tok.cred, -1)
            step = max(0, h + self.rng.choice([-2, -1, 0, 1, 1, 1, 2, LOOK_AHEAD, LOOK_AHEAD + 1]))
        return tok.code(step)

    def prepare_verify(self) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], Verdict], str]:
        p, vm = self.rng.choice(self.principals), self.rng.choice(self.vms)
        code = self.pick_code(p)
        receipt, r = self.pick_receipt(vm)
        body: dict[str, Any] = {"vm_id": vm, "principal": p, "otp": code}
        if receipt is not None:
            body["receipt"] = receipt
        now, seen = self.now, dict(self.model.high)

        def expect(answer: dict[str, Any]) -> Verdict:
            return self.model.otp(vm, p, code, r, now, answer["seq"], seen)
        return "/v1/otp/verify", body, expect, f"otp {vm} {p} {code} {r['kind']}"

    def prepare_consume(self) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], Verdict], str]:
        vm, scope = self.rng.choice(self.vms), self.rng.choice(self.scopes)
        nonce = f"n{self.rng.randrange(6)}"
        ttl = self.rng.choice([1, 30, 300])
        issued = self.rng.choice([None, self.now, self.now - 20, self.now - 400, self.now + 50])
        receipt, r = self.pick_receipt(vm)
        body: dict[str, Any] = {"vm_id": vm, "scope": scope, "nonce": nonce, "ttl_s": ttl}
        if issued is not None:
            body["issued_at"] = issued
        if receipt is not None:
            body["receipt"] = receipt
        now = self.now

        def expect(answer: dict[str, Any]) -> Verdict:
            return self.model.nonce(vm, scope, nonce, ttl, issued, r, now, answer["seq"])
        return "/v1/nonces/consume", body, expect, f"nonce {vm} {scope} {nonce} ttl={ttl} issued={issued} {r['kind']}"

    async def send(self, n: int) -> None:
        assert self.api is not None
        prepared = [self.prepare_verify() if self.rng.random() < 0.5 else self.prepare_consume() for _ in range(n)]
        answers = await asyncio.gather(*(self.api.post(path, body) for path, body, _, _ in prepared))
        done = []
        for (_path, _body, expect, what), (status, answer) in zip(prepared, answers, strict=True):
            assert status == 200, (what, answer)
            done.append((answer["seq"], expect, what, answer))
        for _, expect, what, answer in sorted(done, key=lambda d: d[0]):
            self.record(("[batch] " if n > 1 else "") + what, answer, expect(answer))

    def record(self, what: str, answer: dict[str, Any], expect: Verdict) -> None:
        vm = what.replace("[batch] ", "").split()[1]
        self.receipts[vm].append(answer["receipt"])
        self.check(vm, what, answer, expect)

    async def forward(self) -> None:
        move = self.rng.choice([1, 5, 15, 29, 30, 31, 60, 100])
        self.clock.advance(move)
        self.model.max_now = max(self.model.max_now, self.now)
        self.log.append(f"clock +{move}")

    async def back(self) -> None:
        move = -self.rng.choice([5, 20, 40, 100])
        self.clock.advance(move)
        self.log.append(f"clock {move}")

    async def step(self) -> None:
        await self.step_among([
            (0.08, self.enroll), (0.11, self.delete), (0.14, self.unlock), (0.22, self.forward),
            *([(0.24, self.back)] if self.clock_back else []),
            *([(0.32, lambda: self.send(self.rng.choice([2, 3, 4])))] if self.batches else [])],
            lambda: self.send(1))


@pytest.mark.parametrize("mode", ["plain", "back", "batch", "all"])
@pytest.mark.parametrize("seed", range(int(os.environ.get("RG_DECISION_MODEL_SEEDS", "5"))))
async def test_service_agrees_with_the_contract_model(seed: int, mode: str, fresh_database: Callable[[], Any],
                                                      api_factory: Callable[..., Any]) -> None:
    """300 random steps (enrolments, deletions, unlocks, TOTP and HOTP codes right, wrong,
    early, late and replayed, nonces with their ttl and issued_at, receipts current, old,
    another VM's and forged; the clock moving on, and back in the modes that say so; one
    request at a time or several at once): every answer is the model's, and the model never
    accepts one credential step or nonce twice. More seeds: RG_DECISION_MODEL_SEEDS."""
    clock = FakeClock(1_790_000_000.0 + seed * 7)
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()), lockout_threshold=THRESHOLD,
                                 lockout_period_s=LOCK_S, totp_drift_steps=DRIFT, hotp_look_ahead=LOOK_AHEAD,
                                 nonce_max_ttl_s=MAX_TTL)
    driver = Driver(api, random.Random(seed))
    driver.clock_back, driver.batches = mode in ("back", "all"), mode in ("batch", "all")
    for _ in range(300):
        await driver.step()
