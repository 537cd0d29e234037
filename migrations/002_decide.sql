-- replayguard 002: rg_decide, the whole decision path in one round trip.
--
-- Takes a batch of decisions prepared by the service (codes already matched against the
-- token's secret, credentials already reduced to keyed digests) and, in one transaction
-- holding the ledger head lock:
--   1. checks the guest's receipt against the latest one issued to the VM (rollback,
--      clone, forgery) and opens a rollback window when the guest went back in time;
--   2. consumes the credential atomically (UPDATE ... WHERE last_counter < step, or
--      INSERT ... ON CONFLICT DO NOTHING): this, not any read, is what makes it once;
--   3. classifies a reject (reused, or replay_after_rollback when the first use fell
--      inside a rollback window), applies RFC 4226 §7.3 throttling, raises or joins alerts;
--   4. appends the chained ledger row and moves the VM's receipt position.
-- Items: {"k": "otp"|"nonce", "ts": us, "vm", "sub", "tok", "steps": [..],
--         "dg": {"<step>": "<hex digest>"}, "d": "<hex>", "exp": us, "pre": reason,
--         "hot": bool, "rc": "absent"|"valid"|"invalid", "rvm", "rseq", "p": {...},
--         TOTP only: "tp": period s, "dr": drift steps, "cg": clock-guard scope}

-- The host clock guard: the highest TOTP step start (µs) this deployment has accepted,
-- per key set ("cg", a fingerprint of the pepper: instances sharing keys are one
-- deployment; a database shared by several key sets holds several). When the host clock
-- is so far behind it that the current step is below it minus the drift, the clock went
-- back (NTP step, or a rollback of the host): no step at or below it is accepted and a
-- clock_regression alert is raised.
CREATE TABLE clock_guard (
    scope   text   PRIMARY KEY,
    high_us bigint NOT NULL
);

-- The high-water below which nothing may be accepted now, or NULL while the clock is sane.
CREATE FUNCTION rg_clock_floor(p_scope text, p_ts bigint, p_period bigint, p_drift integer) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT high_us FROM clock_guard
    WHERE scope = p_scope AND p_ts / (p_period * 1000000) < high_us / (p_period * 1000000) - p_drift
$$;

