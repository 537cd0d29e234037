-- replayguard 001: the ledger, credentials, VMs, rollback windows, alerts, API tokens.
--
-- Every decision is one row of `ledger`, chained by SHA-256 (see replayguard/core/chain.py
-- for the canonical form this file mirrors). `ledger_head` holds the chain's tip; its
-- single row is the lock that orders every append, across processes and instances.

CREATE TABLE ledger_head (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq  bigint NOT NULL,
    hash bytea  NOT NULL
);
INSERT INTO ledger_head VALUES (true, 0, decode(repeat('00', 32), 'hex'));

CREATE TABLE ledger (
    seq         bigint PRIMARY KEY,
    ts_us       bigint NOT NULL,
    kind        text   NOT NULL,
    vm_id       text,
    subject     text,
    cred_digest bytea,
    decision    text,
    reason      text,
    payload     jsonb  NOT NULL DEFAULT '{}'::jsonb,
    prev_hash   bytea  NOT NULL,
    hash        bytea  NOT NULL
);
CREATE INDEX ledger_vm_seq ON ledger (vm_id, seq) WHERE vm_id IS NOT NULL;

-- Append-only: an ordinary connection cannot change history. (Someone who can disable
-- triggers can; the hash chain and signed checkpoints are there for that case.)
CREATE FUNCTION rg_ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the replayguard ledger is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION rg_ledger_immutable();

CREATE TABLE api_tokens (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('callout', 'hypervisor', 'analyst', 'admin')),
    digest      bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE principals (
    name            text PRIMARY KEY,
    fail_count      integer NOT NULL DEFAULT 0,
    locked_until_us bigint  NOT NULL DEFAULT 0
);

CREATE TABLE otp_tokens (
    id           text PRIMARY KEY,
    principal    text    NOT NULL,
    type         text    NOT NULL CHECK (type IN ('totp', 'hotp')),
    secret_ct    bytea   NOT NULL,
    digits       integer NOT NULL,
    period       integer NOT NULL,
    algorithm    text    NOT NULL,
    last_counter bigint  NOT NULL DEFAULT -1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE INDEX otp_tokens_principal ON otp_tokens (principal) WHERE deleted_at IS NULL;

CREATE TABLE vms (
    vm_id            text PRIMARY KEY,
    first_seen_us    bigint  NOT NULL,
    last_seen_us     bigint  NOT NULL,
    epoch            integer NOT NULL DEFAULT 0,
    last_receipt_seq bigint  NOT NULL DEFAULT 0,
    receipts_seen    boolean NOT NULL DEFAULT false,
    refusing         boolean NOT NULL DEFAULT false,
    refusing_reason  text
);

-- First use of every credential, by keyed digest. The primary key is what makes a
-- credential accepted at most once; rows expire only when the credential can no
-- longer be accepted anyway (see expires_us).
CREATE TABLE uses (
    digest      bytea  PRIMARY KEY,
    kind        text   NOT NULL,
    vm_id       text   NOT NULL,
    subject     text   NOT NULL,
    first_seq   bigint NOT NULL,
    first_ts_us bigint NOT NULL,
    expires_us  bigint
);
CREATE INDEX uses_expiry ON uses (expires_us) WHERE expires_us IS NOT NULL;
CREATE INDEX uses_vm_ts ON uses (vm_id, first_ts_us);

-- A revert, restore or clone of `vm_id` to a state of `start_us` (NULL: unknown, so
-- every earlier use counts), noticed at `end_us`: uses inside it are at risk.
CREATE TABLE rollback_windows (
    id         bigserial PRIMARY KEY,
    vm_id      text   NOT NULL,
    start_us   bigint,
    end_us     bigint NOT NULL,
    cause      text   NOT NULL,
    event_id   text,
    seq        bigint NOT NULL
);
CREATE INDEX rollback_windows_vm ON rollback_windows (vm_id, end_us);

CREATE TABLE alerts (
    id            bigserial PRIMARY KEY,
    kind          text    NOT NULL,
    severity      text    NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    status        text    NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'acknowledged')),
    vm_id         text,
    principal     text,
    dedup_key     text    NOT NULL UNIQUE,
    count         integer NOT NULL DEFAULT 1,
    first_seen_us bigint  NOT NULL,
    last_seen_us  bigint  NOT NULL,
    updated_us    bigint  NOT NULL,
    summary       text    NOT NULL,
    details       jsonb   NOT NULL DEFAULT '{}'::jsonb,
    history       jsonb   NOT NULL DEFAULT '[]'::jsonb,
    ack_by        text,
    ack_note      text,
    ack_us        bigint
);
CREATE INDEX alerts_vm ON alerts (vm_id, id);
CREATE INDEX alerts_principal ON alerts (principal, id);
CREATE INDEX alerts_kind ON alerts (kind, id);
CREATE INDEX alerts_status ON alerts (status, id);

