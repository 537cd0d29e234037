-- The rollback windows of the VMs `p_vms`, oldest first: what a clone's event carries from
-- its new VM's windows to its source's (replayguard/services/events.py), read under the
-- head lock rg_event_context took.
--
-- Read by `rollback_windows_vm`, whatever the statistics when the plan was made: a
-- prepared statement's plan is kept for the connection's life, and the one made while the
-- table was small read every window of every VM at each clone ever after (20,020 rows for
-- a VM with four windows: tests/integration/test_plan_bounds.py). Sequential scans are off,
-- and the order is `id + 0`, one no index gives, so the primary key's order is no reason
-- to walk it: the VMs' windows are read from their index and sorted.
CREATE OR REPLACE FUNCTION rg_windows_of(p_vms text[])
RETURNS TABLE (vm_id text, start_us bigint, end_us bigint, cause text)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT w.vm_id, w.start_us, w.end_us, w.cause FROM rollback_windows w
    WHERE w.vm_id = ANY (p_vms) ORDER BY w.id + 0
$$;