CREATE FUNCTION rg_receipt_window_start(p_seq bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ts_us FROM ledger WHERE seq = p_seq
$$;

CREATE FUNCTION rg_decide(p_items jsonb, p_lock_threshold integer, p_lock_period_us bigint,
                          p_refuse boolean)
RETURNS TABLE (r_idx integer, r_seq bigint, r_verdict text, r_reason text, r_flags text[],
               r_alert bigint, r_epoch integer, r_rseq bigint, r_locked_until bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_head    record;
    v_prev    bytea;
    v_seq     bigint;
    v_i       integer := 0;
    it        jsonb;
    v_ts      bigint;
    v_vm      text;
    v_sub     text;
    v_kind    text;
    v_rc      text;
    v_vmrow   vms%ROWTYPE;
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
    v_locked  bigint;
    v_rseq    bigint;
    v_floor   bigint;
    v_steps   jsonb;
    v_galert  bigint;
BEGIN
    SELECT h.seq, h.hash INTO v_head FROM ledger_head h WHERE h.id FOR UPDATE;
    v_seq := v_head.seq;
    v_prev := v_head.hash;

    FOR it IN SELECT value FROM jsonb_array_elements(p_items) LOOP
        v_seq := v_seq + 1;
        v_ts := (it->>'ts')::bigint;
        v_vm := it->>'vm';
        v_sub := it->>'sub';
        v_kind := it->>'k';
        v_rc := coalesce(it->>'rc', 'absent');
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
        v_steps := coalesce(it->'steps', '[]'::jsonb);
        v_floor := CASE WHEN it ? 'tp' THEN rg_clock_floor(it->>'cg', v_ts, (it->>'tp')::bigint, (it->>'dr')::integer) END;
        IF v_floor IS NOT NULL THEN
            v_galert := rg_alert('clock_regression', 'critical', v_vm, NULL, 'clock_regression:' || (it->>'cg'),
                v_ts, v_seq, 'The host clock is behind the highest TOTP step already accepted',
                jsonb_build_object('high_water_us', v_floor, 'now_us', v_ts));
        END IF;

        -- Every writer of vms and principals holds the ledger head lock (taken above), so
        -- plain reads suffice here: no row lock, no write until there is something to write.
        SELECT * INTO v_vmrow FROM vms WHERE vm_id = v_vm;
        IF NOT FOUND THEN
            INSERT INTO vms (vm_id, first_seen_us, last_seen_us) VALUES (v_vm, v_ts, v_ts)
                RETURNING * INTO v_vmrow;
        END IF;

        -- 1. State continuity (skipped for deferred hot-cache records).
        IF NOT coalesce((it->>'hot')::boolean, false) THEN
            IF v_rc = 'invalid' THEN
                v_flags := v_flags || 'receipt_invalid'::text;
                v_alert := rg_alert('receipt_invalid', 'warning', v_vm, NULL, 'receipt_invalid:' || v_vm,
                    v_ts, v_seq, 'VM ' || v_vm || ' presented a receipt that does not verify', '{}'::jsonb);
            ELSIF v_rc = 'valid' AND it->>'rvm' <> v_vm THEN
                -- A clone carries its source's state as of that receipt: the source's later
                -- uses are unknown to the clone, so they are at risk.
                v_rseq := (it->>'rseq')::bigint;
                v_flags := v_flags || 'clone_detected'::text;
                INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)
                    VALUES (it->>'rvm', rg_receipt_window_start(v_rseq), v_ts, 'receipt_clone', v_seq);
                v_vmrow.epoch := v_vmrow.epoch + 1;
                v_alert := rg_alert('clone_detected', 'warning', v_vm, NULL,
                    'clone:' || v_vm || ':' || (it->>'rvm'), v_ts, v_seq,
                    'VM ' || v_vm || ' presented a receipt issued to VM ' || (it->>'rvm'),
                    jsonb_build_object('source_vm_id', it->>'rvm', 'receipt_seq', v_rseq));
            ELSIF v_rc = 'valid' AND (it->>'rseq')::bigint < v_vmrow.last_receipt_seq THEN
                v_rseq := (it->>'rseq')::bigint;
                v_flags := v_flags || 'rollback_detected'::text;
                INSERT INTO rollback_windows (vm_id, start_us, end_us, cause, seq)
                    VALUES (v_vm, rg_receipt_window_start(v_rseq), v_ts, 'receipt', v_seq);
                v_vmrow.epoch := v_vmrow.epoch + 1;
                v_alert := rg_alert('rollback_detected', 'critical', v_vm, NULL,
                    'rollback:' || v_vm || ':' || coalesce(v_rseq::text, 'none'), v_ts, v_seq,
                    'VM ' || v_vm || ' presented an old receipt: its state went back in time',
                    jsonb_build_object('receipt_seq', v_rseq, 'latest_issued_seq', v_vmrow.last_receipt_seq));
            END IF;
            IF p_refuse AND (v_flags && ARRAY['rollback_detected', 'clone_detected']) THEN
                v_vmrow.refusing := true;
                v_vmrow.refusing_reason := v_flags[1];
            END IF;
        END IF;

        -- 2 and 3. The credential.
        IF v_vmrow.refusing THEN
            v_reason := 'locked_out';
        ELSIF it->>'pre' IS NOT NULL AND it->>'pre' <> 'reused' THEN
            v_reason := it->>'pre';
        ELSIF v_kind = 'nonce' THEN
            v_digest := decode(it->>'d', 'hex');
            IF it->>'pre' IS NULL THEN
                INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)
                    VALUES (v_digest, 'nonce', v_vm, v_sub, v_seq, v_ts, (it->>'exp')::bigint)
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
            SELECT locked_until_us INTO v_locked FROM principals WHERE name = v_sub;
            IF v_locked > v_ts THEN
                v_reason := 'locked_out';
            ELSIF jsonb_array_length(coalesce(it->'steps', '[]'::jsonb)) = 0 THEN
                v_reason := 'invalid';
                INSERT INTO principals AS pr (name, fail_count) VALUES (v_sub, 1)
                    ON CONFLICT (name) DO UPDATE SET fail_count = pr.fail_count + 1
                    RETURNING pr.fail_count INTO v_fails;
                IF v_fails >= p_lock_threshold THEN
                    v_locked := v_ts + p_lock_period_us;
                    UPDATE principals SET fail_count = 0, locked_until_us = v_locked WHERE name = v_sub;
                    v_calert := rg_alert('brute_force', 'warning', v_vm, v_sub, 'brute:' || v_sub,
                        v_ts, v_seq, v_fails || ' consecutive failures for ' || v_sub || ': locked out',
                        jsonb_build_object('failures', v_fails, 'locked_until_us', v_ts + p_lock_period_us));
                END IF;
            ELSE
                IF v_floor IS NOT NULL THEN
                    -- The host clock went back: only steps above the high-water may pass.
                    v_steps := coalesce((SELECT jsonb_agg(x) FROM jsonb_array_elements_text(v_steps) x
                        WHERE x::bigint * (it->>'tp')::bigint * 1000000 > v_floor), '[]'::jsonb);
                END IF;
                IF it->>'pre' IS NULL AND jsonb_array_length(v_steps) > 0 THEN
                    UPDATE otp_tokens t SET last_counter = (
                            SELECT min(x::bigint) FROM jsonb_array_elements_text(v_steps) x
                            WHERE x::bigint > t.last_counter)
                        WHERE t.id = it->>'tok' AND t.deleted_at IS NULL
                          AND t.last_counter < (SELECT max(x::bigint) FROM jsonb_array_elements_text(v_steps) x)
                        RETURNING t.last_counter INTO v_step;
                END IF;
                IF v_step IS NOT NULL THEN
                    v_verdict := 'accept';
                    v_reason := 'ok';
                    v_digest := decode(it->'dg'->>(v_step::text), 'hex');
                    INSERT INTO uses (digest, kind, vm_id, subject, first_seq, first_ts_us, expires_us)
                        VALUES (v_digest, 'otp', v_vm, v_sub, v_seq, v_ts, (it->>'exp')::bigint)
                        ON CONFLICT (digest) DO NOTHING;
                    UPDATE principals SET fail_count = 0 WHERE name = v_sub AND fail_count <> 0;
                    IF it ? 'tp' THEN
                        INSERT INTO clock_guard VALUES (it->>'cg', v_step * (it->>'tp')::bigint * 1000000)
                            ON CONFLICT (scope) DO UPDATE SET high_us = excluded.high_us
                            WHERE clock_guard.high_us < excluded.high_us;
                    END IF;
                ELSIF NOT EXISTS (SELECT 1 FROM otp_tokens WHERE id = it->>'tok' AND deleted_at IS NULL) THEN
                    v_reason := 'no_token';
                ELSE
                    SELECT u.* INTO v_use FROM uses u
                        WHERE u.digest IN (SELECT decode(value, 'hex') FROM jsonb_each_text(it->'dg'))
                        ORDER BY u.first_seq DESC LIMIT 1;
                    v_digest := coalesce(v_use.digest, decode(it->'dg'->>(
                        (SELECT max(x::bigint) FROM jsonb_array_elements_text(it->'steps') x)::text), 'hex'));
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
                v_calert := rg_alert('replay_after_rollback', 'critical', v_vm, v_use.subject,
                    'cred:' || encode(v_digest, 'hex'), v_ts, v_seq,
                    'A credential first used on VM ' || v_use.vm_id || ' inside a rollback window was presented again',
                    jsonb_build_object('window_id', v_window, 'first_seq', v_use.first_seq,
                                       'first_vm_id', v_use.vm_id));
                INSERT INTO alert_entries VALUES (v_calert, v_use.first_seq) ON CONFLICT DO NOTHING;
                INSERT INTO alert_entries SELECT v_calert, seq FROM rollback_windows WHERE id = v_window
                    ON CONFLICT DO NOTHING;  -- the event (or decision) that opened the window
            ELSE
                v_reason := 'reused';
                IF v_use.digest IS NOT NULL THEN
                    v_calert := rg_alert('reuse', 'warning', v_vm, v_use.subject,
                        'cred:' || encode(v_digest, 'hex'), v_ts, v_seq,
                        'A credential was presented again', jsonb_build_object(
                            'first_seq', v_use.first_seq, 'first_vm_id', v_use.vm_id));
                    INSERT INTO alert_entries VALUES (v_calert, v_use.first_seq) ON CONFLICT DO NOTHING;
                END IF;
            END IF;
        END IF;

        -- 4. The ledger entry and the VM's position.
        v_prev := rg_chain_insert(v_prev, v_seq, v_ts, v_kind, v_vm, v_sub, v_digest, v_verdict, v_reason,
            coalesce(it->'p', '{}'::jsonb) || jsonb_strip_nulls(jsonb_build_object(
                'flags', to_jsonb(v_flags), 'epoch', v_vmrow.epoch, 'token_id', it->>'tok',
                'counter', v_step, 'window_id', v_window, 'alert_id', coalesce(v_calert, v_alert),
                'receipt', v_rc, 'receipt_seq', it->>'rseq', 'hot_cache', it->'hot',
                'clock_regression', CASE WHEN v_floor IS NOT NULL THEN true END)));
        IF coalesce((it->>'hot')::boolean, false) THEN
            UPDATE vms SET last_seen_us = greatest(last_seen_us, v_ts) WHERE vm_id = v_vm;
        ELSE
            -- Only a caller that keeps receipts moves the position: a RADIUS callout on the
            -- same VM that never sends one must not make the PAM helper's receipt stale.
            UPDATE vms SET last_seen_us = greatest(last_seen_us, v_ts),
                           last_receipt_seq = CASE WHEN v_rc = 'valid' THEN v_seq ELSE last_receipt_seq END,
                           epoch = v_vmrow.epoch, refusing = v_vmrow.refusing,
                           refusing_reason = v_vmrow.refusing_reason,
                           receipts_seen = receipts_seen OR v_rc = 'valid'
                WHERE vm_id = v_vm;
        END IF;

        r_idx := v_i;
        r_seq := v_seq;
        r_verdict := v_verdict;
        r_reason := v_reason;
        r_flags := v_flags;
        r_alert := coalesce(v_calert, v_alert, v_galert);
        r_epoch := v_vmrow.epoch;
        r_rseq := CASE WHEN v_rc = 'valid' AND NOT coalesce((it->>'hot')::boolean, false)
                       THEN v_seq ELSE v_vmrow.last_receipt_seq END;
        r_locked_until := CASE WHEN v_locked > v_ts THEN v_locked END;
        RETURN NEXT;
        v_i := v_i + 1;
    END LOOP;

    UPDATE ledger_head SET seq = v_seq, hash = v_prev WHERE id;
END $$;
