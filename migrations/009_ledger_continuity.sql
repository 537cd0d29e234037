-- replayguard 009: ledger continuity — witnesses and recorded recoveries (CONTRACT §10).
--
-- A deployment may be another deployment's witness: it holds the newest signed checkpoint
-- that deployment gave it, under the public key it was first given (trust on first use),
-- and refuses one that steps back or forks (replayguard/core/continuity.py, `admit`).
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_role_check
    CHECK (role IN ('callout', 'hypervisor', 'analyst', 'admin', 'witness'));

CREATE TABLE witnessed (
    deployment_id  text PRIMARY KEY,
    public_key     bytea  NOT NULL,
    seq            bigint NOT NULL,
    hash           bytea  NOT NULL,
    ts_us          bigint NOT NULL,
    signature      bytea  NOT NULL,
    recovery       jsonb,
    first_seen_us  bigint NOT NULL,
    updated_us     bigint NOT NULL
);

-- The signed statement of every `replayguard ledger accept-rollback`, beside its ledger
-- entry (kind `ledger_recovery`), so the continuity check reads them without a scan of
-- the ledger. Only statements whose signature holds are believed.
CREATE TABLE ledger_recoveries (
    seq        bigint PRIMARY KEY,
    ts_us      bigint NOT NULL,
    statement  jsonb  NOT NULL
);
