-- replayguard 023: rg_clock_floor is gone; rg_decide reads clock_guard itself. (On a new
-- database the migrations run before any function or schema_functions exists.)
DROP FUNCTION IF EXISTS rg_clock_floor(text, bigint, bigint, integer);
DO $$
BEGIN
    IF to_regclass('schema_functions') IS NOT NULL THEN
        DELETE FROM schema_functions WHERE name = 'rg_clock_floor';
    END IF;
END $$;
