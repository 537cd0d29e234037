-- replayguard 044: one index for the ledger's rare entries, in place of one per kind.
--
-- Key rotations (read at every start: replayguard/services/signing_rotation.py), ledger
-- recoveries (read at every continuity check and appender start, the newest by `seq`:
-- continuity.py, pg/appender.py) and principal unlocks (asked for by the state check, by
-- subject after a `seq`: state_check.py) are found by index, in `seq` order within a
-- kind, without a scan of the ledger. Each partial index is
-- opened, and its predicate prepared and tested, at every insert into the ledger, though
-- a decision's entry is never one of them: three indexes cost a fresh nonce about 7 % of
-- rg_decide's instructions, one about 3 % (bench/decide_instructions.py). Rare entries are
-- few, so the index stays small. Building it reads the ledger once, with appends waiting.
DROP INDEX ledger_key_rotation_entries;
DROP INDEX ledger_recovery_entries;
DROP INDEX ledger_principal_unlocks;
CREATE INDEX ledger_rare_entries ON ledger (kind, seq, subject)
    WHERE kind IN ('key_rotation', 'ledger_recovery', 'principal_unlock');
