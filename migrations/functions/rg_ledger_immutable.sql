-- Append-only: an ordinary connection can neither change, delete nor truncate history.
-- (Someone who can disable triggers can; the hash chain, signed checkpoints and the
-- witnesses are there for that case.)
CREATE OR REPLACE FUNCTION rg_ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the replayguard ledger is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE OR REPLACE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION rg_ledger_immutable();
CREATE OR REPLACE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION rg_ledger_immutable();
