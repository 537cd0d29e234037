-- Is the first use of a credential (on `p_vm` at `p_ts`) inside a rollback window? The
-- earliest such window's id, NULL when none is.
--
-- rg_decide calls this under the head lock for every credential presented again. A
-- LANGUAGE sql function's statement is planned without the arguments' values (a generic
-- plan) at every call up to PostgreSQL 17, and from 18 a plan may be kept for the
-- connection's life; for `ORDER BY id LIMIT 1` such a plan walked the windows' primary
-- key through every other VM's windows: 20,003 rows for one replay on a VM with one
-- window, beside a VM with 20,000 (tests/integration/test_plan_bounds.py, on PostgreSQL
-- 15 and 18). `min(id + 0)` asks for no order an index gives, so what is left to plan
-- is which index: `rollback_windows_vm`'s range,
-- the VM's windows that end at or after `p_ts` (a bitmap scan reads the same range), or
-- the whole primary key; rg_decide runs with sequential scans off. No SET clause here:
-- one costs every call a save and restore of the settings, and replays are common.
CREATE OR REPLACE FUNCTION rg_at_risk(p_vm text, p_ts bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT min(id + 0) FROM rollback_windows
    WHERE vm_id = p_vm AND end_us >= p_ts AND (start_us IS NULL OR start_us <= p_ts)
$$;
