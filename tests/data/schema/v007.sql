-- Provenance: pg_dump --no-owner --no-privileges --inserts (PostgreSQL 15) of an empty
-- database migrated by replayguard at 43c3600 (migrations 001-007, stored functions still
-- defined inside them): the schema every deployment had before functions/ existed.
-- tests/integration/test_migrations.py upgrades it and compares it with a fresh schema.
--
-- PostgreSQL database dump
--



SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: rg_alert(text, text, text, text, text, bigint, bigint, text, jsonb); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_alert(p_kind text, p_severity text, p_vm text, p_principal text, p_dedup text, p_ts bigint, p_seq bigint, p_summary text, p_details jsonb) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO alerts AS a (kind, severity, vm_id, principal, dedup_key, first_seen_us, last_seen_us,
                             updated_us, summary, details, history)
    VALUES (p_kind, p_severity, p_vm, p_principal, p_dedup, p_ts, p_ts, p_ts, p_summary, p_details,
            jsonb_build_array(jsonb_build_object('ts_us', p_ts, 'seq', p_seq, 'change', 'raised',
                                                 'kind', p_kind, 'severity', p_severity)))
    ON CONFLICT (dedup_key) DO UPDATE SET
        count = a.count + 1,
        last_seen_us = greatest(a.last_seen_us, excluded.last_seen_us),
        updated_us = excluded.updated_us,
        status = 'open',
        kind = CASE WHEN rg_severity_rank(excluded.severity) > rg_severity_rank(a.severity)
                    THEN excluded.kind ELSE a.kind END,
        severity = CASE WHEN rg_severity_rank(excluded.severity) > rg_severity_rank(a.severity)
                        THEN excluded.severity ELSE a.severity END,
        summary = CASE WHEN rg_severity_rank(excluded.severity) > rg_severity_rank(a.severity)
                       THEN excluded.summary ELSE a.summary END,
        details = a.details || excluded.details,
        -- At 12 entries the oldest after the first (index 1) makes room.
        history = CASE WHEN jsonb_array_length(a.history) >= 12 THEN a.history - 1 ELSE a.history END
            || jsonb_build_array(jsonb_build_object(
            'ts_us', p_ts, 'seq', p_seq,
            'change', CASE WHEN a.status = 'acknowledged' THEN 'reopened' ELSE 'joined' END,
            'kind', p_kind, 'severity', p_severity))
    RETURNING a.id INTO v_id;
    INSERT INTO alert_entries VALUES (v_id, p_seq) ON CONFLICT DO NOTHING;
    PERFORM pg_notify('replayguard_alerts', v_id::text);
    RETURN v_id;
END $$;


--
-- Name: rg_alert_changed(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_alert_changed() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.change_seq := nextval('alert_changes');
    RETURN NEW;
END $$;


--
-- Name: rg_append(bigint, text, text, text, bytea, text, text, jsonb); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_append(p_ts bigint, p_kind text, p_vm text, p_subject text, p_digest bytea, p_decision text, p_reason text, p_payload jsonb) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: rg_at_risk(text, bigint); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_at_risk(p_vm text, p_ts bigint) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
    SELECT id FROM rollback_windows
    WHERE vm_id = p_vm AND end_us >= p_ts AND (start_us IS NULL OR start_us <= p_ts)
    ORDER BY id LIMIT 1
$$;


--
-- Name: rg_chain_insert(bytea, bigint, bigint, text, text, text, bytea, text, text, jsonb); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_chain_insert(p_prev bytea, p_seq bigint, p_ts bigint, p_kind text, p_vm text, p_subject text, p_digest bytea, p_decision text, p_reason text, p_payload jsonb) RETURNS bytea
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_hash bytea := rg_entry_hash(p_prev, p_seq, p_ts, p_kind, p_vm, p_subject, p_digest,
                                  p_decision, p_reason, p_payload);
BEGIN
    INSERT INTO ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload, prev_hash, hash)
    VALUES (p_seq, p_ts, p_kind, p_vm, p_subject, p_digest, p_decision, p_reason, p_payload, p_prev, v_hash);
    RETURN v_hash;
END $$;


