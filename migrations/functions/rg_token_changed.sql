-- Every write to otp_tokens (an enrolment, a deletion, an operator's own statement) is
-- announced on `replayguard_tokens` with the principal's name, '' for "all of them" (a
-- TRUNCATE, or a name too long for a notification). Each instance drops its cached copy of
-- that principal's tokens when it hears it (replayguard/services/tokens.py), so a code
-- that matches none of the cached tokens needs no fresh read while it listens.
CREATE OR REPLACE FUNCTION rg_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('replayguard_tokens', '');
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('replayguard_tokens', CASE WHEN octet_length(OLD.principal) <= 4000 THEN OLD.principal ELSE '' END);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('replayguard_tokens', CASE WHEN octet_length(NEW.principal) <= 4000 THEN NEW.principal ELSE '' END);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER otp_tokens_changed AFTER INSERT OR UPDATE OR DELETE ON otp_tokens
    FOR EACH ROW EXECUTE FUNCTION rg_token_changed();
CREATE OR REPLACE TRIGGER otp_tokens_truncated AFTER TRUNCATE ON otp_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION rg_token_changed();
