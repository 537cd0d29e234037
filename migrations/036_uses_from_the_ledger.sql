-- replayguard 036: a rollback window's uses are read from the ledger, purged ones too.
--
-- Retention deletes a use's `uses` row once it expires; the ledger entry that accepted the
-- credential stays. What a window put at risk (rg_window_uses, the `at_risk_uses` of a
-- replay_after_rollback alert) and which reuse alerts a late event reclassifies
-- (rg_reclassify) were read from `uses`, so a use purged before the replay or before the
-- event was left out of both. They are read from what survives the purge:
--
-- - ledger_vm_accepts: the accepting entries (the only ones with decision 'accept', all
--   written by rg_decide) by VM and time, so the window's first 50 uses are an index
--   range scan however long the VM's history; other entries only have the predicate
--   tested as they are inserted.
-- - alerts_reuse_first_vm: the reuse alerts by the VM of the credential's first use (their
--   `first_vm_id`), so a late event reads the reuse alerts of the window's VM and the
--   ledger entry each names (`first_seq`, one index probe), not every use the window covers:
--   a window of unknown start covers the VM's whole history. Only raising or joining an
--   alert writes it.
--
-- `uses_vm_ts` served only those two reads and goes: an accepted use writes one index
-- entry into the ledger's instead of one into that of `uses` (on fresh nonces about 2 %
-- more of the backend's CPU in rg_decide, against 6-8 % with both indexes kept;
-- docs/scaling.md). Building ledger_vm_accepts reads the ledger once while appends wait
-- (about 0.45 s for a million entries).
CREATE INDEX ledger_vm_accepts ON ledger (vm_id, ts_us, seq) WHERE decision = 'accept';
CREATE INDEX alerts_reuse_first_vm ON alerts ((details->>'first_vm_id') COLLATE "C") WHERE kind = 'reuse';
DROP INDEX uses_vm_ts;
