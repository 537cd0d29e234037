-- replayguard 007: an alert's history is bounded.
--
-- rg_alert appended one entry to `history` for every sighting joined to an open alert, so
-- a credential replayed N times made an alert whose every further join rewrote all N
-- entries (and, past about 2 kB, compressed them again for TOAST). In the benchmark two
-- replayed credentials were joined about 200 times each in 12 s, and rg_alert averaged
-- 0.2 ms a call, a sixth of rg_decide's time (bench/README.md, "fifth session"); an
-- attacker replaying one credential in a loop could make it grow without end.
--
-- Now `history` keeps the entry that raised the alert and the 11 latest changes. `count`
-- still counts every sighting, and `alert_entries` still links every ledger entry behind
-- the alert. Nothing else differs from 001; the function is restated whole because
-- PL/pgSQL cannot change one statement of it.

CREATE OR REPLACE FUNCTION rg_alert(p_kind text, p_severity text, p_vm text, p_principal text, p_dedup text,
                                    p_ts bigint, p_seq bigint, p_summary text, p_details jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO alerts AS a (kind, severity, vm_id, principal, dedup_key, first_seen_us, last_seen_us,
                             updated_us, summary, details, history)
    VALUES (p_kind, p_severity, p_vm, p_principal, p_dedup, p_ts, p_ts, p_ts, p_summary, p_details,
            jsonb_build_array(jsonb_build_object('ts_us', p_ts, 'seq', p_seq, 'change', 'raised',
                                                 'kind', p_kind, 'severity', p_severity)))
    ON CONFLICT (dedup_key) DO UPDATE SET
        count = a.count + 1,
        last_seen_us = greatest(a.last_seen_us, excluded.last_seen_us),
        updated_us = excluded.updated_us,
        status = 'open',
        kind = CASE WHEN rg_severity_rank(excluded.severity) > rg_severity_rank(a.severity)
                    THEN excluded.kind ELSE a.kind END,
        severity = CASE WHEN rg_severity_rank(excluded.severity) > rg_severity_rank(a.severity)
                        THEN excluded.severity ELSE a.severity END,
        summary = CASE WHEN rg_severity_rank(excluded.severity) > rg_severity_rank(a.severity)
                       THEN excluded.summary ELSE a.summary END,
        details = a.details || excluded.details,
        -- At 12 entries the oldest after the first (index 1) makes room.
        history = CASE WHEN jsonb_array_length(a.history) >= 12 THEN a.history - 1 ELSE a.history END
            || jsonb_build_array(jsonb_build_object(
            'ts_us', p_ts, 'seq', p_seq,
            'change', CASE WHEN a.status = 'acknowledged' THEN 'reopened' ELSE 'joined' END,
            'kind', p_kind, 'severity', p_severity))
    RETURNING a.id INTO v_id;
    INSERT INTO alert_entries VALUES (v_id, p_seq) ON CONFLICT DO NOTHING;
    PERFORM pg_notify('replayguard_alerts', v_id::text);
    RETURN v_id;
END $$;
