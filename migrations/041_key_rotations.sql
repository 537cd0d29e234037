-- replayguard 041: rotations of the secret key and of the receipt key.
--
-- `replayguard keys rotate` re-encrypts every token secret under a new secret key, or
-- moves receipts to a new receipt key, and moves `key_binding` to the new keys in the
-- same transaction. Each rotation of a key is one row here: a keyed check of the key it
-- retired and of the one it put in place (never a key), and the ledger's head when it
-- committed. A receipt MACed by a retired receipt key was issued at or before that seq,
-- so one naming a later position is a forgery; the check tells a process started with a
-- retired key why it is refused (replayguard/services/key_rotation.py).
CREATE TABLE key_rotations (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_name      text COLLATE "C" NOT NULL CHECK (key_name IN ('secret', 'receipt')),
    retired_check bytea  NOT NULL,
    current_check bytea  NOT NULL,
    rotated_us    bigint NOT NULL,
    ledger_seq    bigint NOT NULL
);
