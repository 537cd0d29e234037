-- The administrator's release of a VM that refuses every decision (receipt_reaction
-- 'refuse'), recorded in the ledger with who did it and why.
CREATE OR REPLACE FUNCTION rg_clear_vm(p_vm text, p_ts bigint, p_note text, p_by text)
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
