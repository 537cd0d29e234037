-- replayguard 039: a late event reads the reuse alerts whose first use its window covers.
--
-- Alerts are never purged and a guest raises one reuse alert per credential it replays, so
-- a VM's reuse alerts grow without end. rg_reclassify read every one of them (by
-- alerts_reuse_first_vm, migration 036) for each window a revert, restore or clone opened
-- on the VM, under the head lock. rg_decide now writes the first use's time into a reuse
-- alert's details (`first_ts_us`), and this index orders the VM's reuse alerts by it, so a
-- window reads the alerts of the uses it covers (each of which it reclassifies: it then
-- leaves the index) and the alerts raised before this migration, which have no time (NULL,
-- one more index range; their number does not grow).
CREATE INDEX alerts_reuse_first_use ON alerts ((details->>'first_vm_id') COLLATE "C",
                                                ((details->>'first_ts_us')::bigint)) WHERE kind = 'reuse';
DROP INDEX alerts_reuse_first_vm;
