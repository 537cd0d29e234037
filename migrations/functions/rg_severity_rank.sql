-- Orders severities so that an alert's severity only ever escalates.
CREATE OR REPLACE FUNCTION rg_severity_rank(p text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p WHEN 'critical' THEN 3 WHEN 'warning' THEN 2 ELSE 1 END
$$;
