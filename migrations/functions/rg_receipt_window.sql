-- The rollback window a stale (or another VM's) receipt opens on `p_vm`: the guest's state
-- is the one of ledger entry `p_seq`, so every decision of `p_vm` the ledger recorded after
-- that entry was undone. The window is bounded by the ledger, not by one clock: from the
-- earliest of that entry's time and the times of the first 1000 decisions after it, to the
-- latest of `p_now` and the times of the newest 1000, so a host clock stepped back, or
-- instances whose clocks disagree, cannot leave an undone use outside it (unless the clock
-- went back further than 1000 decisions span, in the middle of them). The bound keeps the
-- work under the head lock fixed however old the receipt: a guest replaying one over and
-- over costs two short index scans each time. NULL start: the entry is unknown, every
-- earlier use counts. `ledger_vm_seq` serves both ranges.
DROP FUNCTION IF EXISTS rg_receipt_window_start(bigint);
CREATE OR REPLACE FUNCTION rg_receipt_window(p_vm text, p_seq bigint, p_now bigint,
                                             OUT start_us bigint, OUT end_us bigint)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN r.ts_us IS NOT NULL THEN least(r.ts_us, first.lo) END, greatest(p_now, last.hi)
    FROM (SELECT (SELECT ts_us FROM ledger WHERE seq = p_seq) AS ts_us) r,
         (SELECT min(ts_us) AS lo FROM (SELECT ts_us FROM ledger
              WHERE vm_id = p_vm AND seq > p_seq AND kind IN ('otp', 'nonce') ORDER BY seq LIMIT 1000) f) first,
         (SELECT max(ts_us) AS hi FROM (SELECT ts_us FROM ledger
              WHERE vm_id = p_vm AND seq > p_seq AND kind IN ('otp', 'nonce') ORDER BY seq DESC LIMIT 1000) l) last
$$;
