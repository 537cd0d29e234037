-- replayguard 004: the analysts' side — alert change feed, signed checkpoints, indexes.
--
-- Every query an analyst runs is a keyset walk of one index, so its cost depends on the
-- page size, never on the size of the ledger.

-- Each insert or update of an alert takes the next `change_seq`: the SSE event id, the
-- position a stream resumes from (Last-Event-ID) and the position the sink feeder keeps.
CREATE SEQUENCE alert_changes;
ALTER TABLE alerts ADD COLUMN change_seq bigint;
UPDATE alerts SET change_seq = id;
SELECT setval('alert_changes', coalesce((SELECT max(id) FROM alerts), 0) + 1, false);
ALTER TABLE alerts ALTER COLUMN change_seq SET NOT NULL;
CREATE UNIQUE INDEX alerts_change_seq ON alerts (change_seq);

CREATE INDEX alerts_severity ON alerts (severity, id);
CREATE INDEX alerts_last_seen ON alerts (last_seen_us);
CREATE INDEX alerts_first_seen ON alerts (first_seen_us);
-- Timelines look up, per ledger entry, the alerts it raised or joined.
CREATE INDEX alert_entries_seq ON alert_entries (seq);
-- Alert detail: the events of a VM inside a rollback window.
CREATE INDEX hypervisor_events_vm_received ON hypervisor_events (vm_id, received_us);
CREATE INDEX rollback_windows_seq ON rollback_windows (seq);

-- Signed statements "the ledger's entry `seq` has hash `hash`" (Ed25519 over
-- replayguard/core/checkpoints.py's message). A copy leaves the host through the sinks.
CREATE TABLE checkpoints (
    seq        bigint PRIMARY KEY,
    hash       bytea  NOT NULL,
    ts_us      bigint NOT NULL,
    key_id     text   NOT NULL,
    signature  bytea  NOT NULL
);

-- How far the sink feeder (one instance at a time, under an advisory lock) has handed
-- alert changes and checkpoints to the sinks' outboxes.
CREATE TABLE sink_feed (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    alert_change_seq bigint NOT NULL,
    checkpoint_seq   bigint NOT NULL
);
