-- A window opened after replays it explains: every open 'reuse' alert whose credential was
-- first used inside it becomes replay_after_rollback / critical. rg_alert keeps the history;
-- a reclassification is not another sighting, so the count is put back and the history
-- entry says 'reclassified'.
CREATE OR REPLACE FUNCTION rg_reclassify(p_window bigint, p_ts bigint, p_event_seq bigint, p_event_id text)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    w     rollback_windows%ROWTYPE;
    r     record;
    v_id  bigint;
    v_out bigint[] := '{}';
    v_risk jsonb;
BEGIN
    SELECT * INTO w FROM rollback_windows WHERE id = p_window;
    v_risk := rg_window_uses(w.vm_id, w.start_us, w.end_us, 50);
    FOR r IN
        SELECT a.id, a.dedup_key, a.vm_id, u.subject, u.first_seq, u.vm_id AS first_vm
        FROM uses u JOIN alerts a ON a.dedup_key = 'cred:' || encode(u.digest, 'hex')
        WHERE u.vm_id = w.vm_id AND u.first_ts_us <= w.end_us
          AND (w.start_us IS NULL OR u.first_ts_us >= w.start_us) AND a.kind = 'reuse'
        ORDER BY a.id
    LOOP
        v_id := rg_alert('replay_after_rollback', 'critical', r.vm_id, r.subject, r.dedup_key, p_ts, p_event_seq,
            'A credential first used on VM ' || r.first_vm || ' inside a rollback window was presented again'
                || ' (reclassified when event ' || p_event_id || ' arrived)',
            jsonb_build_object('window_id', w.id, 'event_id', p_event_id, 'event_seq', p_event_seq,
                               'first_seq', r.first_seq, 'first_vm_id', r.first_vm,
                               'reclassified_from', 'reuse', 'at_risk_uses', v_risk));
        UPDATE alerts SET count = count - 1,
                          history = jsonb_set(history, ARRAY[(jsonb_array_length(history) - 1)::text, 'change'],
                                              '"reclassified"'::jsonb)
            WHERE id = v_id;
        v_out := v_out || v_id;
    END LOOP;
    RETURN v_out;
END $$;
