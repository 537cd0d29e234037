-- One append outside the decision path (events, acknowledgements, enrolments).
CREATE OR REPLACE FUNCTION rg_append(p_ts bigint, p_kind text, p_vm text, p_subject text, p_digest bytea,
                          p_decision text, p_reason text, p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_head record;
    v_hash bytea;
BEGIN
    SELECT seq, hash INTO v_head FROM ledger_head WHERE id FOR UPDATE;
    v_hash := rg_chain_insert(v_head.hash, v_head.seq + 1, p_ts, p_kind, p_vm, p_subject, p_digest,
                              p_decision, p_reason, p_payload);
    UPDATE ledger_head SET seq = v_head.seq + 1, hash = v_hash WHERE id;
    RETURN v_head.seq + 1;
END $$;
