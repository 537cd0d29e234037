-- replayguard 021: a rollback a running service found by itself is kept in the database.
--
-- A service process notices a database that went back under it from its own decisions:
-- an entry numbered at or below one it knew committed, or an entry it committed whose
-- hash the ledger no longer holds (another instance's decision took its place after a
-- restore). Nothing outside the database holds that finding: it is written here, read by
-- every instance at start and at each continuity check (so the others stop too, and a
-- restart does not forget it), and deleted by `replayguard ledger accept-rollback`,
-- whose recovery gives up the entries it names.
CREATE TABLE continuity_findings (
    id       bigserial PRIMARY KEY,
    found_us bigint NOT NULL,
    seq      bigint NOT NULL,  -- the entry the process knew committed
    hash     bytea,            -- its hash, when the process knew it
    head_seq bigint NOT NULL,  -- the ledger's head when it was found
    process  text   COLLATE "C" NOT NULL  -- host and pid of the process that found it
);
