-- replayguard 016: what the state check needs. Every nonce the ledger accepted is remembered (also one purged before 010), and how far retention purged is kept.
--
-- Until migration 010, retention deleted an expired nonce's `uses` row and kept nothing;
-- since then it moves the digest to spent_nonces. The ledger still holds every accepted
-- nonce's digest, so the ones purged before 010 are put back here: a nonce is never
-- accepted twice, and `ledger verify`'s state check (an accepted nonce has its use row or
-- its spent digest, replayguard/services/state_check.py) holds on a deployment that was upgraded.
INSERT INTO spent_nonces (digest)
    SELECT l.cred_digest FROM ledger l
    WHERE l.kind = 'nonce' AND l.decision = 'accept' AND l.cred_digest IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM uses u WHERE u.digest = l.cred_digest)
    ON CONFLICT DO NOTHING;

-- retention_mark: the latest time retention purged up to (uses with expires_us before it
-- may be gone). The state check requires an accepted OTP's use row only when its ledgered
-- expiry is past this mark and past the checker's clock, so a purge by an instance whose
-- clock is ahead is told apart from a deleted row.
CREATE TABLE retention_mark (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    purged_before_us bigint  NOT NULL
);
