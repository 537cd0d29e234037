-- The uses a window covers (inclusive ends; NULL start: since ever), for an alert's details:
-- the first `p_limit` by time, listed in ledger order. Taken in the order of `uses_vm_ts`, so
-- the scan stops after `p_limit` rows however many uses the window covers (rg_decide calls
-- this under the head lock, for every replay it names replay_after_rollback).
CREATE OR REPLACE FUNCTION rg_window_uses(p_vm text, p_start bigint, p_end bigint, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('seq', first_seq, 'kind', kind, 'subject', subject,
                                                 'vm_id', vm_id, 'ts_us', first_ts_us) ORDER BY first_seq),
                    '[]'::jsonb)
    FROM (SELECT * FROM uses
          WHERE vm_id = p_vm AND first_ts_us <= p_end AND (p_start IS NULL OR first_ts_us >= p_start)
          ORDER BY first_ts_us, first_seq LIMIT p_limit) covered
$$;
