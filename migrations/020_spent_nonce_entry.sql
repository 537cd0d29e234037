-- replayguard 020: a spent nonce names the ledger entry that accepted it, as its use row does.
--
-- The state check (replayguard/services/state_check.py) requires an accepted nonce's
-- `uses` row, or once retention purged that its `spent_nonces` row, to name that entry
-- (`first_seq`). A row names one entry, so a nonce accepted twice (its row deleted by
-- someone with database rights, then the nonce replayed, which writes a row for the
-- replay) leaves the first accept without its row, even after the replay's use is
-- purged in turn. Rows spent before this column existed name the first entry that
-- accepted their digest.
ALTER TABLE spent_nonces ADD COLUMN first_seq bigint;

UPDATE spent_nonces s SET first_seq = a.seq
    FROM (SELECT cred_digest, min(seq) AS seq FROM ledger
          WHERE kind = 'nonce' AND decision = 'accept' AND cred_digest IS NOT NULL
          GROUP BY cred_digest) a
    WHERE a.cred_digest = s.digest;
