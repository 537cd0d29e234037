-- What the service needs to compute an event's windows, read under the head lock so it
-- cannot change before rg_ingest_event writes: an earlier event of the same VM and id, the
-- known creation times of the snapshot (an unknown one, NULL, is left out), and the
-- lineage of the rolled-back VM (nearest first). Never by a sequential scan: PL/pgSQL keeps
-- the plan for the connection's life, and one made while `hypervisor_events` was small read
-- every event ever recorded at each event (tests/integration/test_plan_bounds.py).
DROP FUNCTION IF EXISTS rg_event_context(text, text, text, text);
CREATE OR REPLACE FUNCTION rg_event_context(p_event_vm text, p_event_id text, p_snap_vm text, p_snapshot_id text,
                                            p_vm text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
BEGIN
    PERFORM 1 FROM ledger_head WHERE id FOR UPDATE;
    RETURN jsonb_build_object(
        'existing', (SELECT jsonb_build_object('digest', encode(body_digest, 'hex'), 'seq', seq)
                     FROM hypervisor_events WHERE vm_id = p_event_vm AND event_id = p_event_id),
        'snapshots', coalesce((SELECT jsonb_agg(created_us) FROM vm_snapshots
                               WHERE vm_id = p_snap_vm AND snapshot_id = p_snapshot_id
                                 AND created_us IS NOT NULL), '[]'::jsonb),
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
