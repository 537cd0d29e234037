-- replayguard 018: every text column collates "C" (byte order), whatever the server's locale.
--
-- A text key's index is ordered by its column's collation, and a database's default
-- collation comes from the server's locale: glibc's or ICU's rules, which change between
-- their releases. An index built under one version of those rules and searched under
-- another can miss rows that are there, so a unique key (a VM, a principal, an alert's
-- dedup key) would no longer be unique and a lookup under `rg_decide`'s head lock could
-- miss the row that holds a VM's receipt position or a principal's failures. Byte order
-- never changes, and it is cheaper: under an ICU en-US default, `rg_decide` costs
-- PostgreSQL about 9 % less CPU an item on fresh nonces (bench/decide_sql.py). Equality,
-- which is all most queries ask, is the same under either; what sorts by text (the VM
-- list, principals) sorts by byte. Only the indexes on these columns are rebuilt, not the
-- tables, with decisions waiting meanwhile (docs/operations.md, "Text order").

ALTER TABLE alert_acks
    ALTER COLUMN by_id TYPE text COLLATE "C",
    ALTER COLUMN by_name TYPE text COLLATE "C",
    ALTER COLUMN note TYPE text COLLATE "C";
ALTER TABLE alerts
    ALTER COLUMN kind TYPE text COLLATE "C",
    ALTER COLUMN severity TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C",
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN principal TYPE text COLLATE "C",
    ALTER COLUMN dedup_key TYPE text COLLATE "C",
    ALTER COLUMN summary TYPE text COLLATE "C",
    ALTER COLUMN ack_by TYPE text COLLATE "C",
    ALTER COLUMN ack_note TYPE text COLLATE "C",
    ALTER COLUMN ack_by_name TYPE text COLLATE "C";
ALTER TABLE api_tokens
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN name TYPE text COLLATE "C",
    ALTER COLUMN role TYPE text COLLATE "C",
    ALTER COLUMN vm_patterns TYPE text[] COLLATE "C";
ALTER TABLE checkpoints ALTER COLUMN key_id TYPE text COLLATE "C";
ALTER TABLE clock_guard ALTER COLUMN scope TYPE text COLLATE "C";
ALTER TABLE hypervisor_events
    ALTER COLUMN event_id TYPE text COLLATE "C",
    ALTER COLUMN type TYPE text COLLATE "C",
    ALTER COLUMN vm_id TYPE text COLLATE "C";
ALTER TABLE ledger
    ALTER COLUMN kind TYPE text COLLATE "C",
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN subject TYPE text COLLATE "C",
    ALTER COLUMN decision TYPE text COLLATE "C",
    ALTER COLUMN reason TYPE text COLLATE "C";
ALTER TABLE otp_tokens
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN principal TYPE text COLLATE "C",
    ALTER COLUMN type TYPE text COLLATE "C",
    ALTER COLUMN algorithm TYPE text COLLATE "C";
ALTER TABLE principals ALTER COLUMN name TYPE text COLLATE "C";
ALTER TABLE rollback_windows
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN cause TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";
ALTER TABLE uses
    ALTER COLUMN kind TYPE text COLLATE "C",
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN subject TYPE text COLLATE "C";
ALTER TABLE vm_lineage
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN parent_vm_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";
ALTER TABLE vm_snapshots
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN snapshot_id TYPE text COLLATE "C",
    ALTER COLUMN event_id TYPE text COLLATE "C";
ALTER TABLE vms
    ALTER COLUMN vm_id TYPE text COLLATE "C",
    ALTER COLUMN refusing_reason TYPE text COLLATE "C";
ALTER TABLE witnessed ALTER COLUMN deployment_id TYPE text COLLATE "C";
