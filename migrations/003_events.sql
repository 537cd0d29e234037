-- replayguard 003: hypervisor events, rollback windows opened by them, reclassification,
-- and the administrator's release of a refusing VM.
--
-- The window rule itself (which T, which R, which VMs) lives in replayguard/core/windows.py;
-- these functions store what it computed and act on it. Every function here takes the
-- ledger head lock first, as rg_decide does, so events and decisions are totally ordered:
-- a replay decided while a window opens either sees the window or is reclassified by it.

-- Creation times of snapshots, from snapshot.created events (T of a later revert).
-- A name may be reused after a delete, so every creation is kept.
CREATE TABLE vm_snapshots (
    vm_id       text   NOT NULL,
    snapshot_id text   NOT NULL,
    created_us  bigint NOT NULL,
    event_id    text   NOT NULL,
    PRIMARY KEY (vm_id, snapshot_id, created_us)
);

-- Which VM a clone came from, and the time of the state it carries (its split).
CREATE TABLE vm_lineage (
    vm_id        text   PRIMARY KEY,
    parent_vm_id text   NOT NULL,
    split_us     bigint NOT NULL,
    event_id     text   NOT NULL
);

-- What the service needs to compute an event's windows, read under the head lock so it
-- cannot change before rg_ingest_event writes: an earlier event of the same id, the
-- creation times of the snapshot, and the lineage of the rolled-back VM (nearest first).
CREATE FUNCTION rg_event_context(p_event_id text, p_snap_vm text, p_snapshot_id text, p_vm text)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM ledger_head WHERE id FOR UPDATE;
    RETURN jsonb_build_object(
        'existing', (SELECT jsonb_build_object('digest', encode(body_digest, 'hex'), 'seq', seq)
                     FROM hypervisor_events WHERE event_id = p_event_id),
        'snapshots', coalesce((SELECT jsonb_agg(created_us) FROM vm_snapshots
                               WHERE vm_id = p_snap_vm AND snapshot_id = p_snapshot_id), '[]'::jsonb),
        'ancestors', coalesce((
            WITH RECURSIVE up (vm_id, parent_vm_id, split_us, depth) AS (
                SELECT vm_id, parent_vm_id, split_us, 1 FROM vm_lineage WHERE vm_id = p_vm
                UNION ALL
                SELECT l.vm_id, l.parent_vm_id, l.split_us, up.depth + 1
                FROM vm_lineage l JOIN up ON l.vm_id = up.parent_vm_id
                WHERE up.depth < 16 AND l.parent_vm_id <> p_vm)
            SELECT jsonb_agg(jsonb_build_array(parent_vm_id, split_us) ORDER BY depth) FROM up),
            '[]'::jsonb));
END $$;

-- The uses a window covers (inclusive ends; NULL start: since ever), for an alert's details.
CREATE FUNCTION rg_window_uses(p_vm text, p_start bigint, p_end bigint, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('seq', first_seq, 'kind', kind, 'subject', subject,
                                                 'vm_id', vm_id, 'ts_us', first_ts_us) ORDER BY first_seq),
                    '[]'::jsonb)
    FROM (SELECT * FROM uses
          WHERE vm_id = p_vm AND first_ts_us <= p_end AND (p_start IS NULL OR first_ts_us >= p_start)
          ORDER BY first_seq LIMIT p_limit) covered
$$;

-- A window opened after replays it explains: every open 'reuse' alert whose credential was
-- first used inside it becomes replay_after_rollback / critical. rg_alert keeps the history;
-- a reclassification is not another sighting, so the count is put back and the history
-- entry says 'reclassified'.
CREATE FUNCTION rg_reclassify(p_window bigint, p_ts bigint, p_event_seq bigint, p_event_id text)
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

-- Records one event (ledger row, hypervisor_events row, snapshot or lineage facts), opens
-- the windows the service computed, starts a new epoch of every VM concerned, and
-- reclassifies the replays the new windows explain. The caller holds the head lock
-- (rg_event_context) and has checked that the event id is new.
-- p_windows: [{"vm_id", "start_us" (or null), "end_us", "cause"}]; p_facts: {"snapshot_us",
-- "split_us"} as the service computed them.
CREATE FUNCTION rg_ingest_event(p_ts bigint, p_event jsonb, p_digest bytea, p_windows jsonb, p_facts jsonb)
RETURNS TABLE (r_seq bigint, r_windows bigint[], r_alerts bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_vm   text := p_event->>'vm_id';
    v_type text := p_event->>'type';
    w      jsonb;
    v_wid  bigint;
BEGIN
    r_seq := rg_append(p_ts, 'event', v_vm, p_event->>'event_id', NULL, NULL, NULL,
        p_event || jsonb_build_object('body_digest', encode(p_digest, 'hex'), 'windows', p_windows));
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
    RETURN NEXT;
END $$;

-- The administrator's release of a VM that refuses every decision (receipt_reaction
-- 'refuse'), recorded in the ledger with who did it and why.
CREATE FUNCTION rg_clear_vm(p_vm text, p_ts bigint, p_note text, p_by text)
RETURNS TABLE (r_seq bigint, r_was_refusing boolean, r_reason text)
LANGUAGE plpgsql AS $$
DECLARE
    v_row vms%ROWTYPE;
BEGIN
    PERFORM 1 FROM ledger_head WHERE id FOR UPDATE;
    SELECT * INTO v_row FROM vms WHERE vm_id = p_vm FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE vms SET refusing = false, refusing_reason = NULL WHERE vm_id = p_vm;
    r_seq := rg_append(p_ts, 'vm_cleared', p_vm, p_by, NULL, NULL, NULL,
        jsonb_build_object('note', p_note, 'by', p_by, 'was_refusing', v_row.refusing,
                           'refusing_reason', v_row.refusing_reason));
    r_was_refusing := v_row.refusing;
    r_reason := v_row.refusing_reason;
    RETURN NEXT;
END $$;
