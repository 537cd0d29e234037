"""Handing the checkpoint signing key over to a new one, and who may sign what.

Pure. A rotation of the signing key (``replayguard keys rotate --signing``) has the old
key sign a ``Handover``: "after ledger entry ``base_seq`` (hash ``base_hash``), at
``ts_us``, checkpoints are signed by ``new_public`` instead of me, ``old_public``". The
statement goes into the ledger under the hash chain (a ``key_rotation`` entry) and with
every checkpoint offered to a witness, which moves its trust from the key it holds to the
new one only through a chain of handovers that starts at that key (``handed_over``).

``Signers`` is the chain read back: the first key names the deployment (its id is the
deployment id, as without a rotation), and each key signs the checkpoints of its own span
of the ledger: the first up to its handover's ``base_seq``, the next from there on. A
checkpoint of a retired key past its span is no checkpoint of this ledger: the retired key
signed after it was handed over, so it may have leaked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import checkpoints as cps
from . import timefmt
from .checkpoints import Checkpoint
from .continuity import Statement, statement_valid

HANDOVER_DOMAIN = b"replayguard-key-handover-v1"
MAX_HANDOVERS = 64  # handovers a witness record may carry: each costs a verification


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_raw(key: bytes) -> bytes:
    """The raw public key of a raw Ed25519 private key (a signing key file's contents)."""
    return raw_public(Ed25519PrivateKey.from_private_bytes(key).public_key())


def public_of(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True, slots=True)
class Handover:
    """The old key's signed word that the new key signs checkpoints after ``base_seq``."""

    base_seq: int
    base_hash: bytes
    ts_us: int
    old_public: bytes  # raw Ed25519 public keys, 32 bytes each
    new_public: bytes
    signature: bytes

    @property
    def old_key_id(self) -> str:
        return cps.key_id(public_of(self.old_public))

    @property
    def new_key_id(self) -> str:
        return cps.key_id(public_of(self.new_public))


def handover_message(base_seq: int, base_hash: bytes, ts_us: int, old_public: bytes, new_public: bytes) -> bytes:
    return HANDOVER_DOMAIN + (f"\n{base_seq}\n{base_hash.hex()}\n{ts_us}\n{old_public.hex()}\n"
                              f"{new_public.hex()}\n").encode("ascii")


def sign_handover(old: Ed25519PrivateKey, base_seq: int, base_hash: bytes, ts_us: int,
                  new_public: Ed25519PublicKey) -> Handover:
    old_raw, new_raw = raw_public(old.public_key()), raw_public(new_public)
    signature = old.sign(handover_message(base_seq, base_hash, ts_us, old_raw, new_raw))
    return Handover(base_seq, base_hash, ts_us, old_raw, new_raw, signature)


def handover_valid(h: Handover) -> bool:
    """Whether ``h`` was signed by the key it hands over from."""
    try:
        public_of(h.old_public).verify(h.signature, handover_message(h.base_seq, h.base_hash, h.ts_us,
                                                                     h.old_public, h.new_public))
    except (InvalidSignature, ValueError):
        return False
    return True


def handover_json(h: Handover) -> dict[str, object]:
    return {"base_seq": h.base_seq, "base_hash": h.base_hash.hex(), "ts_us": h.ts_us,
            "old_public": h.old_public.hex(), "new_public": h.new_public.hex(),
            "old_key_id": h.old_key_id, "new_key_id": h.new_key_id, "signature": h.signature.hex()}


def handover_from_json(data: object) -> Handover:
    """Parses ``handover_json``'s form (the key ids are derived, not read); raises
    ValueError naming the field at fault."""
    if not isinstance(data, Mapping):
        raise ValueError("a key handover must be a JSON object")
    old, new = cps._hex(data, "old_public", 32), cps._hex(data, "new_public", 32)
    try:
        public_of(old), public_of(new)
    except ValueError:
        raise ValueError("a key handover's public keys must be Ed25519 keys") from None
    return Handover(cps._int(data, "base_seq"), cps._hex(data, "base_hash", 32), cps._int(data, "ts_us"),
                    old, new, cps._hex(data, "signature", 64))


def handovers_from_json(data: object) -> tuple[Handover, ...]:
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) > MAX_HANDOVERS:
        raise ValueError(f"handovers must be a list of at most {MAX_HANDOVERS} key handovers")
    return tuple(handover_from_json(item) for item in data)


@dataclass(frozen=True, slots=True)
class Signer:
    """A signing key and the span of entries whose checkpoints it signs (``last_seq``
    None: the current key, to the end)."""

    public: Ed25519PublicKey
    key_id: str
    first_seq: int
    last_seq: int | None

    def spans(self, seq: int) -> bool:
        return self.first_seq <= seq and (self.last_seq is None or seq <= self.last_seq)


