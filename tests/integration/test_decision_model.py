"""Differential run: the service and the contract model (model.py) answer the same random
sequences of OTP verifications, nonce consumptions, enrolments, deletions, unlocks,
receipts (current, old, foreign, forged) and clock moves; every answer must agree."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from collections.abc import Callable
from typing import Any

import pyotp
import pytest

from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, uid
from tests.integration.decision_model import Model, Tok

THRESHOLD, LOCK_S, DRIFT, LOOK_AHEAD = 3, 90, 1, 5


def receipt_claims(receipt: str) -> tuple[str, int]:
    payload = receipt.split(".")[1]
    vm, seq, _ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return vm, seq


class Driver:
    def __init__(self, api: Api, rng: random.Random) -> None:
        self.api, self.rng = api, rng
        self.model = Model(THRESHOLD, LOCK_S, DRIFT, LOOK_AHEAD)
        self.principals = [uid(f"p{i}") for i in range(3)]
        self.vms = [uid(f"vm{i}") for i in range(3)]
        self.secrets = [pyotp.random_base32() for _ in range(3)]
        self.receipts: dict[str, list[str]] = {vm: [] for vm in self.vms}
        self.scopes = [uid("s"), uid("s")]
        self.log: list[str] = []
        self.clock_back = False
        self.batches = False

    @property
    def now(self) -> float:
        return self.api.clock.now

    async def enroll(self) -> None:
        p = self.rng.choice(self.principals)
        kind = self.rng.choice(["totp", "totp", "hotp"])
        secret = self.rng.choice(self.secrets)
        digits = self.rng.choice([6, 6, 8])
        period = self.rng.choice([30, 30, 60]) if kind == "totp" else 30
        data = await self.api.enroll(p, type=kind, secret=secret, digits=digits, period=period)
        self.model.tokens.append(Tok(data["token_id"], p, kind, secret, digits, period))
        self.log.append(f"enroll {p} {kind} s{self.secrets.index(secret)} d{digits} P{period}")

    async def delete(self) -> None:
        live = [t for t in self.model.tokens if t.active]
        if not live:
            return
        tok = self.rng.choice(live)
        resp = await self.api.client.delete(f"/v1/principals/{tok.principal}/tokens/{tok.id}",
                                            headers=self.api.auth("admin"))
        assert resp.status == 204
        tok.active = False
        self.log.append(f"delete {tok.principal} {tok.type}")

    async def unlock(self) -> None:
        p = self.rng.choice(self.principals)
        status, body = await self.api.post(f"/v1/principals/{p}/unlock", {"note": "x"}, role="admin")
        if status == 404:
            return
        assert status == 200, body
        self.model.unlock(p)
        self.log.append(f"unlock {p}")

    def pick_receipt(self, vm: str) -> tuple[str | None, tuple[str, str | None, int | None]]:
        own = self.receipts[vm]
        choice = self.rng.random()
        if choice < 0.08:
            return "rg1.AAAA.BBBB", ("forged", None, None)
        if choice < 0.16:
            others = [r for v, rs in self.receipts.items() if v != vm for r in rs]
            if others:
                r = self.rng.choice(others)
                return r, ("valid", *receipt_claims(r))
        if not own:
            return None, ("absent", None, None)
        r = self.rng.choice(own) if choice < 0.28 else own[-1]
        return r, ("valid", *receipt_claims(r))

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

    def prepare_verify(self) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any], str]:
        p, vm = self.rng.choice(self.principals), self.rng.choice(self.vms)
        code = self.pick_code(p)
        receipt, claims = self.pick_receipt(vm)
        body: dict[str, Any] = {"vm_id": vm, "principal": p, "otp": code}
        if receipt is not None:
            body["receipt"] = receipt
        now, seen = self.now, dict(self.model.high)

        def expect(answer: dict[str, Any]) -> Any:
            return self.model.otp(vm, p, code, claims, now, answer["seq"], seen)
        return "/v1/otp/verify", body, expect, f"otp {vm} {p} {code} {claims[0]}"

    def prepare_consume(self) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any], str]:
        vm, scope = self.rng.choice(self.vms), self.rng.choice(self.scopes)
        nonce = f"n{self.rng.randrange(6)}"
        ttl = self.rng.choice([1, 30, 300])
        issued = self.rng.choice([None, self.now, self.now - 20, self.now - 400, self.now + 50])
        receipt, claims = self.pick_receipt(vm)
        body: dict[str, Any] = {"vm_id": vm, "scope": scope, "nonce": nonce, "ttl_s": ttl}
        if issued is not None:
            body["issued_at"] = issued
        if receipt is not None:
            body["receipt"] = receipt
        now = self.now

        def expect(answer: dict[str, Any]) -> Any:
            return self.model.nonce(vm, scope, nonce, ttl, issued, claims, now, answer["seq"])
        return "/v1/nonces/consume", body, expect, f"nonce {vm} {scope} {nonce} ttl={ttl} issued={issued} {claims[0]}"

    async def send(self, n: int) -> None:
        prepared = [self.prepare_verify() if self.rng.random() < 0.5 else self.prepare_consume() for _ in range(n)]
        answers = await asyncio.gather(*(self.api.post(path, body) for path, body, _, _ in prepared))
        done = []
        for (_path, _body, expect, what), (status, answer) in zip(prepared, answers, strict=True):
            assert status == 200, (what, answer)
            done.append((answer["seq"], expect, what, answer))
        for _, expect, what, answer in sorted(done, key=lambda d: d[0]):
            self.record(("[batch] " if n > 1 else "") + what, answer, expect(answer))

    def record(self, what: str, answer: dict[str, Any], expect: tuple[str, str, list[str]]) -> None:
        got = (answer["decision"], answer["reason"], sorted(answer["flags"]))
        want = (expect[0], expect[1], sorted(expect[2]))
        vm = answer_vm = what.replace("[batch] ", "").split()[1]
        self.receipts.setdefault(answer_vm, []).append(answer["receipt"])
        self.log.append(f"t={self.now:.0f} {what} -> {got}")
        assert isinstance(answer["seq"], int)
        if "|" in want[1] and got[1] in want[1].split("|"):
            want = (want[0], got[1], want[2])
        if got != want:
            tail = "\n".join(self.log[-40:])
            raise AssertionError(f"{vm}: service {got} != contract {want}\n{tail}")

    async def step(self) -> None:
        r = self.rng.random()
        if r < 0.08 or not self.model.tokens:
            await self.enroll()
        elif r < 0.11:
            await self.delete()
        elif r < 0.14:
            await self.unlock()
        elif r < 0.22:
            move = self.rng.choice([1, 5, 15, 29, 30, 31, 60, 100])
            self.api.clock.advance(move)
            self.model.max_now = max(self.model.max_now, self.now)
            self.log.append(f"clock +{move}")
        elif r < 0.24 and self.clock_back:
            move = -self.rng.choice([5, 20, 40, 100])
            self.api.clock.advance(move)
            self.log.append(f"clock {move}")
        elif r < 0.32 and self.batches:
            await self.send(self.rng.choice([2, 3, 4]))
        else:
            await self.send(1)


@pytest.mark.parametrize("mode", ["plain", "back", "batch", "all"])
@pytest.mark.parametrize("seed", range(int(os.environ.get("RG_DECISION_MODEL_SEEDS", "5"))))
async def test_service_agrees_with_the_contract_model(seed: int, mode: str, fresh_database: Callable[[], Any],
                                                      api_factory: Callable[..., Any]) -> None:
    """300 random steps (enrolments, deletions, unlocks, TOTP and HOTP codes right, wrong,
    early, late and replayed, nonces with their ttl and issued_at, receipts current, old,
    another VM's and forged; the clock moving on, and back in the modes that say so; one
    request at a time or several at once): every answer is the model's. More seeds:
    RG_DECISION_MODEL_SEEDS."""
    clock = FakeClock(1_790_000_000.0 + seed * 7)
    api: Api = await api_factory(clock, database_url=Secret(await fresh_database()), lockout_threshold=THRESHOLD,
                                 lockout_period_s=LOCK_S, totp_drift_steps=DRIFT, hotp_look_ahead=LOOK_AHEAD)
    driver = Driver(api, random.Random(seed))
    driver.clock_back, driver.batches = mode in ("back", "all"), mode in ("batch", "all")
    for _ in range(300):
        await driver.step()
