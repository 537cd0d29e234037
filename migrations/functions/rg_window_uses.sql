-- The uses a window covers (inclusive ends; NULL start: since ever), for an alert's details:
-- the first `p_limit` by time, listed in ledger order. Read from the ledger's accepting
-- entries, so a use whose `uses` row retention purged is listed too, in the order of
-- `ledger_vm_accepts` (migration 036): both ends are index bounds, so the scan reads only
-- the window's entries and stops after `p_limit` of them however many uses the window or
-- the VM's history hold (rg_decide calls this under the head lock, for every replay it
-- names replay_after_rollback).
CREATE OR REPLACE FUNCTION rg_window_uses(p_vm text, p_start bigint, p_end bigint, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('seq', seq, 'kind', kind, 'subject', subject,
                                                 'vm_id', vm_id, 'ts_us', ts_us) ORDER BY seq),
                    '[]'::jsonb)
    FROM (SELECT seq, kind, subject, vm_id, ts_us FROM ledger
          WHERE vm_id = p_vm AND decision = 'accept'
            AND ts_us >= coalesce(p_start, -9223372036854775808) AND ts_us <= p_end
          ORDER BY ts_us, seq LIMIT p_limit) covered
$$;
