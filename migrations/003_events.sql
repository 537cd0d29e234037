-- replayguard 003: what hypervisor events leave behind: snapshot creation times and clone
-- lineage. The window rule itself (which T, which R, which VMs) lives in
-- replayguard/core/windows.py; functions/rg_ingest_event.sql stores what it computed.

-- Creation times of snapshots, from snapshot.created events (T of a later revert).
-- A name may be reused after a delete, so every creation is kept.
CREATE TABLE vm_snapshots (
    vm_id       text   NOT NULL,
    snapshot_id text   NOT NULL,
    created_us  bigint NOT NULL,
    event_id    text   NOT NULL,
    PRIMARY KEY (vm_id, snapshot_id, created_us)
);

-- Which VM a clone came from, and the time of the state it carries (its split).
CREATE TABLE vm_lineage (
    vm_id        text   PRIMARY KEY,
    parent_vm_id text   NOT NULL,
    split_us     bigint NOT NULL,
    event_id     text   NOT NULL
);
