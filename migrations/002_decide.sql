-- replayguard 002: the host clock guard, read and written by rg_decide
-- (functions/rg_decide.sql).

-- The host clock guard: the latest time (µs) the host has surely reached, by the TOTP steps
-- this deployment accepted (a step's start, or the host's clock for a step accepted ahead
-- of it), per key set ("cg", a fingerprint of the pepper: instances sharing keys are one
-- deployment; a database shared by several key sets holds several). When the host clock
-- is so far behind it that the current step is below it minus the drift, the clock went
-- back (NTP step, or a rollback of the host): no step at or below it is accepted and a
-- clock_regression alert is raised.
CREATE TABLE clock_guard (
    scope   text   PRIMARY KEY,
    high_us bigint NOT NULL
);
