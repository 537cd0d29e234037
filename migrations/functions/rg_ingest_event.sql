-- Records one event (ledger row, hypervisor_events row, snapshot or lineage facts), opens
-- the windows the service computed, starts a new epoch of every VM concerned, and
-- reclassifies the replays the new windows explain. The caller holds the head lock
-- (rg_event_context) and has checked that the event id is new.
-- p_windows: [{"vm_id", "start_us" (or null), "end_us", "cause"}]; p_facts: {"snapshot_us"
-- (null: the creation time is unknown), "split_us"} as the service computed them.
-- p_refuse (receipt_reaction 'refuse'): a VM whose state went back (reverted, restored) or
-- that is a clone refuses every decision until an administrator clears it (rg_clear_vm),
-- as it does when a stale or foreign receipt shows it (rg_decide); the reason is the
-- event's type, and the event's ledger entry says so ("refusing": true).
-- Dropped first: the signature without p_refuse would otherwise stay beside this one.
DROP FUNCTION IF EXISTS rg_ingest_event(bigint, jsonb, bytea, jsonb, jsonb);
CREATE OR REPLACE FUNCTION rg_ingest_event(p_ts bigint, p_event jsonb, p_digest bytea, p_windows jsonb, p_facts jsonb,
                                           p_refuse boolean)
RETURNS TABLE (r_seq bigint, r_windows bigint[], r_alerts bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_vm   text := p_event->>'vm_id';
    v_type text := p_event->>'type';
    w      jsonb;
    v_wid  bigint;
    v_refuse boolean := p_refuse AND v_type IN ('snapshot.reverted', 'vm.restored', 'vm.cloned');
BEGIN
    r_seq := rg_append(p_ts, 'event', v_vm, p_event->>'event_id', NULL, NULL, NULL,
        p_event || jsonb_build_object('body_digest', encode(p_digest, 'hex'), 'windows', p_windows)
            || CASE WHEN v_refuse THEN '{"refusing": true}'::jsonb ELSE '{}'::jsonb END);
    INSERT INTO hypervisor_events (event_id, body_digest, type, vm_id, seq, received_us, payload)
        VALUES (p_event->>'event_id', p_digest, v_type, v_vm, r_seq, p_ts, p_event);
    INSERT INTO vms (vm_id, first_seen_us, last_seen_us)
        SELECT x, p_ts, p_ts FROM unnest(ARRAY[v_vm, p_event->>'source_vm_id']) x WHERE x IS NOT NULL
        ON CONFLICT (vm_id) DO NOTHING;
    IF v_type = 'snapshot.created' AND p_event ? 'snapshot_id' THEN
        INSERT INTO vm_snapshots VALUES (v_vm, p_event->>'snapshot_id', (p_facts->>'snapshot_us')::bigint,
                                         p_event->>'event_id') ON CONFLICT DO NOTHING;
    ELSIF v_type = 'vm.cloned' THEN
        INSERT INTO vm_lineage VALUES (v_vm, p_event->>'source_vm_id', (p_facts->>'split_us')::bigint,
                                       p_event->>'event_id')
            ON CONFLICT (vm_id) DO UPDATE SET parent_vm_id = excluded.parent_vm_id,
                split_us = excluded.split_us, event_id = excluded.event_id;
    END IF;
    r_windows := '{}';
    r_alerts := '{}';
    FOR w IN SELECT value FROM jsonb_array_elements(p_windows) LOOP
        INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, event_id, seq)
            VALUES (w->>'vm_id', (w->>'start_us')::bigint, (w->>'end_us')::bigint, w->>'cause',
                    p_event->>'event_id', r_seq)
            RETURNING id INTO v_wid;
        r_windows := r_windows || v_wid;
        r_alerts := r_alerts || rg_reclassify(v_wid, p_ts, r_seq, p_event->>'event_id');
    END LOOP;
    IF jsonb_array_length(p_windows) > 0 THEN
        INSERT INTO vms (vm_id, first_seen_us, last_seen_us)
            SELECT DISTINCT value->>'vm_id', p_ts, p_ts FROM jsonb_array_elements(p_windows)
            ON CONFLICT (vm_id) DO NOTHING;
        UPDATE vms SET epoch = epoch + 1
            WHERE vm_id = v_vm OR vm_id IN (SELECT value->>'vm_id' FROM jsonb_array_elements(p_windows));
    END IF;
    IF v_refuse THEN
        UPDATE vms SET refusing = true, refusing_reason = v_type WHERE vm_id = v_vm;
    END IF;
    RETURN NEXT;
END $$;