@dataclass(frozen=True, slots=True)
class Signers:
    """The chain of signing keys, oldest first; the last is the current one."""

    chain: tuple[Signer, ...]
    handovers: tuple[Handover, ...] = ()

    @classmethod
    def single(cls, public: Ed25519PublicKey) -> Signers:
        return cls((Signer(public, cps.key_id(public), 0, None),))

    @property
    def current(self) -> Signer:
        return self.chain[-1]

    @property
    def deployment_id(self) -> str:
        """The deployment's name at its witnesses: the id of its first signing key."""
        return self.chain[0].key_id

    @property
    def retired(self) -> tuple[Signer, ...]:
        return self.chain[:-1]

    def by_id(self, key_id: str) -> Signer | None:
        return next((s for s in self.chain if s.key_id == key_id), None)

    def by_pem(self, pem: str) -> Signer | None:
        return next((s for s in self.chain if cps.public_key_pem(s.public).strip() == pem.strip()), None)

    def for_seq(self, seq: int) -> Signer:
        return next(s for s in self.chain if s.spans(seq))

    def signed_in_span(self, cp: Checkpoint) -> bool:
        """Signed by the key whose span holds its entry."""
        signer = self.by_id(cp.key_id)
        return signer is not None and signer.spans(cp.seq) and cps.verify(signer.public, cp)

    def statement_valid(self, st: Statement) -> bool:
        """A recovery statement signed by the key whose span holds its recovery entry."""
        signer = self.by_id(st.key_id)
        return signer is not None and signer.spans(st.recovery_seq) and statement_valid(signer.public, st)


def signers_json(signers: Signers, file_ids: Mapping[bytes, str]) -> list[dict[str, object]]:
    """Each signing key of the chain, oldest first, as ``keys show`` prints it: its id (as
    checkpoints and witnesses name it), its key file's id where ``file_ids`` (by raw public
    key) knows it (as key files and ``key_rotation`` entries name it), its public key, the
    span of entries whose checkpoints it signs (``last_seq`` None: to the end) and when it
    was handed over. Public halves only."""
    found: list[dict[str, object]] = []
    for n, signer in enumerate(signers.chain):
        handover = signers.handovers[n] if n < len(signers.handovers) else None
        found.append({"key_id": signer.key_id, "file_id": file_ids.get(raw_public(signer.public)),
                      "public_key_pem": cps.public_key_pem(signer.public), "first_seq": signer.first_seq,
                      "last_seq": signer.last_seq,
                      "handed_over_at": None if handover is None else timefmt.rfc3339_us(handover.ts_us)})
    return found


def chain_of(handovers: Sequence[Handover], current: Ed25519PublicKey) -> Signers:
    """The chain the handovers make, ending at ``current``; raises ValueError when a
    handover is not signed by the key it hands over from, does not start where the last
    one ended, does not come after it in the ledger, or the last does not end at
    ``current``."""
    if not handovers:
        return Signers.single(current)
    chain: list[Signer] = []
    first = 0
    for n, h in enumerate(handovers):
        if not handover_valid(h):
            raise ValueError(f"key handover {n + 1} is not signed by the key it hands over from")
        if n and (h.old_public != handovers[n - 1].new_public or h.base_seq <= handovers[n - 1].base_seq):
            raise ValueError(f"key handover {n + 1} does not follow the one before it")
        old = public_of(h.old_public)
        chain.append(Signer(old, cps.key_id(old), first, h.base_seq))
        first = h.base_seq + 1
    if handovers[-1].new_public != raw_public(current):
        raise ValueError("the last key handover does not hand over to this key")
    chain.append(Signer(current, cps.key_id(current), first, None))
    return Signers(tuple(chain), tuple(handovers))


def handed_over(held: Ed25519PublicKey, offered: Ed25519PublicKey, deployment_id: str,
                handovers: Sequence[Handover]) -> bool:
    """A witness's rule for a checkpoint under another key than the one it holds: the
    offered handovers make a chain of the deployment (its first key's id is
    ``deployment_id``) that passes through the held key and ends at the offered one. A
    bare new key, a handover signed by any other key, or a chain that does not pass
    through the held key (one a leaked older key forked) moves nothing."""
    try:
        signers = chain_of(handovers, offered)
    except ValueError:
        return False
    held_raw = raw_public(held)
    return signers.deployment_id == deployment_id and any(raw_public(s.public) == held_raw
                                                          for s in signers.retired)
