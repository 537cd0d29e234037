"""The decision service: verify an OTP or consume a nonce, exactly once, durably.

It matches codes with the pure core, reduces credentials to keyed digests, and hands one
item to the group-commit appender; the ledger decides. Redis may answer a known replay
or a locked-out principal first, but only with a reject, and the record of that reject is
still written behind it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from .appender import Appender, Outcome
from .cache import HotCache, HotHit
from .core import otp, receipts
from .core.continuity import nonce_before_recovery
from .core.credentials import nonce_digest, otp_digest
from .core.decisions import DecisionResult, Flag, Reason, Verdict
from .core.receipts import ReceiptCheck, ReceiptClaims, ReceiptStatus
from .core.validation import NonceRequest, OtpRequest
from .keys import Keys
from .tokens import OtpToken, TokenStore

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
# The ledger's words to their enum members (a dict lookup; calling the enum is ten times slower).
_VERDICTS: dict[str, Verdict] = {member.value: member for member in Verdict}
_REASONS: dict[str, Reason] = {member.value: member for member in Reason}
_FLAGS: dict[str, Flag] = {member.value: member for member in Flag}


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    drift_steps: int
    hotp_look_ahead: int
    use_retention_s: int
    nonce_max_ttl_s: int


@dataclass(frozen=True, slots=True)
class Match:
    token: OtpToken | None
    counters: tuple[int, ...]


def match_code(tokens: list[OtpToken], code: str, now_s: float, config: DecisionConfig) -> Match:
    """Which token (and which steps or counters of it) a presented code matches."""
    for token in tokens:
        if token.type == "totp":
            found = otp.totp_matches(token.secret_b32, code, now_s=now_s, drift=config.drift_steps,
                                     period=token.period, digits=token.digits, algorithm=token.algorithm)
        else:
            found = otp.hotp_matches(token.secret_b32, code, last_counter=token.last_counter,
                                     look_ahead=config.hotp_look_ahead, digits=token.digits,
                                     algorithm=token.algorithm)
        if found:
            return Match(token, tuple(found))
    return Match(tokens[0] if tokens else None, ())


def nonce_expired(req: NonceRequest, now_s: float) -> bool:
    """A nonce whose ``issued_at`` is older than its ttl is refused, remembered or not."""
    return req.issued_at is not None and req.issued_at.timestamp() + req.ttl_s < now_s


def nonce_expiry_us(req: NonceRequest, now_s: float, max_ttl_s: int) -> int:
    """How long the ledger must remember a nonce so that forgetting it lets nothing in."""
    if req.issued_at is None:
        return int((now_s + max(req.ttl_s, max_ttl_s)) * 1e6)
    return int((max(req.issued_at.timestamp(), now_s) + req.ttl_s + 60) * 1e6)


def _receipt_fields(check: ReceiptCheck) -> dict[str, Any]:
    fields: dict[str, Any] = {"rc": check.status.value}
    if check.claims is not None:
        fields.update(rvm=check.claims.vm_id, rseq=check.claims.seq)
    return fields


def clock_guard_scope(pepper: bytes) -> str:
    """Names this deployment's clock high-water: instances sharing keys share one clock guard."""
    return hashlib.sha256(b"replayguard-clock-guard\x00" + pepper).hexdigest()[:32]


def hot_reply_allowed(hit: HotHit, vm_id: str, check: ReceiptCheck) -> bool:
    """Whether a Redis hit may answer without PostgreSQL (it could not change the answer).

    Only a replay on the VM of the first use, whose epoch has not moved since (no rollback
    window could apply), with no receipt or the VM's current one (nothing to detect).
    """
    if hit.first_vm != vm_id or hit.first_epoch != hit.vm_epoch:
        return False
    if check.status is ReceiptStatus.ABSENT:
        return True
    claims = check.claims
    return (check.status is ReceiptStatus.VALID and claims is not None
            and claims.vm_id == vm_id and claims.seq >= hit.vm_rseq)


