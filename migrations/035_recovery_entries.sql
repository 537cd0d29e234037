-- replayguard 035: the continuity guard reads recovery statements from the ledger itself.
--
-- A recorded recovery's signed statement is kept in its `ledger_recovery` entry (under
-- the hash chain, the checkpoints and the witnesses) and in `ledger_recoveries`, a plain
-- table that someone with database rights can empty without anything else disagreeing.
-- The guard believes the entries alone; this index lets it read them at every check
-- without a scan of the ledger.
CREATE INDEX ledger_recovery_entries ON ledger (seq) WHERE kind = 'ledger_recovery';
