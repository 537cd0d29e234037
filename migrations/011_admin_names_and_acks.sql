-- replayguard 011: API token names are unique among active tokens (revoking by name names
-- one token), and every acknowledgement of an alert is kept, with the token's name.

-- Active tokens sharing a name: the oldest keeps it, the others get their id appended.
UPDATE api_tokens t SET name = t.name || ' (' || t.id || ')'
 WHERE t.revoked_at IS NULL
   AND EXISTS (SELECT 1 FROM api_tokens o
                WHERE o.name = t.name AND o.revoked_at IS NULL AND (o.created_at, o.id) < (t.created_at, t.id));
CREATE UNIQUE INDEX api_tokens_active_name ON api_tokens (name) WHERE revoked_at IS NULL;

-- One row per acknowledgement (its ledger entry's seq); alerts.ack_* hold the latest.
CREATE TABLE alert_acks (
    seq      bigint PRIMARY KEY,
    alert_id bigint NOT NULL,
    ts_us    bigint NOT NULL,
    by_id    text   NOT NULL,
    by_name  text,
    note     text
);
CREATE INDEX alert_acks_alert ON alert_acks (alert_id, seq);
INSERT INTO alert_acks (seq, alert_id, ts_us, by_id, by_name, note)
SELECT seq, (payload->>'alert_id')::bigint, ts_us, payload->>'by', payload->>'by_name', payload->>'note'
  FROM ledger
 WHERE kind = 'alert_ack' AND payload->>'alert_id' ~ '^[0-9]{1,18}$' AND payload ? 'by';

ALTER TABLE alerts ADD COLUMN ack_by_name text;
UPDATE alerts a SET ack_by_name = k.by_name
  FROM (SELECT DISTINCT ON (alert_id) alert_id, by_name FROM alert_acks ORDER BY alert_id, seq DESC) k
 WHERE k.alert_id = a.id;
