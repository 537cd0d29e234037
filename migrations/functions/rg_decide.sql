-- rg_decide: the whole decision path in one round trip.
--
-- Takes a batch of decisions prepared by the service (codes already matched against the
-- token's secret, credentials already reduced to keyed digests) and, in one transaction
-- holding the ledger head lock:
--   1. checks the guest's receipt against the latest one issued to the VM (rollback,
--      clone, forgery) and opens a rollback window when the guest went back in time,
--      unless, under p_refuse, it is the receipt a reported revert or restore left on the
--      guest's disk (vms.revert_seq, set by rg_ingest_event): the event already opened the
--      window and refused the VM, and the guest's first receipt after it re-syncs it; so
--      does the receipt of its source a reported clone's disk holds (revert_source_vm_id):
--      no clone_detected;
--   2. consumes the credential atomically (UPDATE otp_credentials ... WHERE last_counter <
--      step, or INSERT ... ON CONFLICT DO NOTHING): this, not any read, is what makes it
--      once. An OTP's high-water belongs to its credential (the secret's fingerprint), not
--      to the token row, so a secret enrolled again carries every code already accepted; a
--      nonce's digest goes into spent_nonces, kept for good with the accepting entry's seq,
--      and a nonce presented again has its first use read from the ledger entry it names;
--   3. classifies a reject (reused, or replay_after_rollback when the first use fell
--      inside a rollback window, the alert then listing the window's at-risk uses), applies
--      RFC 4226 §7.3 throttling, raises or joins alerts;
--   4. appends the chained ledger row and moves the VM's receipt position.
-- An alert's summary names each identifier through rg_quoted, built only where the alert is
-- raised.
-- Items: replayguard/core/decide_item.py DecideItem.to_wire(), field for field:
--   {"kind": "otp"|"nonce", "ts_us", "vm_id", "subject", "payload": {...},
--    "receipt": "absent"|"missing"|"valid"|"invalid", "receipt_vm_id", "receipt_seq",
--    "receipt_request", "receipt_unanswered" (hex digests of the caller's request ids), "preset_reason",
--    "expires_us", nonce: "digest" (hex), OTP: "token_id", "credential" (hex), "steps": [..],
--    "step_digests": {"<step>": "<hex digest>"}, "replay_only" (HOTP counters far behind: a replay
--    if a use of one is recorded, else invalid), TOTP: "period_s", "drift_steps", "clock_scope"}
--
-- Every writer of ledger_head, vms, principals, otp_credentials.last_counter and
-- clock_guard holds the head lock, so plain reads under it see the latest committed state.
-- The work under the lock is kept small: the batch is decoded once into rows of
-- rg_decide_item (below), after a read of its VM ids alone; the rows of the batch's VMs are
-- read in one statement before the first item, not one an item, and kept in step with every
-- write of them; the clock guard is read once per batch and written once at its end; a
-- principal's row is written only when it changes; a VM's row only when its receipt state
-- changes, and its last-seen time once, at the end, when it moved by more than a second.
--
-- PL/pgSQL plans each statement once per connection and keeps the plan, and the
-- group-commit appender keeps its connection, so a plan made while a table was small would
-- stay in use as it grows. Hence `SET enable_seqscan = off` (every statement with an index
-- plans an index scan, whatever the table's size at planning time) and the lookup of an
-- earlier use as `digest = ANY (ARRAY(...))`, a primary-key scan. Both are needed: the
-- regression test in tests/integration/test_decide_batch.py fails on either alone.
-- The batch's items are decoded into rows of rg_decide_item (jsonb_populate_recordset) and
-- the answers are rows of rg_decide_result. A column list written into the call
-- (jsonb_to_recordset ... AS x(...), RETURNS TABLE (...)) has its row descriptor built anew
-- at every call, a cost that a call of one item, as every call at c=1 is, pays in full; a
-- named type's descriptor is kept in the backend's type cache (bench/decide_instructions.py:
-- 5.8 % fewer instructions a call of one fresh nonce, 2.0 % fewer an item in calls of 32).
-- rg_decide_item's fields are DecideItem.to_wire()'s (replayguard/core/decide_item.py); text
-- collates in byte order, as every text column does (migration 018). The types are this
-- file's own, made again with the function: nothing else uses them.
-- PL/pgSQL prepares each expression a call evaluates once per transaction, and a call at
-- c=1 is a transaction of one item, so the loop evaluates as few as it can: an item's own
-- variables belong to the loop's block, NULL at each item's start with no assignment to
-- reset them, and a receipt's rollback and clone tests run only for a valid receipt
-- (bench/decide_instructions.py: 7.1 % fewer instructions a call of one fresh nonce, 2.5 %
-- fewer an item in calls of 32).
-- Dropped first: CREATE OR REPLACE cannot change the columns a function returns.
DROP FUNCTION IF EXISTS rg_decide(jsonb, integer, bigint, boolean);
DROP TYPE IF EXISTS rg_decide_item;
DROP TYPE IF EXISTS rg_decide_result;
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
CREATE OR REPLACE FUNCTION rg_decide(p_items jsonb, p_lock_threshold integer, p_lock_period_us bigint,
                                     p_refuse boolean)
RETURNS SETOF rg_decide_result
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    it        rg_decide_item;
    v_prev    bytea;
    v_seq     bigint;
    v_i       integer := 0;
    v_rc      text;
    v_vmrow   vms%ROWTYPE;
    v_flags   text[];
    v_verdict text;
    v_fails   integer;
    v_rseq    bigint;
    v_wstart  bigint;
    v_wend    bigint;
    v_wrow    rollback_windows%ROWTYPE;
    -- Requests reach the ledger in another order than they read the clock (a token read,
    -- a batch of another worker or instance committing first): a step behind the
    -- high-water by this much beyond the drift is that, not the host's clock going back.
    c_order_slack_us CONSTANT bigint := 5000000;
    v_steps   bigint[];
    v_payload jsonb;
    -- the clock guard of the scope last seen in this batch
    v_cg_scope text;
    v_cg_high  bigint;
    v_cg_dirty boolean := false;
    v_hash    bytea;
    -- the batch's VMs and the latest time each was seen, written once at the end
    v_vms     text[] := '{}';
    v_vms_ts  bigint[] := '{}';
    v_pos     integer;
    -- the rows of the batch's VMs, as the table holds them now (ids, and rows in that order)
    v_row_ids text[];
    v_rows    vms[];
    v_at      integer;
    v_moved   vms%ROWTYPE;
BEGIN
    SELECT h.seq, h.hash INTO v_seq, v_prev FROM ledger_head h WHERE h.id FOR UPDATE;
    SELECT coalesce(array_agg(v.vm_id), '{}'), coalesce(array_agg(v), '{}') INTO v_row_ids, v_rows
        FROM vms v WHERE v.vm_id = ANY (ARRAY(SELECT b.vm_id FROM jsonb_to_recordset(p_items) AS b(vm_id text)));

    FOR it IN SELECT * FROM jsonb_populate_recordset(NULL::rg_decide_item, p_items) LOOP
        DECLARE
            -- An item's own: each is NULL when the item starts, with no statement to reset it.
            v_vm_moved boolean;
            v_explained bigint;
            v_reason  text;
            v_alert   bigint;
            v_calert  bigint;
            v_digest  bytea;
            v_step    bigint;
            v_use     uses%ROWTYPE;
            v_window  bigint;
            v_pfails  integer;
            v_locked  bigint;
            v_new_lock bigint;
            v_floor   bigint;
            v_galert  bigint;
            v_resent  boolean;
        BEGIN
            v_seq := v_seq + 1;
            v_rc := coalesce(it.receipt, 'absent');
            v_flags := '{}';
            v_verdict := 'reject';
            v_steps := coalesce(it.steps, '{}');

            IF it.period_s IS NOT NULL THEN
                IF v_cg_scope IS DISTINCT FROM it.clock_scope THEN
                    IF v_cg_dirty THEN
                        INSERT INTO clock_guard VALUES (v_cg_scope, v_cg_high)
                            ON CONFLICT (scope) DO UPDATE SET high_us = excluded.high_us
                            WHERE clock_guard.high_us < excluded.high_us;
                        v_cg_dirty := false;
                    END IF;
                    v_cg_scope := it.clock_scope;
                    SELECT high_us INTO v_cg_high FROM clock_guard WHERE scope = it.clock_scope;
                END IF;
                IF (it.ts_us + c_order_slack_us) / (it.period_s * 1000000)
                        < v_cg_high / (it.period_s * 1000000) - it.drift_steps THEN
                    v_floor := v_cg_high;
                    v_galert := rg_alert('clock_regression', 'critical', it.vm_id, NULL,
                        'clock_regression:' || it.clock_scope, it.ts_us, v_seq,
                        'The host clock is behind the highest TOTP step already accepted',
                        jsonb_build_object('high_water_us', v_floor, 'now_us', it.ts_us));
                END IF;
            END IF;

            v_at := array_position(v_row_ids, it.vm_id);
            IF v_at IS NULL THEN
                INSERT INTO vms (vm_id, first_seen_us, last_seen_us) VALUES (it.vm_id, it.ts_us, it.ts_us)
                    RETURNING * INTO v_vmrow;
                v_row_ids := v_row_ids || it.vm_id;
                v_rows := v_rows || v_vmrow;
                v_at := cardinality(v_row_ids);
            ELSE
                v_vmrow := v_rows[v_at];
            END IF;

            -- 1. State continuity.
            IF v_rc = 'valid' THEN
                -- The receipt presented with the request that last moved the VM's position,
                -- sent with that request's id as unanswered: the guest never got the answer (a
                -- timeout, a crash before storing it), not a disk gone back. Never NULL here: a
                -- VM whose newest request named no id (receipt_request NULL) must not make "NOT
                -- v_resent" unknown, which would skip the rollback branch below.
                v_resent := coalesce(it.receipt_unanswered IS NOT NULL AND it.receipt_vm_id = it.vm_id
                    AND it.receipt_seq < v_vmrow.last_receipt_seq AND it.receipt_seq = v_vmrow.receipt_request_from
                    AND decode(it.receipt_unanswered, 'hex') = v_vmrow.receipt_request, false);
                IF it.receipt_vm_id <> it.vm_id AND p_refuse
                   AND it.receipt_vm_id = v_vmrow.revert_source_vm_id
                   AND it.receipt_seq BETWEEN v_vmrow.revert_receipt_seq AND v_vmrow.revert_receipt_max THEN
                    -- A receipt of the source the reported clone's disk holds (issued at or before
                    -- the clone's state time): the event's window on the source covers every use it
                    -- shows the clone may repeat. Once: the position moves, and the UPDATE below
                    -- forgets the clone's record.
                    v_explained := v_vmrow.revert_seq;
                ELSIF it.receipt_vm_id <> it.vm_id THEN
                    -- A clone carries its source's state as of that receipt: the source's later
                    -- uses are unknown to the clone, so they are at risk.
                    v_rseq := it.receipt_seq;
                    v_flags := v_flags || 'clone_detected'::text;
                    SELECT w.start_us, w.end_us INTO v_wstart, v_wend
                        FROM rg_receipt_window(it.receipt_vm_id, v_rseq, it.ts_us) w;
                    INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)
                        VALUES (it.receipt_vm_id, v_wstart, v_wend, 'receipt_clone', v_seq);
                    v_vmrow.epoch := v_vmrow.epoch + 1;
                    v_alert := rg_alert('clone_detected', 'warning', it.vm_id, NULL,
                        'clone:' || it.vm_id || ':' || it.receipt_vm_id, it.ts_us, v_seq,
                        'VM ' || rg_quoted(it.vm_id) || ' presented a receipt issued to VM '
                            || rg_quoted(it.receipt_vm_id),
                        jsonb_build_object('source_vm_id', it.receipt_vm_id, 'receipt_seq', v_rseq));
                ELSIF it.receipt_seq < v_vmrow.last_receipt_seq AND NOT v_resent AND p_refuse
                   AND it.receipt_seq >= v_vmrow.revert_receipt_seq AND v_vmrow.revert_source_vm_id IS NULL THEN
                    -- The receipt the reported revert put back (or one issued between its snapshot and
                    -- the revert): every use it shows undone is in the event's window. Once: the
                    -- position moves, and the UPDATE below forgets the revert.
                    v_explained := v_vmrow.revert_seq;
                ELSIF it.receipt_seq < v_vmrow.last_receipt_seq AND NOT v_resent THEN
                    v_rseq := it.receipt_seq;
                    v_flags := v_flags || 'rollback_detected'::text;
                    SELECT w.start_us, w.end_us INTO v_wstart, v_wend
                        FROM rg_receipt_window(it.vm_id, v_rseq, it.ts_us) w;
                    INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)
                        VALUES (it.vm_id, v_wstart, v_wend, 'receipt', v_seq);
                    v_vmrow.epoch := v_vmrow.epoch + 1;
                    v_alert := rg_alert('rollback_detected', 'critical', it.vm_id, NULL,
                        'rollback:' || it.vm_id || ':' || coalesce(v_rseq::text, 'none'), it.ts_us, v_seq,
                        'VM ' || rg_quoted(it.vm_id) || ' presented an old receipt: its state went back in time',
                        jsonb_build_object('receipt_seq', v_rseq, 'latest_issued_seq', v_vmrow.last_receipt_seq));
                END IF;
                IF p_refuse AND (v_flags && ARRAY['rollback_detected', 'clone_detected']) THEN
                    v_vmrow.refusing := true;
                    v_vmrow.refusing_reason := v_flags[1];
                END IF;
            ELSIF v_rc = 'invalid' THEN
                v_flags := v_flags || 'receipt_invalid'::text;
                v_alert := rg_alert('receipt_invalid', 'warning', it.vm_id, NULL, 'receipt_invalid:' || it.vm_id,
                    it.ts_us, v_seq, 'VM ' || rg_quoted(it.vm_id) || ' presented a receipt that does not verify',
                    '{}'::jsonb);
            ELSIF v_rc = 'missing' AND v_vmrow.receipts_seen THEN
                -- A caller that keeps receipts has none, on a VM that presented one before:
                -- its disk went back past its first receipt, or the file was removed. The
                -- span is unknown, so no window is opened (that would also let whoever can
                -- delete the file lock the VM); the analyst is told.
                v_flags := v_flags || 'receipt_missing'::text;
                v_alert := rg_alert('receipt_missing', 'warning', it.vm_id, NULL, 'receipt_missing:' || it.vm_id,
                    it.ts_us, v_seq,
                    'VM ' || rg_quoted(it.vm_id) || ' keeps receipts but presented none after earlier ones',
                    jsonb_build_object('latest_issued_seq', v_vmrow.last_receipt_seq));
            END IF;
            -- Only a caller that keeps receipts moves the position: a RADIUS callout on the
            -- same VM that never sends one must not make the PAM helper's receipt stale.
            v_vm_moved := v_rc = 'valid' OR cardinality(v_flags) > 0;

            -- 2 and 3. The credential.
            IF v_vmrow.refusing THEN
                v_reason := 'locked_out';
            ELSIF it.preset_reason IS NOT NULL AND it.preset_reason <> 'reused'
                  AND NOT (it.kind = 'nonce' AND it.preset_reason = 'expired') THEN
                v_reason := it.preset_reason;
            ELSIF it.kind = 'nonce' THEN
                v_digest := decode(it.digest, 'hex');
                IF it.preset_reason IS NULL THEN
                    INSERT INTO spent_nonces (digest, first_seq) VALUES (v_digest, v_seq)
                        ON CONFLICT (digest) DO NOTHING;
                    IF FOUND THEN
                        v_verdict := 'accept';
                        v_reason := 'ok';
                    END IF;
                END IF;
                IF v_reason IS NULL THEN
                    -- Its first use (VM, time), which tells reused from replay_after_rollback.
                    SELECT l.cred_digest, 'nonce', l.vm_id, l.subject, l.seq, l.ts_us, NULL::bigint INTO v_use
                        FROM spent_nonces s JOIN ledger l ON l.seq = s.first_seq
                        WHERE s.digest = v_digest AND l.cred_digest = v_digest;
                    -- An expired nonce remembered as used is classified as a replay (one undone
                    -- by a rollback is reported whatever its ttl); one never used is expired.
                    IF v_use.digest IS NULL AND it.preset_reason = 'expired' THEN
                        v_reason := 'expired';
                    END IF;
                END IF;
            ELSE
                SELECT locked_until_us, fail_count INTO v_locked, v_pfails FROM principals WHERE name = it.subject;
                IF it.replay_only AND NOT coalesce(v_locked > it.ts_us, false) THEN
                    -- HOTP counters far behind the token's (core/otp.py hotp_replayed), never
                    -- accepted: the code is a replay when one of their uses is recorded (not
                    -- counted as a failure), else invalid like any wrong code.
                    SELECT u.* INTO v_use FROM uses u
                        WHERE u.digest = ANY (ARRAY(SELECT decode(value, 'hex') FROM jsonb_each_text(it.step_digests)))
                        ORDER BY u.first_seq DESC LIMIT 1;
                    IF v_use.digest IS NULL THEN
                        v_steps := '{}';
                    END IF;
                END IF;
                IF v_locked > it.ts_us THEN
                    v_reason := 'locked_out';
                ELSIF cardinality(v_steps) = 0 THEN
                    v_reason := 'invalid';
                    INSERT INTO principals AS pr (name, fail_count) VALUES (it.subject, 1)
                        ON CONFLICT (name) DO UPDATE SET fail_count = pr.fail_count + 1
                        RETURNING pr.fail_count INTO v_fails;
                    IF v_fails >= p_lock_threshold THEN
                        v_locked := it.ts_us + p_lock_period_us;
                        v_new_lock := v_locked;
                        UPDATE principals SET fail_count = 0, locked_until_us = v_locked WHERE name = it.subject;
                        v_calert := rg_alert('brute_force', 'warning', it.vm_id, it.subject, 'brute:' || it.subject,
                            it.ts_us, v_seq,
                            v_fails || ' consecutive failures for ' || rg_quoted(it.subject) || ': locked out',
                            jsonb_build_object('failures', v_fails, 'locked_until_us', it.ts_us + p_lock_period_us));
                    END IF;
                ELSIF it.replay_only THEN
                    v_digest := v_use.digest;  -- classified below as a replay
                ELSE
                    IF v_floor IS NOT NULL THEN
                        -- The host clock went back: only steps above the high-water may pass.
                        v_steps := ARRAY(SELECT s FROM unnest(v_steps) s WHERE s * it.period_s * 1000000 > v_floor);
                    END IF;
                    IF it.preset_reason IS NULL AND cardinality(v_steps) > 0 THEN
                        UPDATE otp_credentials c SET last_counter = (
                                SELECT min(s) FROM unnest(v_steps) s WHERE s > c.last_counter)
                            WHERE c.fingerprint = decode(it.credential, 'hex')
                              AND c.last_counter < (SELECT max(s) FROM unnest(v_steps) s)
                              AND EXISTS (SELECT 1 FROM otp_tokens t WHERE t.id = it.token_id AND t.deleted_at IS NULL)
                            RETURNING c.last_counter INTO v_step;
                    END IF;
                    IF v_step IS NOT NULL THEN
                        v_verdict := 'accept';
                        v_reason := 'ok';
                        v_digest := decode(it.step_digests->>(v_step::text), 'hex');
                        INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)
                            VALUES (v_digest, 'otp', it.vm_id, it.subject, v_seq, it.ts_us, it.expires_us)
                            ON CONFLICT (digest) DO NOTHING;
                        IF v_pfails <> 0 THEN
                            UPDATE principals SET fail_count = 0 WHERE name = it.subject;
                        END IF;
                        -- The guard keeps the time the host has surely reached: the step's start,
                        -- or the host's clock for a step accepted ahead of it (within the drift),
                        -- so that tokens of shorter periods do not read a long step ahead as the
                        -- clock going back.
                        IF it.period_s IS NOT NULL
                           AND (v_cg_high IS NULL OR v_cg_high < least(v_step * it.period_s * 1000000, it.ts_us)) THEN
                            v_cg_high := least(v_step * it.period_s * 1000000, it.ts_us);
                            v_cg_dirty := true;
                        END IF;
                    ELSIF NOT EXISTS (SELECT 1 FROM otp_tokens WHERE id = it.token_id AND deleted_at IS NULL) THEN
                        v_reason := 'no_token';
                    ELSE
                        -- = ANY over an array, not IN over a set-returning function: the
                        -- cached generic plan of the latter estimates 100 candidates and
                        -- hashes the whole of uses for each replayed code.
                        SELECT u.* INTO v_use FROM uses u
                            WHERE u.digest = ANY (ARRAY(
                                SELECT decode(value, 'hex') FROM jsonb_each_text(it.step_digests)))
                            ORDER BY u.first_seq DESC LIMIT 1;
                        v_digest := coalesce(v_use.digest, decode(it.step_digests->>(
                            (SELECT max(s) FROM unnest(it.steps) s)::text), 'hex'));
                        -- A code for a time the host already left behind is invalid, unless its
                        -- credential accepted a later step: then it is an older code, reused.
                        IF v_use.digest IS NULL AND v_floor IS NOT NULL AND NOT EXISTS (
                                SELECT 1 FROM otp_credentials c WHERE c.fingerprint = decode(it.credential, 'hex')
                                  AND c.last_counter >= (SELECT max(s) FROM unnest(it.steps) s)) THEN
                            v_reason := 'invalid';
                            v_calert := v_galert;
                        END IF;
                    END IF;
                END IF;
            END IF;

            IF v_verdict = 'reject' AND v_reason IS NULL THEN
                -- Presented before. Was its first use undone by a rollback?
                IF v_use.digest IS NOT NULL THEN
                    v_window := rg_at_risk(v_use.vm_id, v_use.first_ts_us);
                END IF;
                IF v_window IS NOT NULL THEN
                    v_reason := 'replay_after_rollback';
                    -- Every use the window put at risk, as rg_reclassify lists them.
                    SELECT * INTO v_wrow FROM rollback_windows WHERE id = v_window;
                    v_calert := rg_alert('replay_after_rollback', 'critical', it.vm_id, v_use.subject,
                        'cred:' || encode(v_digest, 'hex'), it.ts_us, v_seq,
                        'A credential first used on VM ' || rg_quoted(v_use.vm_id)
                            || ' inside a rollback window was presented again',
                        jsonb_build_object('window_id', v_window, 'first_seq', v_use.first_seq,
                                           'first_vm_id', v_use.vm_id,
                                           'at_risk_uses',
                                           rg_window_uses(v_wrow.vm_id, v_wrow.start_us, v_wrow.end_us, 50)));
                    INSERT INTO alert_entries VALUES (v_calert, v_use.first_seq) ON CONFLICT DO NOTHING;
                    INSERT INTO alert_entries SELECT v_calert, seq FROM rollback_windows WHERE id = v_window
                        ON CONFLICT DO NOTHING;  -- the event (or decision) that opened the window
                ELSE
                    v_reason := 'reused';
                    IF v_use.digest IS NOT NULL THEN
                        v_calert := rg_alert('reuse', 'warning', it.vm_id, v_use.subject,
                            'cred:' || encode(v_digest, 'hex'), it.ts_us, v_seq,
                            'A credential was presented again', jsonb_build_object(
                                'first_seq', v_use.first_seq, 'first_vm_id', v_use.vm_id,
                                'first_ts_us', v_use.first_ts_us));
                        INSERT INTO alert_entries VALUES (v_calert, v_use.first_seq) ON CONFLICT DO NOTHING;
                    END IF;
                END IF;
            END IF;

            -- 4. The ledger entry, chained to the one before it, and the VM's position.
            -- Built key by key, each optional key only when it has a value (what jsonb_strip_nulls
            -- over one object with all of them gives, for less).
            v_payload := coalesce(it.payload, '{}'::jsonb) || jsonb_build_object(
                    'flags', to_jsonb(v_flags), 'epoch', v_vmrow.epoch, 'receipt', v_rc);
            IF it.token_id IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('token_id', it.token_id);
            END IF;
            IF v_step IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('counter', v_step);
            END IF;
            IF v_window IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('window_id', v_window);
            END IF;
            IF coalesce(v_calert, v_alert) IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('alert_id', coalesce(v_calert, v_alert));
            END IF;
            IF it.receipt_seq IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('receipt_seq', it.receipt_seq::text);
            END IF;
            IF v_floor IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('clock_regression', true);
            END IF;
            IF v_resent THEN
                v_payload := v_payload || jsonb_build_object('receipt_resent', true);
            END IF;
            IF v_explained IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('receipt_explained_by', v_explained::text);
            END IF;
            -- What the state tables must hold because of this entry, for `ledger verify`
            -- (replayguard/services/state_check.py): an accepted OTP code's use row until it
            -- expires (a nonce's spent row is kept for good: nothing to say), and the lock this
            -- entry set.
            IF v_verdict = 'accept' AND it.kind = 'otp' AND it.expires_us IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('use_expires_us', it.expires_us::text);
            END IF;
            IF v_new_lock IS NOT NULL THEN
                v_payload := v_payload || jsonb_build_object('locked_until_us', v_new_lock::text);
            END IF;
            v_hash := rg_entry_hash(v_prev, v_seq, it.ts_us, it.kind, it.vm_id, it.subject, v_digest, v_verdict,
                                    v_reason, v_payload);
            INSERT INTO ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload, prev_hash,
                                hash)
                VALUES (v_seq, it.ts_us, it.kind, it.vm_id, it.subject, v_digest, v_verdict, v_reason, v_payload,
                        v_prev, v_hash);
            v_prev := v_hash;
            -- A VM's last-seen time is kept to within a second: a row rewritten at every
            -- decision costs a heap update each time and bloats `vms` between vacuums.
            v_pos := array_position(v_vms, it.vm_id);
            IF v_vmrow.last_seen_us >= it.ts_us - 1000000 THEN
                NULL;
            ELSIF v_pos IS NULL THEN
                v_vms := v_vms || it.vm_id;
                v_vms_ts := v_vms_ts || it.ts_us;
            ELSIF v_vms_ts[v_pos] < it.ts_us THEN
                v_vms_ts[v_pos] := it.ts_us;
            END IF;
            IF v_vm_moved THEN
                UPDATE vms SET last_receipt_seq = CASE WHEN v_rc = 'valid' THEN v_seq ELSE last_receipt_seq END,
                               receipt_request = CASE WHEN v_rc = 'valid' THEN decode(it.receipt_request, 'hex')
                                                 ELSE receipt_request END,
                               receipt_request_from = CASE WHEN v_rc = 'valid' THEN it.receipt_seq
                                                      ELSE receipt_request_from END,
                               epoch = v_vmrow.epoch, refusing = v_vmrow.refusing,
                               refusing_reason = v_vmrow.refusing_reason,
                               receipts_seen = receipts_seen OR v_rc = 'valid',
                               revert_seq = NULL, revert_receipt_seq = NULL, revert_source_vm_id = NULL,
                               revert_receipt_max = NULL
                    WHERE vm_id = it.vm_id
                    RETURNING * INTO v_moved;
                v_rows[v_at] := v_moved;
            END IF;

            -- r_hash, the entry's hash: the continuity guard checks later that it is still there.
            RETURN NEXT ROW(v_i, v_seq, v_verdict, v_reason, v_flags, coalesce(v_calert, v_alert, v_galert),
                            v_vmrow.epoch, CASE WHEN v_rc = 'valid' THEN v_seq ELSE v_vmrow.last_receipt_seq END,
                            CASE WHEN v_locked > it.ts_us THEN v_locked END, v_hash)::rg_decide_result;
            v_i := v_i + 1;
        END;
    END LOOP;

    IF v_cg_dirty THEN
        INSERT INTO clock_guard VALUES (v_cg_scope, v_cg_high)
            ON CONFLICT (scope) DO UPDATE SET high_us = excluded.high_us
            WHERE clock_guard.high_us < excluded.high_us;
    END IF;
    -- One UPDATE per VM of the batch, not a join over the arrays: a join's plan depends on
    -- the arrays' sizes, so PostgreSQL would plan it afresh at every call.
    FOR v_pos IN 1 .. cardinality(v_vms) LOOP
        UPDATE vms SET last_seen_us = v_vms_ts[v_pos] WHERE vm_id = v_vms[v_pos] AND last_seen_us < v_vms_ts[v_pos];
    END LOOP;
    UPDATE ledger_head SET seq = v_seq, hash = v_prev WHERE id;
END $$;
