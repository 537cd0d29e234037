-- replayguard 042: rotations of the checkpoint signing key.
--
-- `replayguard keys rotate --signing` has the old signing key sign a handover naming the
-- new public key and the ledger's head (replayguard/core/handover.py), appends it as a
-- `key_rotation` entry (under the hash chain: the guard, verification and the witnesses
-- believe the entries alone), moves `key_binding.signing_public` to the new key and
-- records the rotation here, with the retired and the new public key in the check
-- columns (a public key says nothing it should not). This index lets every start read the
-- handovers without a scan of the ledger.
ALTER TABLE key_rotations DROP CONSTRAINT key_rotations_key_name_check;
ALTER TABLE key_rotations ADD CONSTRAINT key_rotations_key_name_check
    CHECK (key_name IN ('secret', 'receipt', 'signing'));
CREATE INDEX ledger_key_rotation_entries ON ledger (seq) WHERE kind = 'key_rotation';
-- Verification looks for checkpoints of a retired key past its handover: this index lets
-- it read them without a scan of every checkpoint since.
CREATE INDEX checkpoints_key_seq ON checkpoints (key_id, seq);
-- A witness keeps the handovers that moved it to a deployment's newer key and gives them
-- back with what it holds: a copy of the deployment restored with its keys from before
-- the rotation can then tell the checkpoint is its own deployment's, and behind it.
ALTER TABLE witnessed ADD COLUMN handovers jsonb;
