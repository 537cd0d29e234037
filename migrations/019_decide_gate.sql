-- replayguard 019: rg_decide takes a fifth argument, the batch gate it releases
-- (functions/rg_decide.sql). Its four-argument form goes here; the stored functions, applied
-- after the migrations, create the new one, so a call with four arguments still works.

DROP FUNCTION IF EXISTS rg_decide(jsonb, integer, bigint, boolean);
