-- replayguard 045: named types for rg_decide's items and answers.
--
-- rg_decide decodes its batch into rows of rg_decide_item (jsonb_populate_recordset) and
-- returns rows of rg_decide_result. A column list written into the call (jsonb_to_recordset
-- ... AS x(...), RETURNS TABLE (...)) has its row descriptor built anew at every call, a
-- cost that a call of one item, as every call at c=1 is, pays in full; a named type's
-- descriptor is kept in the backend's type cache. Together they cost PostgreSQL about 6 %
-- fewer instructions a call of one fresh nonce and 2 % fewer an item in calls of 32
-- (bench/decide_instructions.py). rg_decide_item's fields are DecideItem.to_wire()'s
-- (replayguard/core/decide_item.py); text collates in byte order, as every text column
-- does (018).
CREATE TYPE rg_decide_item AS (
    kind text COLLATE "C", ts_us bigint, vm_id text COLLATE "C", subject text COLLATE "C",
    token_id text COLLATE "C", credential text COLLATE "C", steps bigint[], step_digests jsonb,
    replay_only boolean, digest text COLLATE "C", expires_us bigint, preset_reason text COLLATE "C",
    receipt text COLLATE "C", receipt_vm_id text COLLATE "C", receipt_seq bigint,
    receipt_request text COLLATE "C", receipt_unanswered text COLLATE "C", payload jsonb,
    period_s bigint, drift_steps integer, clock_scope text COLLATE "C"
);
CREATE TYPE rg_decide_result AS (
    r_idx integer, r_seq bigint, r_verdict text COLLATE "C", r_reason text COLLATE "C",
    r_flags text[] COLLATE "C", r_alert bigint, r_epoch integer, r_rseq bigint, r_locked_until bigint,
    r_hash bytea
);
