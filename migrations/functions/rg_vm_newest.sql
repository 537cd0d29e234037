-- The newest of a VM's ledger entries at or before p_max_seq, among its p_limit newest
-- there, whose time is before p_max_ts (at or before it when p_inclusive), and that
-- presented a valid receipt (p_want 'receipt') or are a decision (p_want 'decision');
-- r_seq NULL when none is, r_all whether the VM has fewer than p_limit such entries
-- (then none at all is). rg_ingest_event calls it under the head lock.
--
-- Read newest first and stopping at the first match, by `ledger_vm_seq` and nothing else,
-- whatever the statistics or the size of the ledger when PL/pgSQL planned the loop and
-- cached its plan: the order (vm_id, seq), with the VM given as a range of that index and
-- not as an equality, is one only that index gives without a sort, and sorts, sequential
-- and bitmap scans are off. With vm_id = p_vm the planner chose by its estimates, and a
-- plan kept from a small ledger walked the ledger's primary key backwards through every
-- other VM's entries (tests/integration/test_event_scan_bounds.py).
CREATE OR REPLACE FUNCTION rg_vm_newest(p_vm text, p_max_seq bigint, p_limit integer, p_max_ts bigint,
                                        p_inclusive boolean, p_want text)
RETURNS TABLE (r_seq bigint, r_all boolean)
LANGUAGE plpgsql STABLE
SET enable_sort = off
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    e   record;
    v_n integer := 0;
BEGIN
    FOR e IN SELECT l.seq, l.ts_us, l.kind, l.payload->>'receipt' AS receipt FROM ledger l
             WHERE l.vm_id IS NOT NULL AND (l.vm_id, l.seq) <= (p_vm COLLATE "C", p_max_seq)
               AND (l.vm_id, l.seq) > (p_vm COLLATE "C", -1)
             ORDER BY l.vm_id DESC, l.seq DESC LIMIT p_limit LOOP
        v_n := v_n + 1;
        IF (e.ts_us < p_max_ts OR (p_inclusive AND e.ts_us = p_max_ts))
           AND (CASE p_want WHEN 'receipt' THEN e.receipt = 'valid' ELSE e.kind IN ('otp', 'nonce') END) THEN
            r_seq := e.seq;
            r_all := true;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
    r_seq := NULL;
    r_all := v_n < p_limit;
    RETURN NEXT;
END $$;