--
-- Name: rg_clear_vm(text, bigint, text, text); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_clear_vm(p_vm text, p_ts bigint, p_note text, p_by text) RETURNS TABLE(r_seq bigint, r_was_refusing boolean, r_reason text)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: rg_clock_floor(text, bigint, bigint, integer); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_clock_floor(p_scope text, p_ts bigint, p_period bigint, p_drift integer) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
    SELECT high_us FROM clock_guard
    WHERE scope = p_scope AND p_ts / (p_period * 1000000) < high_us / (p_period * 1000000) - p_drift
$$;


--
-- Name: rg_decide(jsonb, integer, bigint, boolean); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_decide(p_items jsonb, p_lock_threshold integer, p_lock_period_us bigint, p_refuse boolean) RETURNS TABLE(r_idx integer, r_seq bigint, r_verdict text, r_reason text, r_flags text[], r_alert bigint, r_epoch integer, r_rseq bigint, r_locked_until bigint)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    AS $$
DECLARE
    it        record;
    v_prev    bytea;
    v_seq     bigint;
    v_i       integer := 0;
    v_rc      text;
    v_hot     boolean;
    v_vmrow   vms%ROWTYPE;
    v_vm_moved boolean;
    v_flags   text[];
    v_verdict text;
    v_reason  text;
    v_alert   bigint;
    v_calert  bigint;
    v_digest  bytea;
    v_step    bigint;
    v_use     uses%ROWTYPE;
    v_window  bigint;
    v_fails   integer;
    v_pfails  integer;
    v_locked  bigint;
    v_rseq    bigint;
    v_floor   bigint;
    v_steps   bigint[];
    v_galert  bigint;
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
BEGIN
    SELECT h.seq, h.hash INTO v_seq, v_prev FROM ledger_head h WHERE h.id FOR UPDATE;

    FOR it IN SELECT * FROM jsonb_to_recordset(p_items) AS x(
            k text, ts bigint, vm text, sub text, tok text, steps bigint[], dg jsonb, d text,
            exp bigint, pre text, hot boolean, rc text, rvm text, rseq bigint, p jsonb,
            tp bigint, dr integer, cg text) LOOP
        v_seq := v_seq + 1;
        v_rc := coalesce(it.rc, 'absent');
        v_hot := coalesce(it.hot, false);
        v_flags := '{}';
        v_locked := NULL;
        v_verdict := 'reject';
        v_reason := NULL;
        v_alert := NULL;
        v_calert := NULL;
        v_digest := NULL;
        v_step := NULL;
        v_window := NULL;
        v_use := NULL;
        v_galert := NULL;
        v_floor := NULL;
        v_vm_moved := false;
        v_steps := coalesce(it.steps, '{}');

        IF it.tp IS NOT NULL THEN
            IF v_cg_scope IS DISTINCT FROM it.cg THEN
                IF v_cg_dirty THEN
                    INSERT INTO clock_guard VALUES (v_cg_scope, v_cg_high)
                        ON CONFLICT (scope) DO UPDATE SET high_us = excluded.high_us
                        WHERE clock_guard.high_us < excluded.high_us;
                    v_cg_dirty := false;
                END IF;
                v_cg_scope := it.cg;
                SELECT high_us INTO v_cg_high FROM clock_guard WHERE scope = it.cg;
            END IF;
            IF it.ts / (it.tp * 1000000) < v_cg_high / (it.tp * 1000000) - it.dr THEN
                v_floor := v_cg_high;
                v_galert := rg_alert('clock_regression', 'critical', it.vm, NULL, 'clock_regression:' || it.cg,
                    it.ts, v_seq, 'The host clock is behind the highest TOTP step already accepted',
                    jsonb_build_object('high_water_us', v_floor, 'now_us', it.ts));
            END IF;
        END IF;

        SELECT * INTO v_vmrow FROM vms WHERE vm_id = it.vm;
        IF NOT FOUND THEN
            INSERT INTO vms (vm_id, first_seen_us, last_seen_us) VALUES (it.vm, it.ts, it.ts)
                RETURNING * INTO v_vmrow;
        END IF;

        -- 1. State continuity (skipped for deferred hot-cache records).
        IF NOT v_hot THEN
            IF v_rc = 'invalid' THEN
                v_flags := v_flags || 'receipt_invalid'::text;
                v_alert := rg_alert('receipt_invalid', 'warning', it.vm, NULL, 'receipt_invalid:' || it.vm,
                    it.ts, v_seq, 'VM ' || it.vm || ' presented a receipt that does not verify', '{}'::jsonb);
            ELSIF v_rc = 'valid' AND it.rvm <> it.vm THEN
                -- A clone carries its source's state as of that receipt: the source's later
                -- uses are unknown to the clone, so they are at risk.
                v_rseq := it.rseq;
                v_flags := v_flags || 'clone_detected'::text;
                INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)
                    VALUES (it.rvm, rg_receipt_window_start(v_rseq), it.ts, 'receipt_clone', v_seq);
                v_vmrow.epoch := v_vmrow.epoch + 1;
                v_alert := rg_alert('clone_detected', 'warning', it.vm, NULL,
                    'clone:' || it.vm || ':' || it.rvm, it.ts, v_seq,
                    'VM ' || it.vm || ' presented a receipt issued to VM ' || it.rvm,
                    jsonb_build_object('source_vm_id', it.rvm, 'receipt_seq', v_rseq));
            ELSIF v_rc = 'valid' AND it.rseq < v_vmrow.last_receipt_seq THEN
                v_rseq := it.rseq;
                v_flags := v_flags || 'rollback_detected'::text;
                INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)
                    VALUES (it.vm, rg_receipt_window_start(v_rseq), it.ts, 'receipt', v_seq);
                v_vmrow.epoch := v_vmrow.epoch + 1;
                v_alert := rg_alert('rollback_detected', 'critical', it.vm, NULL,
                    'rollback:' || it.vm || ':' || coalesce(v_rseq::text, 'none'), it.ts, v_seq,
                    'VM ' || it.vm || ' presented an old receipt: its state went back in time',
                    jsonb_build_object('receipt_seq', v_rseq, 'latest_issued_seq', v_vmrow.last_receipt_seq));
            END IF;
            IF p_refuse AND (v_flags && ARRAY['rollback_detected', 'clone_detected']) THEN
                v_vmrow.refusing := true;
                v_vmrow.refusing_reason := v_flags[1];
            END IF;
            -- Only a caller that keeps receipts moves the position: a RADIUS callout on the
            -- same VM that never sends one must not make the PAM helper's receipt stale.
            v_vm_moved := v_rc = 'valid' OR cardinality(v_flags) > 0;
        END IF;

        -- 2 and 3. The credential.
        IF v_vmrow.refusing THEN
            v_reason := 'locked_out';
        ELSIF it.pre IS NOT NULL AND it.pre <> 'reused' THEN
            v_reason := it.pre;
        ELSIF it.k = 'nonce' THEN
            v_digest := decode(it.d, 'hex');
            IF it.pre IS NULL THEN
                INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)
                    VALUES (v_digest, 'nonce', it.vm, it.sub, v_seq, it.ts, it.exp)
                    ON CONFLICT (digest) DO NOTHING;
                IF FOUND THEN
                    v_verdict := 'accept';
                    v_reason := 'ok';
                END IF;
            END IF;
            IF v_reason IS NULL THEN
                SELECT * INTO v_use FROM uses WHERE digest = v_digest;
            END IF;
        ELSE
            v_pfails := NULL;
            SELECT locked_until_us, fail_count INTO v_locked, v_pfails FROM principals WHERE name = it.sub;
            IF v_locked > it.ts THEN
                v_reason := 'locked_out';
            ELSIF cardinality(v_steps) = 0 THEN
                v_reason := 'invalid';
                INSERT INTO principals AS pr (name, fail_count) VALUES (it.sub, 1)
                    ON CONFLICT (name) DO UPDATE SET fail_count = pr.fail_count + 1
                    RETURNING pr.fail_count INTO v_fails;
                IF v_fails >= p_lock_threshold THEN
                    v_locked := it.ts + p_lock_period_us;
                    UPDATE principals SET fail_count = 0, locked_until_us = v_locked WHERE name = it.sub;
                    v_calert := rg_alert('brute_force', 'warning', it.vm, it.sub, 'brute:' || it.sub,
                        it.ts, v_seq, v_fails || ' consecutive failures for ' || it.sub || ': locked out',
                        jsonb_build_object('failures', v_fails, 'locked_until_us', it.ts + p_lock_period_us));
                END IF;
            ELSE
                IF v_floor IS NOT NULL THEN
                    -- The host clock went back: only steps above the high-water may pass.
                    v_steps := ARRAY(SELECT s FROM unnest(v_steps) s WHERE s * it.tp * 1000000 > v_floor);
                END IF;
                IF it.pre IS NULL AND cardinality(v_steps) > 0 THEN
                    UPDATE otp_tokens t SET last_counter = (
                            SELECT min(s) FROM unnest(v_steps) s WHERE s > t.last_counter)
                        WHERE t.id = it.tok AND t.deleted_at IS NULL
                          AND t.last_counter < (SELECT max(s) FROM unnest(v_steps) s)
                        RETURNING t.last_counter INTO v_step;
                END IF;
                IF v_step IS NOT NULL THEN
                    v_verdict := 'accept';
                    v_reason := 'ok';
                    v_digest := decode(it.dg->>(v_step::text), 'hex');
                    INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)
                        VALUES (v_digest, 'otp', it.vm, it.sub, v_seq, it.ts, it.exp)
                        ON CONFLICT (digest) DO NOTHING;
                    IF v_pfails <> 0 THEN
                        UPDATE principals SET fail_count = 0 WHERE name = it.sub;
                    END IF;
                    IF it.tp IS NOT NULL AND (v_cg_high IS NULL OR v_cg_high < v_step * it.tp * 1000000) THEN
                        v_cg_high := v_step * it.tp * 1000000;
                        v_cg_dirty := true;
                    END IF;
                ELSIF NOT EXISTS (SELECT 1 FROM otp_tokens WHERE id = it.tok AND deleted_at IS NULL) THEN
                    v_reason := 'no_token';
                ELSE
                    -- = ANY over an array, not IN over a set-returning function: the
                    -- cached generic plan of the latter estimates 100 candidates and
                    -- hashes the whole of uses for each replayed code.
                    SELECT u.* INTO v_use FROM uses u
                        WHERE u.digest = ANY (ARRAY(SELECT decode(value, 'hex') FROM jsonb_each_text(it.dg)))
                        ORDER BY u.first_seq DESC LIMIT 1;
                    v_digest := coalesce(v_use.digest, decode(it.dg->>(
                        (SELECT max(s) FROM unnest(it.steps) s)::text), 'hex'));
                    IF v_use.digest IS NULL AND v_floor IS NOT NULL THEN
                        v_reason := 'invalid';  -- a code for a time the host already left behind
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
                v_calert := rg_alert('replay_after_rollback', 'critical', it.vm, v_use.subject,
                    'cred:' || encode(v_digest, 'hex'), it.ts, v_seq,
                    'A credential first used on VM ' || v_use.vm_id || ' inside a rollback window was presented again',
                    jsonb_build_object('window_id', v_window, 'first_seq', v_use.first_seq,
                                       'first_vm_id', v_use.vm_id));
                INSERT INTO alert_entries VALUES (v_calert, v_use.first_seq) ON CONFLICT DO NOTHING;
                INSERT INTO alert_entries SELECT v_calert, seq FROM rollback_windows WHERE id = v_window
                    ON CONFLICT DO NOTHING;  -- the event (or decision) that opened the window
            ELSE
                v_reason := 'reused';
                IF v_use.digest IS NOT NULL THEN
                    v_calert := rg_alert('reuse', 'warning', it.vm, v_use.subject,
                        'cred:' || encode(v_digest, 'hex'), it.ts, v_seq,
                        'A credential was presented again', jsonb_build_object(
                            'first_seq', v_use.first_seq, 'first_vm_id', v_use.vm_id));
                    INSERT INTO alert_entries VALUES (v_calert, v_use.first_seq) ON CONFLICT DO NOTHING;
                END IF;
            END IF;
        END IF;

        -- 4. The ledger entry (hashed now, inserted with the batch) and the VM's position.
        v_payload := coalesce(it.p, '{}'::jsonb) || jsonb_strip_nulls(jsonb_build_object(
                'flags', to_jsonb(v_flags), 'epoch', v_vmrow.epoch, 'token_id', it.tok,
                'counter', v_step, 'window_id', v_window, 'alert_id', coalesce(v_calert, v_alert),
                'receipt', v_rc, 'receipt_seq', it.rseq::text, 'hot_cache', to_jsonb(it.hot),
                'clock_regression', CASE WHEN v_floor IS NOT NULL THEN true END));
        v_hash := rg_entry_hash(v_prev, v_seq, it.ts, it.k, it.vm, it.sub, v_digest, v_verdict, v_reason,
                                v_payload);
        INSERT INTO ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload, prev_hash, hash)
            VALUES (v_seq, it.ts, it.k, it.vm, it.sub, v_digest, v_verdict, v_reason, v_payload, v_prev, v_hash);
        v_prev := v_hash;
        v_pos := array_position(v_vms, it.vm);
        IF v_pos IS NULL THEN
            v_vms := v_vms || it.vm;
            v_vms_ts := v_vms_ts || it.ts;
        ELSIF v_vms_ts[v_pos] < it.ts THEN
            v_vms_ts[v_pos] := it.ts;
        END IF;
        IF v_vm_moved THEN
            UPDATE vms SET last_receipt_seq = CASE WHEN v_rc = 'valid' THEN v_seq ELSE last_receipt_seq END,
                           epoch = v_vmrow.epoch, refusing = v_vmrow.refusing,
                           refusing_reason = v_vmrow.refusing_reason,
                           receipts_seen = receipts_seen OR v_rc = 'valid'
                WHERE vm_id = it.vm;
        END IF;

        r_idx := v_i;
        r_seq := v_seq;
        r_verdict := v_verdict;
        r_reason := v_reason;
        r_flags := v_flags;
        r_alert := coalesce(v_calert, v_alert, v_galert);
        r_epoch := v_vmrow.epoch;
        r_rseq := CASE WHEN v_rc = 'valid' AND NOT v_hot THEN v_seq ELSE v_vmrow.last_receipt_seq END;
        r_locked_until := CASE WHEN v_locked > it.ts THEN v_locked END;
        RETURN NEXT;
        v_i := v_i + 1;
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


