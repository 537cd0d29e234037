-- replayguard 043: a nonce is remembered in spent_nonces from the decision that accepts it.
--
-- A consumed nonce is refused for good, whatever ttl_s or issued_at a later presentation
-- claims, and the details of its first use (VM, time, subject) are in the ledger entry
-- that accepted it. So rg_decide inserts the digest, with that entry's seq, straight into
-- spent_nonces: one row and one index entry a nonce, never deleted. `uses` holds OTP
-- uses only (the replay classification and the state check of an OTP code read them
-- until retention purges them; the credential's high-water refuses the code after that).
-- The nonces' rows of `uses` move here, naming the same entry.
INSERT INTO spent_nonces (digest, first_seq)
    SELECT digest, first_seq FROM uses WHERE kind = 'nonce'
    ON CONFLICT (digest) DO NOTHING;
DELETE FROM uses WHERE kind = 'nonce';
ALTER TABLE uses ADD CONSTRAINT uses_otp_only CHECK (kind = 'otp');
-- spent_nonces grows at the nonces' decision rate, as `ledger` does: an insert-triggered
-- vacuum every 200,000 new rows, whatever the table's size (migration 015).
ALTER TABLE spent_nonces SET (autovacuum_vacuum_insert_threshold = 200000,
                              autovacuum_vacuum_insert_scale_factor = 0);
