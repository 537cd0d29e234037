"""The continuity guard's traffic with its witnesses (CONTRACT §10): what each one holds,
read and kept only when this deployment's keys signed it, and the signed checkpoints
pushed to them.

The instance that signs a checkpoint hands it to ``published``, which pushes it to every
witness in a background task (a slow witness never holds a decision) and has the guard
check again; nothing is pushed while the guard knows a rollback (``stopped``), nor to a
witness the last check could not read (what it holds was compared with nothing), so a
restored chain never overtakes what a witness holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..core import checkpoints as cps
from ..core.checkpoints import Checkpoint
from ..core.continuity import Statement, Verdict
from ..core.handover import Signers, handed_over
from .continuity_rollback import DOWN, WitnessState
from .witness import Record, Witness, WitnessUnreachable

log = structlog.get_logger(__name__)


class WitnessExchange:
    def __init__(self, witnesses: list[Witness], states: dict[str, WitnessState], signers: Signers,
                 public: Ed25519PublicKey, stopped: Callable[[], bool],
                 latest_recovery: Callable[[], Statement | None], check: Callable[[], Awaitable[object]]) -> None:
        """``stopped``: whether the guard knows a rollback; ``latest_recovery``: the newest
        recovery statement it read, offered with every checkpoint; ``check``: the guard's
        check, run after every push."""
        self.witnesses, self.states, self.signers, self.public = witnesses, states, signers, public
        self.deployment_id = signers.deployment_id
        self.public_key_pem = cps.public_key_pem(public)
        self._stopped, self._latest_recovery, self._check = stopped, latest_recovery, check
        self._push: asyncio.Task[None] | None = None
        self._pending: Checkpoint | None = None

    # --- reading ------------------------------------------------------------------------

    async def read_all(self) -> list[Record | WitnessUnreachable | None]:
        return await asyncio.gather(*(self._read(w) for w in self.witnesses))

    async def _read(self, witness: Witness) -> Record | WitnessUnreachable | None:
        try:
            record = await asyncio.wait_for(witness.read(), 5.0)
        except WitnessUnreachable as exc:
            return exc
        except TimeoutError:
            return WitnessUnreachable(f"{witness.name}: no answer")
        if record is not None and not self._ours(record):
            return WitnessUnreachable(f"{witness.name} holds a checkpoint not signed by this deployment's key")
        return record

    def _ours(self, record: Record) -> bool:
        """Signed by this deployment's key, or by one it handed over from: a witness not
        offered a checkpoint since the rotation holds one of the retired key, which is
        judged against the ledger like any other (one past the key's span included: it
        can be a genuine checkpoint of a chain a restore abandoned)."""
        signer = self.signers.by_pem(record.public_key_pem)
        if signer is not None:
            return cps.verify(signer.public, record.checkpoint)
        return self._handed_on(record)

    def _handed_on(self, record: Record) -> bool:
        """A checkpoint of a key this process does not know, which the witness took through
        handovers from this process's key (kept with the record): the deployment's key was
        rotated in a ledger this database no longer holds (restored with the keys from
        before the rotation). It is this deployment's, and judged like any other."""
        try:
            public = cps.load_public_key(record.public_key_pem.encode())
        except ValueError:
            return False
        return (handed_over(self.public, public, self.deployment_id, record.handovers)
                and cps.verify(public, record.checkpoint))

    # --- pushing ------------------------------------------------------------------------

    def published(self, cp: Checkpoint) -> None:
        """A new checkpoint was signed: push it to every witness, off the caller's path
        (never while a rollback is known)."""
        if not self.witnesses or self._stopped():
            return
        self._pending = cp if self._pending is None or cp.seq > self._pending.seq else self._pending
        if self._push is None or self._push.done():
            self._push = asyncio.create_task(self._push_pending(), name="witness-push")

    def push_if_lagging(self, latest: Checkpoint) -> None:
        if any(s.up and (s.held is None or s.held.seq < latest.seq or s.verdict is Verdict.COVERED)
               for s in self.states.values()):
            self.published(latest)

    async def _push_pending(self) -> None:
        while self._pending is not None:
            cp, self._pending = self._pending, None
            if self._stopped():
                return
            await self.push(cp)
            with contextlib.suppress(*DOWN):
                await self._check()

    async def push(self, cp: Checkpoint) -> dict[str, str]:
        """Offers ``cp`` (with the latest recovery statement) to every witness the last check
        read; returns each one's answer (an admission, ``unreachable: …``, or ``not pushed:
        …`` for a witness that check could not read)."""
        recovery = self._latest_recovery()
        record = Record(self.deployment_id, self.public_key_pem, cp, recovery, self.signers.handovers)

        async def one(witness: Witness) -> str:
            state = self.states[witness.name]
            if state.up is not True:
                # What it holds was not read at the last check, so nothing compared it with
                # the ledger: a higher seq would replace it there unseen (a restore found
                # by no one). The check that reads it again judges it, then pushes.
                return f"not pushed: not read at the last check ({state.error or 'never read'})"
            try:
                answer = await asyncio.wait_for(witness.put(record), 10.0)
            except (WitnessUnreachable, TimeoutError) as exc:
                self.states[witness.name].up = False
                self.states[witness.name].error = str(exc) or "no answer"
                return f"unreachable: {self.states[witness.name].error}"
            if answer.refused:
                log.error("witness_refused_checkpoint", witness=witness.name, seq=cp.seq, admission=answer.value)
            return answer.value

        answers = await asyncio.gather(*(one(w) for w in self.witnesses))
        return dict(zip((w.name for w in self.witnesses), answers, strict=True))

    async def close(self) -> None:
        if self._push is not None and not self._push.done():
            self._push.cancel()
            await asyncio.wait({self._push})
