-- When the ledger entry a receipt names was written: the start of the rollback window
-- a stale receipt opens.
CREATE OR REPLACE FUNCTION rg_receipt_window_start(p_seq bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ts_us FROM ledger WHERE seq = p_seq
$$;
