-- Raises an alert or joins the open one with the same dedup key: the count grows, the
-- kind and severity only ever escalate. `history` keeps the entry that raised the alert
-- and the 11 latest changes, so a credential replayed in a loop cannot grow a row without
-- end (tests/integration: test_a_replayed_credential_keeps_a_bounded_history); `count`
-- counts every sighting and `alert_entries` links every ledger entry behind the alert.
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