--
-- Name: rg_entry_hash(bytea, bigint, bigint, text, text, text, bytea, text, text, jsonb); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_entry_hash(p_prev bytea, p_seq bigint, p_ts bigint, p_kind text, p_vm text, p_subject text, p_digest bytea, p_decision text, p_reason text, p_payload jsonb) RETURNS bytea
    LANGUAGE sql STABLE
    AS $$
    SELECT sha256(p_prev || convert_to(
        p_seq::text || chr(31) || p_ts::text || chr(31) || p_kind || chr(31) ||
        coalesce(p_vm, '') || chr(31) || coalesce(p_subject, '') || chr(31) ||
        coalesce(encode(p_digest, 'hex'), '') || chr(31) || coalesce(p_decision, '') || chr(31) ||
        coalesce(p_reason, '') || chr(31) || p_payload::text, 'UTF8'))
$$;


--
-- Name: rg_event_context(text, text, text, text); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_event_context(p_event_id text, p_snap_vm text, p_snapshot_id text, p_vm text) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: rg_ingest_event(bigint, jsonb, bytea, jsonb, jsonb); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_ingest_event(p_ts bigint, p_event jsonb, p_digest bytea, p_windows jsonb, p_facts jsonb) RETURNS TABLE(r_seq bigint, r_windows bigint[], r_alerts bigint[])
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: rg_ledger_immutable(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_ledger_immutable() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'the replayguard ledger is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;


--
-- Name: rg_receipt_window_start(bigint); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_receipt_window_start(p_seq bigint) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$
    SELECT ts_us FROM ledger WHERE seq = p_seq
$$;


--
-- Name: rg_reclassify(bigint, bigint, bigint, text); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_reclassify(p_window bigint, p_ts bigint, p_event_seq bigint, p_event_id text) RETURNS bigint[]
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: rg_severity_rank(text); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_severity_rank(p text) RETURNS integer
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT CASE p WHEN 'critical' THEN 3 WHEN 'warning' THEN 2 ELSE 1 END
$$;


--
-- Name: rg_window_uses(text, bigint, bigint, integer); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.rg_window_uses(p_vm text, p_start bigint, p_end bigint, p_limit integer) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('seq', first_seq, 'kind', kind, 'subject', subject,
                                                 'vm_id', vm_id, 'ts_us', first_ts_us) ORDER BY first_seq),
                    '[]'::jsonb)
    FROM (SELECT * FROM uses
          WHERE vm_id = p_vm AND first_ts_us <= p_end AND (p_start IS NULL OR first_ts_us >= p_start)
          ORDER BY first_seq LIMIT p_limit) covered