class DecisionService:
    def __init__(
        self, *, appender: Appender, tokens: TokenStore, keys: Keys, config: DecisionConfig,
        clock: Clock, hot: HotCache | None = None,
        on_decision: Callable[[str, DecisionResult, str], None] | None = None,
    ) -> None:
        self._appender = appender
        self._tokens = tokens
        self._keys = keys
        self._config = config
        self._clock = clock
        self._hot = hot
        self._on_decision = on_decision or (lambda kind, result, source: None)
        self._clock_scope = clock_guard_scope(keys.pepper)
        self._recovered_at_us: int | None = None

    def set_recovered_at(self, ts_us: int | None) -> None:
        """The time of the latest recorded ledger recovery (``continuity``): nonces it may
        have forgotten are refused (``core.continuity.nonce_before_recovery``)."""
        self._recovered_at_us = ts_us

    async def verify_otp(self, req: OtpRequest) -> DecisionResult:
        now = self._clock()
        now_us = int(now * 1e6)
        check = receipts.check(self._keys.receipt, req.receipt, req.receipt_kept)
        item: dict[str, Any] = {"k": "otp", "ts": now_us, "vm": req.vm_id, "sub": req.principal,
                                "p": {"context": req.context}, **_receipt_fields(check)}
        match = await self._match(req.principal, req.otp, now)
        digests: list[bytes] = []
        if match.token is None:
            item["pre"] = Reason.NO_TOKEN.value
        else:
            digests = self._otp_fields(item, match, now_us)
        hot = await self._hot_answer(item, digests if len(digests) == 1 else [], check, req.principal, now_us)
        if hot is not None:
            return self._hot_reject(item, hot, req.receipt)
        outcome = await self._appender.submit(item)
        if outcome.verdict == Verdict.ACCEPT.value and match.token is not None:
            self._tokens.advanced(req.principal, match.token.id, max(match.counters))
        # The ledger accepts the smallest step ahead of the high-water mark; with a single
        # candidate that is the digest Redis must remember.
        accepted = digests[0] if outcome.verdict == Verdict.ACCEPT.value and len(digests) == 1 else None
        await self._mirror(req.vm_id, outcome, accepted, now_us, req.principal)
        return self._result("otp", outcome, req.vm_id)

    async def _match(self, principal: str, code: str, now: float) -> Match:
        """Matches against cached tokens first; a miss is checked against a fresh read,
        unless one confirmed a miss of the same principal's TOTP tokens just before."""
        tokens, cached = await self._tokens.active(principal)
        match = match_code(tokens, code, now, self._config)
        if match.counters:
            return match
        if cached:
            if not self._tokens.worth_rereading(principal, tokens):
                return match
            tokens, _ = await self._tokens.active(principal, fresh=True)
            match = match_code(tokens, code, now, self._config)
        if not match.counters:
            self._tokens.miss_confirmed(principal)
        return match

    def _otp_fields(self, item: dict[str, Any], match: Match, now_us: int) -> list[bytes]:
        assert match.token is not None
        digests = {c: otp_digest(self._keys.pepper, match.token.id, c) for c in match.counters}
        item.update(tok=match.token.id, steps=list(match.counters),
                    dg={str(c): d.hex() for c, d in digests.items()},
                    exp=now_us + self._config.use_retention_s * 1_000_000)
        if match.token.type == "totp":  # the host clock guard (rg_clock_floor)
            item.update(tp=match.token.period, dr=self._config.drift_steps, cg=self._clock_scope)
        return list(digests.values())

    async def consume_nonce(self, req: NonceRequest) -> DecisionResult:
        now = self._clock()
        now_us = int(now * 1e6)
        check = receipts.check(self._keys.receipt, req.receipt, req.receipt_kept)
        digest = nonce_digest(self._keys.pepper, req.scope, req.nonce)
        item: dict[str, Any] = {"k": "nonce", "ts": now_us, "vm": req.vm_id, "sub": req.scope,
                                "d": digest.hex(), "p": {"ttl_s": req.ttl_s},
                                "exp": nonce_expiry_us(req, now, self._config.nonce_max_ttl_s),
                                **_receipt_fields(check)}
        if nonce_expired(req, now):
            item["pre"] = Reason.EXPIRED.value
        elif nonce_before_recovery(req.issued_at, now, self._recovered_at_us, self._config.nonce_max_ttl_s):
            item["pre"] = Reason.REUSED.value
        hot = await self._hot_answer(item, [digest], check, None, now_us)
        if hot is not None:
            return self._hot_reject(item, hot, req.receipt)
        outcome = await self._appender.submit(item)
        accepted = digest if outcome.verdict == Verdict.ACCEPT.value else None
        await self._mirror(req.vm_id, outcome, accepted, now_us, None, ttl_us=item["exp"] - now_us)
        return self._result("nonce", outcome, req.vm_id)

    async def _hot_answer(
        self, item: dict[str, Any], digests: list[bytes], check: ReceiptCheck,
        principal: str | None, now_us: int,
    ) -> Reason | None:
        """The reject Redis can give without PostgreSQL, if any (one round trip)."""
        if self._hot is None or "pre" in item or not self._appender.can_defer():
            return None
        lock_principal = principal if check.status is ReceiptStatus.ABSENT else None
        if not digests and lock_principal is None:
            return None
        found = await self._hot.lookup(digests, item["vm"], lock_principal)
        if not self._appender.can_defer():
            return None  # the backlog filled while Redis answered: wait for the ledger instead
        if found.locked_until_us > now_us:
            return Reason.LOCKED_OUT
        if found.hit is not None and hot_reply_allowed(found.hit, item["vm"], check):
            return Reason.REUSED
        return None

    def _hot_reject(self, item: dict[str, Any], reason: Reason, receipt: str | None) -> DecisionResult:
        """Answers a reject from Redis and queues its ledger record behind the answer.

        The VM's receipt position does not move, so the guest's current receipt (the one
        it presented, already checked to be current) stays the one to keep.
        """
        self._appender.submit_later({**item, "hot": True, "pre": reason.value})
        result = DecisionResult(Verdict.REJECT, reason, (), None, receipt)
        self._on_decision(item["k"], result, "redis")
        return result

    async def _mirror(self, vm_id: str, outcome: Outcome, digest: bytes | None, now_us: int,
                      principal: str | None, ttl_us: int | None = None) -> None:
        if self._hot is None:
            return
        ttl_s = None if ttl_us is None else max(1, ttl_us // 1_000_000)
        # The VM's state is written as the ledger left it: after a rollback or clone its new
        # epoch is what invalidates every earlier use the hot path could have answered.
        await self._hot.record(vm_id=vm_id, epoch=outcome.epoch, rseq=outcome.receipt_position,
                               digest=digest, seq=outcome.seq, ttl_s=ttl_s)
        if outcome.locked_until_us is not None and principal is not None:
            await self._hot.set_lock(principal, outcome.locked_until_us, now_us)
        if outcome.alert_id is not None:
            await self._hot.publish_alert(outcome.alert_id)

    def _result(self, kind: str, outcome: Outcome, vm_id: str) -> DecisionResult:
        receipt = receipts.issue(self._keys.receipt, ReceiptClaims(vm_id, outcome.seq, outcome.epoch))
        result = DecisionResult(
            verdict=_VERDICTS[outcome.verdict], reason=_REASONS[outcome.reason],
            flags=tuple(_FLAGS[f] for f in outcome.flags), seq=outcome.seq, receipt=receipt,
            alert_id=None if outcome.alert_id is None else str(outcome.alert_id),
        )
        self._on_decision(kind, result, "ledger")
        return result
