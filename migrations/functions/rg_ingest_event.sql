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
-- A revert or restore under p_refuse also records which receipt the VM's disk went back to
-- (vms.revert_seq, revert_receipt_seq: migrations/037_revert_receipts.sql), so that the
-- guest's next request, presenting it, re-syncs the guest instead of refusing the VM
-- again (rg_decide). That receipt is at or after the newest one issued to the VM before
-- the state's time T (the window's start; unknown: any). Nothing is recorded, and a
-- stale receipt stays rollback_detected, when the guest already presented a receipt
-- after the revert happened (R, the window's end: the event came late; when the event
-- does not say when the revert happened, R is its arrival, which says nothing: then any
-- receipt the guest presented before), or when the guest's newest receipt answered a
-- stale or foreign one (flagged rollback_detected or clone_detected: the guest already
-- came back from a revert, whatever R says; a relay that finds a revert by polling gives
-- the time it saw it), or when T lies beyond the newest c_scan entries of the VM (the
-- scan under the head lock is bounded).
-- A clone under p_refuse records likewise which receipts of its source S its disk may hold
-- (vms.revert_source_vm_id, revert_receipt_seq .. revert_receipt_max: migrations/
-- 038_clone_receipts.sql): those S was issued at or before the clone's state time T, from
-- the one issued at S's last request by then that presented a receipt (its guest held that
-- one or a later one) up to the newest; when T is unknown, any S was issued up to R. None
-- is recorded when S was issued no receipt by then within its newest c_scan entries, or
-- when the clone already presented a receipt: after R, or at all when the event does not
-- say when the clone happened (R is then its arrival, which says nothing) or when its
-- newest receipt answered a stale or foreign one (flagged, as for a revert).
-- PL/pgSQL keeps a statement's plan for the connection's life, so, as in rg_decide,
-- `enable_seqscan = off`: a plan made while `vms` or the ledger was small must not read
-- all of it once it grew (tests/integration/test_plan_bounds.py).
-- Dropped first: the signature without p_refuse would otherwise stay beside this one.
DROP FUNCTION IF EXISTS rg_ingest_event(bigint, jsonb, bytea, jsonb, jsonb);
CREATE OR REPLACE FUNCTION rg_ingest_event(p_ts bigint, p_event jsonb, p_digest bytea, p_windows jsonb, p_facts jsonb,
                                           p_refuse boolean)
RETURNS TABLE (r_seq bigint, r_windows bigint[], r_alerts bigint[])
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_vm   text := p_event->>'vm_id';
    v_type text := p_event->>'type';
    w      jsonb;
    v_wid  bigint;
    v_refuse boolean := p_refuse AND v_type IN ('snapshot.reverted', 'vm.restored', 'vm.cloned');
    c_scan   CONSTANT integer := 10000;
    v_state  bigint;
    v_at     bigint;
    v_last   bigint;
    v_from   bigint;
    v_to     bigint;
    v_back   boolean;  -- the guest's newest receipt came with a stale or foreign one (flagged)
    v_all    boolean;  -- rg_vm_newest read every entry of the VM it was asked about
    v_source text := CASE WHEN v_type = 'vm.cloned' THEN p_event->>'source_vm_id' END;
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
        -- = ANY over an array, not "= v_vm OR IN (subquery)": no index serves the latter,
        -- which read every row of vms for each event.
        UPDATE vms SET epoch = epoch + 1
            WHERE vm_id = ANY (ARRAY(SELECT value->>'vm_id' FROM jsonb_array_elements(p_windows)) || v_vm);
    END IF;
    IF v_refuse THEN
        -- A refusal for what the receipts showed (rg_decide: rollback_detected, clone_detected)
        -- keeps its reason: a report coming after it must not make a detected rollback read
        -- as a planned one to the administrator who clears the VM.
        UPDATE vms SET refusing = true,
                       refusing_reason = CASE WHEN refusing AND refusing_reason IN ('rollback_detected', 'clone_detected')
                                              THEN refusing_reason ELSE v_type END
            WHERE vm_id = v_vm;
    END IF;
    IF v_type IN ('snapshot.reverted', 'vm.restored', 'vm.cloned') THEN
        IF v_refuse AND v_type <> 'vm.cloned' THEN
            SELECT (value->>'start_us')::bigint, (value->>'end_us')::bigint INTO v_state, v_at
                FROM jsonb_array_elements(p_windows) WHERE value->>'vm_id' = v_vm AND value->>'cause' = v_type;
            SELECT l.ts_us, l.payload->'flags' ?| ARRAY['rollback_detected', 'clone_detected'] INTO v_last, v_back
                FROM vms v JOIN ledger l ON l.seq = v.last_receipt_seq WHERE v.vm_id = v_vm;
            IF v_at IS NOT NULL AND (v_last IS NULL OR (p_event ? 'occurred_us' AND v_last <= v_at AND NOT v_back)) THEN
                IF v_state IS NULL THEN
                    v_from := 0;
                ELSE
                    -- Newest first, stopping at the first match, by ledger_vm_seq only.
                    SELECT n.r_seq, n.r_all INTO v_from, v_all FROM rg_vm_newest(v_vm, r_seq, c_scan, v_state, false,
                                                                                'receipt') n;
                    IF v_from IS NULL AND v_all THEN
                        v_from := 0;  -- no receipt is older than the state: any it presents
                    END IF;
                END IF;
            END IF;
        END IF;
        IF v_refuse AND v_type = 'vm.cloned' THEN
            SELECT (value->>'start_us')::bigint, (value->>'end_us')::bigint INTO v_state, v_at
                FROM jsonb_array_elements(p_windows) WHERE value->>'vm_id' = v_source AND value->>'cause' = v_type;
            SELECT l.ts_us, l.payload->'flags' ?| ARRAY['rollback_detected', 'clone_detected'] INTO v_last, v_back
                FROM vms v JOIN ledger l ON l.seq = v.last_receipt_seq WHERE v.vm_id = v_vm;
            IF v_at IS NOT NULL AND (v_last IS NULL OR (p_event ? 'occurred_us' AND v_last <= v_at AND NOT v_back)) THEN
                -- The source's decisions (each issued a receipt) at or before T (unknown: R),
                -- newest first, stopping at the first match: the newest of them, and the
                -- newest that presented a receipt.
                SELECT n.r_seq INTO v_to FROM rg_vm_newest(v_source, r_seq, c_scan, coalesce(v_state, v_at), true,
                                                            'decision') n;
                IF v_to IS NOT NULL AND v_state IS NULL THEN
                    v_from := 0;  -- the window covers every earlier use: any receipt up to R
                ELSIF v_to IS NOT NULL THEN
                    SELECT n.r_seq, n.r_all INTO v_from, v_all FROM rg_vm_newest(v_source, v_to, c_scan, v_state, true,
                                                                                'receipt') n;
                    IF v_from IS NULL AND v_all THEN
                        v_from := 0;  -- no request of S presented a receipt by T: any it was issued
                    END IF;
                    v_from := coalesce(v_from, v_to);  -- beyond the scan: the newest only
                END IF;
            END IF;
        END IF;
        -- Another revert (or a clone taking this name) replaces what an earlier one recorded.
        UPDATE vms SET revert_seq = CASE WHEN v_from IS NOT NULL THEN r_seq END, revert_receipt_seq = v_from,
                       revert_source_vm_id = CASE WHEN v_from IS NOT NULL THEN v_source END,
                       revert_receipt_max = CASE WHEN v_from IS NOT NULL THEN v_to END
            WHERE vm_id = v_vm;
    END IF;
    RETURN NEXT;
END $$;
