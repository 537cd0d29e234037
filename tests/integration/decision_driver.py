"""What the drivers of the differential tests (test_decision_model.py, test_decision_fuzz.py)
share: the VMs, principals and scopes they pick from, admin actions the contract model
(decision_model.py) mirrors, the check of each answer against the model's, and picking
each step by where a random draw falls."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from tests.conftest import Api, FakeClock, uid
from tests.integration.decision_model import Model, Verdict, settle

Action = Callable[[], Awaitable[None]]


class ModelDriver:
    """Sends random steps to the service (``api``, set by the driver) and holds the model it
    must agree with, the receipts each VM was given and the log shown on a disagreement."""

    def __init__(self, rng: random.Random, model: Model, clock: FakeClock) -> None:
        self.rng, self.model, self.clock = rng, model, clock
        self.api: Api | None = None
        self.principals = [uid(f"p{i}") for i in range(3)]
        self.vms = [uid(f"vm{i}") for i in range(3)]
        self.scopes = [uid("s"), uid("s")]
        self.receipts: dict[str, list[str]] = {vm: [] for vm in self.vms}
        self.log: list[str] = []

    @property
    def now(self) -> float:
        return self.clock.now

    async def step_among(self, actions: list[tuple[float, Action]], otherwise: Action) -> None:
        """Runs the first of ``actions`` whose bound a random draw is under, else ``otherwise``;
        the first action (an enrolment) while the model knows no token."""
        r = self.rng.random()
        if not self.model.tokens:
            r = 0.0
        await next((act for bound, act in actions if r < bound), otherwise)()

    async def admin(self, path: str) -> bool:
        """POSTs an admin action with a note: True when done, False when the service does
        not know its subject yet (404)."""
        assert self.api is not None
        status, body = await self.api.post(path, {"note": "x"}, role="admin")
        assert status in (200, 404), body
        return status == 200

    async def delete(self) -> None:
        assert self.api is not None
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
        if await self.admin(f"/v1/principals/{p}/unlock"):
            self.model.unlock(p)
            self.log.append(f"unlock {p}")

    def check(self, vm: str, what: str, answer: dict[str, Any], expect: Verdict) -> None:
        """The service's answer to ``what`` is the model's ``expect`` (``Model.otp`` or
        ``Model.nonce``), and what it accepted the model never accepted before."""
        got, want = settle(answer, expect)
        self.log.append(f"t={self.now:.0f} seq={answer['seq']} {what} -> {got}")
        assert isinstance(answer["seq"], int)
        if got != want:
            tail = "\n".join(self.log[-50:])
            raise AssertionError(f"{vm}: service {got} != contract {want}\n{tail}")
        self.model.spend(expect[3])
