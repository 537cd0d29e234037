-- Is the first use of a credential (on `p_vm` at `p_ts`) inside a rollback window?
CREATE OR REPLACE FUNCTION rg_at_risk(p_vm text, p_ts bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT id FROM rollback_windows
    WHERE vm_id = p_vm AND end_us >= p_ts AND (start_us IS NULL OR start_us <= p_ts)
    ORDER BY id LIMIT 1
$$;