CREATE TABLE alert_entries (
    alert_id bigint NOT NULL REFERENCES alerts (id),
    seq      bigint NOT NULL,
    PRIMARY KEY (alert_id, seq)
);

CREATE TABLE hypervisor_events (
    event_id    text PRIMARY KEY,
    body_digest bytea  NOT NULL,
    type        text   NOT NULL,
    vm_id       text   NOT NULL,
    seq         bigint NOT NULL,
    received_us bigint NOT NULL,
    payload     jsonb  NOT NULL
);
CREATE INDEX hypervisor_events_vm ON hypervisor_events (vm_id, seq);

-- The canonical hash of one entry; mirrors replayguard/core/chain.py.
CREATE FUNCTION rg_entry_hash(p_prev bytea, p_seq bigint, p_ts bigint, p_kind text, p_vm text,
                              p_subject text, p_digest bytea, p_decision text, p_reason text,
                              p_payload jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT sha256(p_prev || convert_to(
        p_seq::text || chr(31) || p_ts::text || chr(31) || p_kind || chr(31) ||
        coalesce(p_vm, '') || chr(31) || coalesce(p_subject, '') || chr(31) ||
        coalesce(encode(p_digest, 'hex'), '') || chr(31) || coalesce(p_decision, '') || chr(31) ||
        coalesce(p_reason, '') || chr(31) || p_payload::text, 'UTF8'))
$$;

-- Writes entry `p_seq` after `p_prev`; the caller holds the head lock and moves the head.
CREATE FUNCTION rg_chain_insert(p_prev bytea, p_seq bigint, p_ts bigint, p_kind text, p_vm text,
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

-- One append outside the decision path (events, acknowledgements, enrolments).
CREATE FUNCTION rg_append(p_ts bigint, p_kind text, p_vm text, p_subject text, p_digest bytea,
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

CREATE FUNCTION rg_severity_rank(p text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p WHEN 'critical' THEN 3 WHEN 'warning' THEN 2 ELSE 1 END
$$;

-- Raises an alert or joins the open one with the same dedup key: the count grows, the
-- kind and severity only ever escalate, and every change is kept in `history`.
CREATE FUNCTION rg_alert(p_kind text, p_severity text, p_vm text, p_principal text, p_dedup text,
                         p_ts bigint, p_seq bigint, p_summary text, p_details jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
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
        history = a.history || jsonb_build_array(jsonb_build_object(
            'ts_us', p_ts, 'seq', p_seq,
            'change', CASE WHEN a.status = 'acknowledged' THEN 'reopened' ELSE 'joined' END,
            'kind', p_kind, 'severity', p_severity))
    RETURNING a.id INTO v_id;
    INSERT INTO alert_entries VALUES (v_id, p_seq) ON CONFLICT DO NOTHING;
    PERFORM pg_notify('replayguard_alerts', v_id::text);
    RETURN v_id;
END $$;

-- Is the first use of a credential (on `p_vm` at `p_ts`) inside a rollback window?
CREATE FUNCTION rg_at_risk(p_vm text, p_ts bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT id FROM rollback_windows
    WHERE vm_id = p_vm AND end_us >= p_ts AND (start_us IS NULL OR start_us <= p_ts)
    ORDER BY id LIMIT 1
$$;
