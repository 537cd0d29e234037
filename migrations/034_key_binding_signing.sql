-- replayguard 034: the receipt key and the checkpoint signing key are bound too.
--
-- Migration 032 bound the pepper and the secret key. A start with another signing key
-- (a data dir rebuilt around the pepper and the secret key, after a restore from a
-- backup) cannot check any checkpoint a witness holds, and would take every witness for
-- unreachable while the restored ledger serves the uses it forgot; one with another
-- receipt key takes every guest's receipt for a forgery. The binding now records a keyed
-- check of the receipt key and the signing key's public key (raw Ed25519, 32 bytes).
-- Both are NULL on a database bound before this migration: the next process to start
-- with its pepper and secret key fills them, the signing key only if it signed the
-- database's newest checkpoint (replayguard/services/key_binding.py).
ALTER TABLE key_binding ADD COLUMN receipt_check bytea;
ALTER TABLE key_binding ADD COLUMN signing_public bytea;