$$;


--
-- Name: alert_changes; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.alert_changes
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: alert_entries; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.alert_entries (
    alert_id bigint NOT NULL,
    seq bigint NOT NULL
);


--
-- Name: alerts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.alerts (
    id bigint NOT NULL,
    kind text NOT NULL,
    severity text NOT NULL,
    status text DEFAULT 'open'::text NOT NULL,
    vm_id text,
    principal text,
    dedup_key text NOT NULL,
    count integer DEFAULT 1 NOT NULL,
    first_seen_us bigint NOT NULL,
    last_seen_us bigint NOT NULL,
    updated_us bigint NOT NULL,
    summary text NOT NULL,
    details jsonb DEFAULT '{}'::jsonb NOT NULL,
    history jsonb DEFAULT '[]'::jsonb NOT NULL,
    ack_by text,
    ack_note text,
    ack_us bigint,
    change_seq bigint NOT NULL,
    CONSTRAINT alerts_severity_check CHECK ((severity = ANY (ARRAY['info'::text, 'warning'::text, 'critical'::text]))),
    CONSTRAINT alerts_status_check CHECK ((status = ANY (ARRAY['open'::text, 'acknowledged'::text])))
);


--
-- Name: alerts_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.alerts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: alerts_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.alerts_id_seq OWNED BY public.alerts.id;


