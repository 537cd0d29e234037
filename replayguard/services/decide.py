"""The decision service: verify an OTP or consume a nonce, exactly once, durably.

It matches codes (``core.otp.match_code``) and applies the nonce time rules
(``core.nonces``) with the pure core, reduces credentials to keyed digests, and hands one
item to the group-commit appender; the ledger decides. Every answer, accept or refusal,
is ``rg_decide``'s: nothing read from Redis (or any other cache shared between processes)
takes part in a decision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..core import receipts
from ..core.continuity import nonce_before_recovery
from ..core.credentials import nonce_digest, otp_digest, receipt_request_digest
from ..core.decide_item import DecideItem
from ..core.decisions import DecisionResult, Reason, Verdict
from ..core.nonces import nonce_expired, nonce_expiry_us
from ..core.otp import Match, OtpToken, match_code, use_expiry_us
from ..core.receipts import ReceiptCheck, ReceiptClaims, ReceiptKeys
from ..core.validation import NonceRequest, OtpRequest
from ..errors import Forbidden
from ..fanout import AlertFanout
from ..keys import Keys
from ..pg.appender import Appender, Outcome
from .apitokens import Caller
from .tokens import TokenStore

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    drift_steps: int
    hotp_look_ahead: int
    use_retention_s: int
    nonce_max_ttl_s: int


def _receipt_fields(check: ReceiptCheck, pepper: bytes, req: OtpRequest | NonceRequest) -> dict[str, Any]:
    """The DecideItem fields that carry what the receipt check found, and the caller's
    request ids (digests) that tell a lost answer from a disk gone back."""
    fields: dict[str, Any] = {"receipt": check.status}
    if check.claims is not None:
        fields.update(receipt_vm_id=check.claims.vm_id, receipt_seq=check.claims.seq)
    if req.receipt_request is not None:
        fields["receipt_request"] = receipt_request_digest(pepper, req.vm_id, req.receipt_request)
    if req.receipt_unanswered is not None:
        fields["receipt_unanswered"] = receipt_request_digest(pepper, req.vm_id, req.receipt_unanswered)
    return fields


def clock_guard_scope(pepper: bytes) -> str:
    """Names this deployment's clock high-water: instances sharing keys share one clock guard."""
    return hashlib.sha256(b"replayguard-clock-guard\x00" + pepper).hexdigest()[:32]


def check_binding(caller: Caller | None, vm_id: str, check: ReceiptCheck) -> None:
    """Refuses (403) a caller bound to other VMs, or presenting a receipt of a VM it is
    not bound to: such a receipt is never used against the VM it names."""
    if caller is None:
        return
    if not caller.covers(vm_id):
        raise Forbidden("this token is not bound to that VM", field="vm_id")
    if check.claims is not None and not caller.covers(check.claims.vm_id):
        raise Forbidden("the receipt names a VM this token is not bound to", field="receipt")


