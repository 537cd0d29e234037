-- The high-water below which nothing may be accepted now, or NULL while the clock is sane.
CREATE OR REPLACE FUNCTION rg_clock_floor(p_scope text, p_ts bigint, p_period bigint, p_drift integer) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT high_us FROM clock_guard
    WHERE scope = p_scope AND p_ts / (p_period * 1000000) < high_us / (p_period * 1000000) - p_drift
$$;