--
-- Name: api_tokens; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.api_tokens (
    id text NOT NULL,
    name text NOT NULL,
    role text NOT NULL,
    digest bytea NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    revoked_at timestamp with time zone,
    CONSTRAINT api_tokens_role_check CHECK ((role = ANY (ARRAY['callout'::text, 'hypervisor'::text, 'analyst'::text, 'admin'::text])))
);


--
-- Name: checkpoints; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.checkpoints (
    seq bigint NOT NULL,
    hash bytea NOT NULL,
    ts_us bigint NOT NULL,
    key_id text NOT NULL,
    signature bytea NOT NULL
);


--
-- Name: clock_guard; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.clock_guard (
    scope text NOT NULL,
    high_us bigint NOT NULL
);


--
-- Name: hypervisor_events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.hypervisor_events (
    event_id text NOT NULL,
    body_digest bytea NOT NULL,
    type text NOT NULL,
    vm_id text NOT NULL,
    seq bigint NOT NULL,
    received_us bigint NOT NULL,
    payload jsonb NOT NULL
);


--
-- Name: ledger; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.ledger (
    seq bigint NOT NULL,
    ts_us bigint NOT NULL,
    kind text NOT NULL,
    vm_id text,
    subject text,
    cred_digest bytea,
    decision text,
    reason text,
    payload jsonb DEFAULT '{}'::jsonb NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL
);


