-- replayguard 033: a snapshot whose creation time is unknown is recorded as such.
--
-- A snapshot.created that says nothing of when the snapshot was taken (a libvirt relay
-- that could not read <creationTime>, a generic event without snapshot_created_at or
-- occurred_at) leaves created_us NULL: rg_event_context gives a revert to it no creation
-- time, so the window's start is unknown and covers every earlier use. Rows that hold 0 for
-- an unknown time become NULL. The key treats NULLs as equal, as the primary key it
-- replaces treated equal times.
ALTER TABLE vm_snapshots DROP CONSTRAINT vm_snapshots_pkey;
ALTER TABLE vm_snapshots ALTER COLUMN created_us DROP NOT NULL;
UPDATE vm_snapshots SET created_us = NULL WHERE created_us = 0;
ALTER TABLE vm_snapshots ADD CONSTRAINT vm_snapshots_key
    UNIQUE NULLS NOT DISTINCT (vm_id, snapshot_id, created_us);
