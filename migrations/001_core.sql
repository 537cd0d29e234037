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