--
-- Name: ledger_head; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.ledger_head (
    id boolean DEFAULT true NOT NULL,
    seq bigint NOT NULL,
    hash bytea NOT NULL,
    CONSTRAINT ledger_head_id_check CHECK (id)
);


--
-- Name: otp_tokens; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.otp_tokens (
    id text NOT NULL,
    principal text NOT NULL,
    type text NOT NULL,
    secret_ct bytea NOT NULL,
    digits integer NOT NULL,
    period integer NOT NULL,
    algorithm text NOT NULL,
    last_counter bigint DEFAULT '-1'::integer NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    deleted_at timestamp with time zone,
    CONSTRAINT otp_tokens_type_check CHECK ((type = ANY (ARRAY['totp'::text, 'hotp'::text])))
);


--
-- Name: principals; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.principals (
    name text NOT NULL,
    fail_count integer DEFAULT 0 NOT NULL,
    locked_until_us bigint DEFAULT 0 NOT NULL
);


--
-- Name: rollback_windows; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.rollback_windows (
    id bigint NOT NULL,
    vm_id text NOT NULL,
    start_us bigint,
    end_us bigint NOT NULL,
    cause text NOT NULL,
    event_id text,
    seq bigint NOT NULL
);


--
-- Name: rollback_windows_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.rollback_windows_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: rollback_windows_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.rollback_windows_id_seq OWNED BY public.rollback_windows.id;


