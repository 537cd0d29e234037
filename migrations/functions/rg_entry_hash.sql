-- The canonical hash of one entry; mirrors replayguard/core/chain.py. STABLE, like the
-- convert_to it calls, so the planner can inline it into its callers.
CREATE OR REPLACE FUNCTION rg_entry_hash(p_prev bytea, p_seq bigint, p_ts bigint, p_kind text, p_vm text,
                              p_subject text, p_digest bytea, p_decision text, p_reason text,
                              p_payload jsonb) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT sha256(p_prev || convert_to(
        p_seq::text || chr(31) || p_ts::text || chr(31) || p_kind || chr(31) ||
        coalesce(p_vm, '') || chr(31) || coalesce(p_subject, '') || chr(31) ||
        coalesce(encode(p_digest, 'hex'), '') || chr(31) || coalesce(p_decision, '') || chr(31) ||
        coalesce(p_reason, '') || chr(31) || p_payload::text, 'UTF8'))
$$;
