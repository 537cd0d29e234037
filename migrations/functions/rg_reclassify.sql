-- A window opened after replays it explains: every open 'reuse' alert whose credential was
-- first used inside it becomes replay_after_rollback / critical. rg_alert keeps the history;
-- a reclassification is not another sighting, so the count is put back and the history
-- entry says 'reclassified'.
-- The alerts are found from what retention does not purge: the reuse alerts whose first use
-- was on the window's VM at a time the window covers (`alerts_reuse_first_use`, migration
-- 039: `first_vm_id`, `first_ts_us`), each joined by one index probe to the ledger entry
-- that accepted the credential (`first_seq`), whose VM and time decide. So a use whose
-- `uses` row was purged before the event arrived is reclassified as one still kept, and
-- the work under the head lock grows with the alerts the window reclassifies (each then
-- leaves the index), not with the VM's reuse alerts (never purged, one per credential a
-- guest replays) nor with the uses the window covers (a window of unknown start covers
-- them all). The reuse alerts raised before migration 039 have no `first_ts_us` and are
-- read at every window of their VM; their number does not grow.
-- Planned at every call (events are rare), with the window's values and the tables' sizes
-- of the time, and never by a sequential scan: PL/pgSQL keeps a plan for the connection's
-- life, and one made while `alerts` was small read every alert of every VM ever after
-- (tests/integration/test_reclassify_bounds.py).
CREATE OR REPLACE FUNCTION rg_reclassify(p_window bigint, p_ts bigint, p_event_seq bigint, p_event_id text)
RETURNS bigint[] LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_custom_plan
AS $$
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
        SELECT a.id, a.dedup_key, a.vm_id, l.subject, l.seq AS first_seq, l.vm_id AS first_vm
        FROM alerts a JOIN ledger l ON l.seq = (a.details->>'first_seq')::bigint
        WHERE a.kind = 'reuse' AND (a.details->>'first_vm_id') COLLATE "C" = w.vm_id
          AND ((a.details->>'first_ts_us')::bigint BETWEEN coalesce(w.start_us, -9223372036854775808) AND w.end_us
               OR (a.details->>'first_ts_us')::bigint IS NULL)
          AND l.vm_id = w.vm_id AND l.ts_us <= w.end_us AND (w.start_us IS NULL OR l.ts_us >= w.start_us)
        ORDER BY a.id
    LOOP
        v_id := rg_alert('replay_after_rollback', 'critical', r.vm_id, r.subject, r.dedup_key, p_ts, p_event_seq,
            'A credential first used on VM ' || rg_quoted(r.first_vm) || ' inside a rollback window was presented again'
                || ' (reclassified when event ' || rg_quoted(p_event_id) || ' arrived)',
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