--
-- Name: schema_migrations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Name: sink_feed; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.sink_feed (
    id boolean DEFAULT true NOT NULL,
    alert_change_seq bigint NOT NULL,
    checkpoint_seq bigint NOT NULL,
    CONSTRAINT sink_feed_id_check CHECK (id)
);


--
-- Name: uses; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.uses (
    digest bytea NOT NULL,
    kind text NOT NULL,
    vm_id text NOT NULL,
    subject text NOT NULL,
    first_seq bigint NOT NULL,
    first_ts_us bigint NOT NULL,
    expires_us bigint
);


--
-- Name: vm_lineage; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.vm_lineage (
    vm_id text NOT NULL,
    parent_vm_id text NOT NULL,
    split_us bigint NOT NULL,
    event_id text NOT NULL
);


--
-- Name: vm_snapshots; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.vm_snapshots (
    vm_id text NOT NULL,
    snapshot_id text NOT NULL,
    created_us bigint NOT NULL,
    event_id text NOT NULL
);


--
-- Name: vms; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.vms (
    vm_id text NOT NULL,
    first_seen_us bigint NOT NULL,
    last_seen_us bigint NOT NULL,
    epoch integer DEFAULT 0 NOT NULL,
    last_receipt_seq bigint DEFAULT 0 NOT NULL,
    receipts_seen boolean DEFAULT false NOT NULL,
    refusing boolean DEFAULT false NOT NULL,
    refusing_reason text
);


--
-- Name: alerts id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts ALTER COLUMN id SET DEFAULT nextval('public.alerts_id_seq'::regclass);


--
-- Name: rollback_windows id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.rollback_windows ALTER COLUMN id SET DEFAULT nextval('public.rollback_windows_id_seq'::regclass);


--
-- Data for Name: alert_entries; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: alerts; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: api_tokens; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: checkpoints; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: clock_guard; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: hypervisor_events; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: ledger; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: ledger_head; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.ledger_head VALUES (true, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');


--
-- Data for Name: otp_tokens; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: principals; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: rollback_windows; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: schema_migrations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.schema_migrations VALUES (1, '001_core.sql', '2026-12-02 23:53:14.297151+00');
INSERT INTO public.schema_migrations VALUES (2, '002_decide.sql', '2026-12-02 23:53:14.408149+00');
INSERT INTO public.schema_migrations VALUES (3, '003_events.sql', '2026-12-02 23:53:14.420002+00');
INSERT INTO public.schema_migrations VALUES (4, '004_analysts.sql', '2026-12-02 23:53:14.440063+00');
INSERT INTO public.schema_migrations VALUES (5, '005_decide_lean.sql', '2026-12-02 23:53:14.488164+00');
INSERT INTO public.schema_migrations VALUES (6, '006_replay_lookup.sql', '2026-12-02 23:53:14.496011+00');
INSERT INTO public.schema_migrations VALUES (7, '007_alert_history_cap.sql', '2026-12-02 23:53:14.504191+00');


--
-- Data for Name: sink_feed; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: uses; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: vm_lineage; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: vm_snapshots; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: vms; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Name: alert_changes; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.alert_changes', 1, false);


--
-- Name: alerts_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.alerts_id_seq', 1, false);


--
-- Name: rollback_windows_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.rollback_windows_id_seq', 1, false);


--
-- Name: alert_entries alert_entries_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alert_entries
    ADD CONSTRAINT alert_entries_pkey PRIMARY KEY (alert_id, seq);


--
-- Name: alerts alerts_dedup_key_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts
    ADD CONSTRAINT alerts_dedup_key_key UNIQUE (dedup_key);


--
-- Name: alerts alerts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts
    ADD CONSTRAINT alerts_pkey PRIMARY KEY (id);


--
-- Name: api_tokens api_tokens_digest_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_tokens
    ADD CONSTRAINT api_tokens_digest_key UNIQUE (digest);


--
-- Name: api_tokens api_tokens_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_tokens
    ADD CONSTRAINT api_tokens_pkey PRIMARY KEY (id);


--
-- Name: checkpoints checkpoints_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.checkpoints
    ADD CONSTRAINT checkpoints_pkey PRIMARY KEY (seq);


--
-- Name: clock_guard clock_guard_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.clock_guard
    ADD CONSTRAINT clock_guard_pkey PRIMARY KEY (scope);


--
-- Name: hypervisor_events hypervisor_events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.hypervisor_events
    ADD CONSTRAINT hypervisor_events_pkey PRIMARY KEY (event_id);


--
-- Name: ledger_head ledger_head_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.ledger_head
    ADD CONSTRAINT ledger_head_pkey PRIMARY KEY (id);


--
-- Name: ledger ledger_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.ledger
    ADD CONSTRAINT ledger_pkey PRIMARY KEY (seq);


--
-- Name: otp_tokens otp_tokens_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.otp_tokens
    ADD CONSTRAINT otp_tokens_pkey PRIMARY KEY (id);


--
-- Name: principals principals_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.principals
    ADD CONSTRAINT principals_pkey PRIMARY KEY (name);


--
-- Name: rollback_windows rollback_windows_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.rollback_windows
    ADD CONSTRAINT rollback_windows_pkey PRIMARY KEY (id);


--
-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);


