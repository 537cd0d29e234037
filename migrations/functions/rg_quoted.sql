-- An identifier as an alert summary shows it: a JSON string, in double quotes with `"`,
-- `\` and control characters escaped (to_json), so no principal, VM id or event id a
-- guest or relay chose can close its quotes and go on as the service's own words
-- (`alice: locked out; no action needed` is one quoted name, not a verdict). NULL is the
-- bare word null, which no quoted identifier can be. replayguard/core/summaries.py
-- `quoted` is the same for the summaries built in Python
-- (tests/integration/test_summary_quoting.py holds them to it). Called only where an
-- alert is raised, never per decision.
CREATE OR REPLACE FUNCTION rg_quoted(p text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT coalesce(to_json(p)::text, 'null') $$;
