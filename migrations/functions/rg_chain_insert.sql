-- Writes entry `p_seq` after `p_prev`; the caller holds the head lock and moves the head.
CREATE OR REPLACE FUNCTION rg_chain_insert(p_prev bytea, p_seq bigint, p_ts bigint, p_kind text, p_vm text,
                                p_subject text, p_digest bytea, p_decision text, p_reason text,
                                p_payload jsonb) RETURNS bytea
LANGUAGE plpgsql AS $$
DECLARE
    v_hash bytea := rg_entry_hash(p_prev, p_seq, p_ts, p_kind, p_vm, p_subject, p_digest,
                                  p_decision, p_reason, p_payload);
BEGIN
    INSERT INTO ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload, prev_hash, hash)
    VALUES (p_seq, p_ts, p_kind, p_vm, p_subject, p_digest, p_decision, p_reason, p_payload, p_prev, v_hash);
    RETURN v_hash;
END $$;