--
-- Name: sink_feed sink_feed_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sink_feed
    ADD CONSTRAINT sink_feed_pkey PRIMARY KEY (id);


--
-- Name: uses uses_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.uses
    ADD CONSTRAINT uses_pkey PRIMARY KEY (digest);


--
-- Name: vm_lineage vm_lineage_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.vm_lineage
    ADD CONSTRAINT vm_lineage_pkey PRIMARY KEY (vm_id);


--
-- Name: vm_snapshots vm_snapshots_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.vm_snapshots
    ADD CONSTRAINT vm_snapshots_pkey PRIMARY KEY (vm_id, snapshot_id, created_us);


--
-- Name: vms vms_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.vms
    ADD CONSTRAINT vms_pkey PRIMARY KEY (vm_id);


--
-- Name: alert_entries_seq; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alert_entries_seq ON public.alert_entries USING btree (seq);


--
-- Name: alerts_change_seq; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX alerts_change_seq ON public.alerts USING btree (change_seq);


--
-- Name: alerts_first_seen; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_first_seen ON public.alerts USING btree (first_seen_us);


--
-- Name: alerts_kind; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_kind ON public.alerts USING btree (kind, id);


--
-- Name: alerts_last_seen; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_last_seen ON public.alerts USING btree (last_seen_us);


--
-- Name: alerts_principal; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_principal ON public.alerts USING btree (principal, id);


--
-- Name: alerts_severity; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_severity ON public.alerts USING btree (severity, id);


--
-- Name: alerts_status; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_status ON public.alerts USING btree (status, id);


--
-- Name: alerts_vm; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX alerts_vm ON public.alerts USING btree (vm_id, id);


--
-- Name: hypervisor_events_vm; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX hypervisor_events_vm ON public.hypervisor_events USING btree (vm_id, seq);


--
-- Name: hypervisor_events_vm_received; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX hypervisor_events_vm_received ON public.hypervisor_events USING btree (vm_id, received_us);


--
-- Name: ledger_vm_seq; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ledger_vm_seq ON public.ledger USING btree (vm_id, seq) WHERE (vm_id IS NOT NULL);


--
-- Name: otp_tokens_principal; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX otp_tokens_principal ON public.otp_tokens USING btree (principal) WHERE (deleted_at IS NULL);


--
-- Name: rollback_windows_seq; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX rollback_windows_seq ON public.rollback_windows USING btree (seq);


--
-- Name: rollback_windows_vm; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX rollback_windows_vm ON public.rollback_windows USING btree (vm_id, end_us);


--
-- Name: uses_expiry; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX uses_expiry ON public.uses USING btree (expires_us) WHERE (expires_us IS NOT NULL);


--
-- Name: uses_vm_ts; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX uses_vm_ts ON public.uses USING btree (vm_id, first_ts_us);


--
-- Name: alerts alerts_change_seq; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER alerts_change_seq BEFORE INSERT OR UPDATE ON public.alerts FOR EACH ROW EXECUTE FUNCTION public.rg_alert_changed();


--
-- Name: ledger ledger_append_only; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER ledger_append_only BEFORE DELETE OR UPDATE ON public.ledger FOR EACH ROW EXECUTE FUNCTION public.rg_ledger_immutable();


--
-- Name: alert_entries alert_entries_alert_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alert_entries
    ADD CONSTRAINT alert_entries_alert_id_fkey FOREIGN KEY (alert_id) REFERENCES public.alerts(id);


--
-- PostgreSQL database dump complete
--


