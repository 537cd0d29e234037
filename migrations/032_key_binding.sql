-- replayguard 032: the keys a database was set up with.
--
-- Every digest of a credential or nonce is keyed by the pepper, and every token secret is
-- encrypted with the secret key: a service started on this database with other keys (a
-- lost or mistyped data dir, a container without its keys volume) would find no earlier
-- use and accept every code and nonce already used. The first process to open the
-- database with keys records a keyed check of each (never the key); every later one must
-- hold keys that give the same checks, or it does not start (replayguard/services/key_binding.py).
CREATE TABLE key_binding (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),  -- one row
    pepper_check bytea  NOT NULL,
    secret_check bytea  NOT NULL,
    bound_us     bigint NOT NULL
);
