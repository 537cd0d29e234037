-- Every write to api_tokens (a creation, a revocation, an operator's own statement) is
-- announced on `replayguard_api_tokens`, once per statement and without a payload: each
-- instance empties its cache of authenticated tokens when it hears it
-- (replayguard/services/apitokens.py), so a token revoked by any process, the CLI's
-- included, is refused on its next request.
CREATE OR REPLACE FUNCTION rg_api_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('replayguard_api_tokens', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER api_tokens_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION rg_api_token_changed();
