-- The rollback window a stale (or another VM's) receipt opens on `p_vm`: the guest's state
-- is the one of ledger entry `p_seq`, so every decision of `p_vm` the ledger recorded after
-- that entry was undone. The window is bounded by the ledger, not by one clock: from the
-- earliest of that entry's time and the times of the first 1000 decisions after it, to the
-- latest of `p_now` and the times of the newest 1000, so a host clock stepped back, or
-- instances whose clocks disagree, cannot leave an undone use outside it (unless the clock
-- went back further than 1000 decisions span, in the middle of them). The bound keeps the
-- work under the head lock fixed however old the receipt: a guest replaying one over and
-- over costs two short index scans each time. NULL start: the entry is unknown, every
-- earlier use counts.
--
-- Both scans read `ledger_vm_seq` and nothing else, whatever the statistics or the size of
-- the ledger when the plan was made (a LANGUAGE sql function's statements are planned
-- without the arguments' values, as a generic plan, at every call up to PostgreSQL 17, and
-- from 18 a plan may be kept for the connection's life): the order (vm_id, seq), with the VM
-- given as a range of that index and not as an equality, is one only that index gives
-- without a sort, and sorts, sequential and bitmap scans are off. With vm_id = p_vm the
-- plan walked the ledger's primary key from `p_seq` to the head through every other VM's
-- entries, in each scan: 40,008 rows for one stale receipt of a VM of four entries,
-- 20,000 entries after it (tests/integration/test_plan_bounds.py).
DROP FUNCTION IF EXISTS rg_receipt_window_start(bigint);
CREATE OR REPLACE FUNCTION rg_receipt_window(p_vm text, p_seq bigint, p_now bigint,
                                             OUT start_us bigint, OUT end_us bigint)
LANGUAGE sql STABLE
SET enable_sort = off
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
    SELECT CASE WHEN r.ts_us IS NOT NULL THEN least(r.ts_us, first.lo) END, greatest(p_now, last.hi)
    FROM (SELECT (SELECT ts_us FROM ledger WHERE seq = p_seq) AS ts_us) r,
         (SELECT min(ts_us) AS lo FROM (SELECT ts_us FROM ledger
              WHERE vm_id IS NOT NULL AND (vm_id, seq) > (p_vm COLLATE "C", p_seq)
                AND (vm_id, seq) <= (p_vm COLLATE "C", 9223372036854775807) AND kind IN ('otp', 'nonce')
              ORDER BY vm_id, seq LIMIT 1000) f) first,
         (SELECT max(ts_us) AS hi FROM (SELECT ts_us FROM ledger
              WHERE vm_id IS NOT NULL AND (vm_id, seq) > (p_vm COLLATE "C", p_seq)
                AND (vm_id, seq) <= (p_vm COLLATE "C", 9223372036854775807) AND kind IN ('otp', 'nonce')
              ORDER BY vm_id DESC, seq DESC LIMIT 1000) l) last
$$;