class DecisionService:
    def __init__(
        self, *, appender: Appender, tokens: TokenStore, keys: Keys, config: DecisionConfig,
        clock: Clock, fanout: AlertFanout | None = None,
        on_decision: Callable[[str, DecisionResult], None] | None = None,
        receipt_keys: ReceiptKeys | None = None,
        retired_receipt_issued: Callable[[ReceiptClaims], Awaitable[bool]] | None = None,
    ) -> None:
        self._appender = appender
        self._tokens = tokens
        self._keys = keys
        self._config = config
        self._clock = clock
        self._fanout = fanout
        self._on_decision = on_decision or (lambda kind, result: None)
        self._receipt_keys = receipt_keys
        self._retired_receipt_issued = retired_receipt_issued
        self._clock_scope = clock_guard_scope(keys.pepper)
        self._recovered_at_us: int | None = None

    def set_recovered_at(self, ts_us: int | None) -> None:
        """The time of the latest recorded ledger recovery (``continuity``): nonces it may
        have forgotten are refused (``core.continuity.nonce_before_recovery``)."""
        self._recovered_at_us = ts_us

    async def _check_receipt(self, req: OtpRequest | NonceRequest, caller: Caller | None) -> ReceiptCheck:
        """The receipt check, after the caller's binding: a receipt under a retired receipt
        key counts only if the ledger may have issued it (``key_rotation.retired_receipt_issued``);
        otherwise it is a forgery by whoever holds that key, and ``invalid``."""
        check = receipts.check(self._receipt_keys or self._keys.receipt, req.receipt, req.receipt_kept)
        check_binding(caller, req.vm_id, check)
        if check.retired_until is not None and check.claims is not None and (
                self._retired_receipt_issued is None or not await self._retired_receipt_issued(check.claims)):
            return ReceiptCheck(receipts.ReceiptStatus.INVALID)
        return check

    async def verify_otp(self, req: OtpRequest, caller: Caller | None = None) -> DecisionResult:
        check = await self._check_receipt(req, caller)
        now = self._clock()
        now_us = int(now * 1e6)
        match = await self._match(req.principal, req.otp, now)
        item = DecideItem(kind="otp", ts_us=now_us, vm_id=req.vm_id, subject=req.principal,
                          payload={"context": req.context}, **_receipt_fields(check, self._keys.pepper, req),
                          **self._otp_fields(match, now_us))
        outcome = await self._appender.submit(item)
        if outcome.verdict is Verdict.ACCEPT and match.token is not None:
            self._tokens.advanced(req.principal, match.token.credential, max(match.counters))
        return await self._result("otp", outcome, req.vm_id)

    async def _match(self, principal: str, code: str, now: float) -> Match:
        """Matches against cached tokens first; a miss is checked against a fresh read,
        unless one confirmed a miss of the same principal's TOTP tokens just before. A
        match in a list that may have missed a change (read before the LISTEN that hears
        them took effect, or while it was down) is checked against a fresh read too: the
        token it names may be deleted, and the same secret enrolled again."""
        tokens, cached = await self._tokens.active(principal)
        match = self._match_code(tokens, code, now)
        if match.counters and (not cached or self._tokens.current(principal, tokens)):
            return match
        if match.counters:
            tokens, _ = await self._tokens.active(principal, fresh=True)
            match = self._match_code(tokens, code, now)
        elif cached:
            if not self._tokens.worth_rereading(principal, tokens):
                return match
            tokens, _ = await self._tokens.active(principal, fresh=True)
            match = self._match_code(tokens, code, now)
        if not match.counters:
            self._tokens.miss_confirmed(principal)
        return match

    def _match_code(self, tokens: list[OtpToken], code: str, now: float) -> Match:
        return match_code(tokens, code, now_s=now, drift_steps=self._config.drift_steps,
                          look_ahead=self._config.hotp_look_ahead)

    def _otp_fields(self, match: Match, now_us: int) -> dict[str, Any]:
        """The DecideItem fields of a matched code (or the no_token refusal)."""
        token = match.token
        if token is None:
            return {"preset_reason": Reason.NO_TOKEN}
        fields: dict[str, Any] = {
            "token_id": token.id, "credential": token.credential, "steps": match.counters,
            "step_digests": {c: otp_digest(self._keys.pepper, token.credential, c) for c in match.counters},
            "expires_us": use_expiry_us(token, match.counters, now_us=now_us,
                                        retention_s=self._config.use_retention_s,
                                        drift_steps=self._config.drift_steps)}
        if match.replay_only:
            fields["replay_only"] = True
        if token.type == "totp":  # the host clock guard (clock_guard, in rg_decide)
            fields.update(period_s=token.period, drift_steps=self._config.drift_steps, clock_scope=self._clock_scope)
        return fields

    async def consume_nonce(self, req: NonceRequest, caller: Caller | None = None) -> DecisionResult:
        check = await self._check_receipt(req, caller)
        now = self._clock()
        now_us = int(now * 1e6)
        preset = None
        if nonce_expired(req, now):
            preset = Reason.EXPIRED
        elif nonce_before_recovery(req.issued_at, now, self._recovered_at_us, self._config.nonce_max_ttl_s):
            preset = Reason.REUSED  # a nonce the recovered ledger may have forgotten
        item = DecideItem(
            kind="nonce", ts_us=now_us, vm_id=req.vm_id, subject=req.scope, payload={"ttl_s": req.ttl_s},
            digest=nonce_digest(self._keys.pepper, req.scope, req.nonce),
            expires_us=nonce_expiry_us(req, now, self._config.nonce_max_ttl_s),
            preset_reason=preset, **_receipt_fields(check, self._keys.pepper, req))
        outcome = await self._appender.submit(item)
        return await self._result("nonce", outcome, req.vm_id)

    async def _result(self, kind: str, outcome: Outcome, vm_id: str) -> DecisionResult:
        receipt = receipts.issue(self._keys.receipt, ReceiptClaims(vm_id, outcome.seq, outcome.epoch))
        result = DecisionResult(
            verdict=outcome.verdict, reason=outcome.reason, flags=outcome.flags, seq=outcome.seq, receipt=receipt,
            alert_id=None if outcome.alert_id is None else str(outcome.alert_id),
        )
        self._on_decision(kind, result)
        if outcome.alert_id is not None and self._fanout is not None:
            await self._fanout.publish_alert(outcome.alert_id)
        return result
