-- replayguard 030: which tokens name their credential by the key HMAC uses.
--
-- A credential is fingerprinted by the key HMAC uses (a secret padded with zero bytes, or
-- one longer than the block and its hash, are one key). Tokens enrolled before that carry
-- the fingerprint of their secret's bytes as they were, so another form of the same key
-- would start another credential, and reopen every code the first accepted. Rows present
-- now are marked for the service, which merges each one's credential into the canonical
-- one at start, before any decision (TokenStore.canonicalize_credentials); rows enrolled
-- later are canonical from the start.
ALTER TABLE otp_tokens ADD COLUMN canonical boolean NOT NULL DEFAULT false;
ALTER TABLE otp_tokens ALTER COLUMN canonical SET DEFAULT true;
CREATE INDEX otp_tokens_not_canonical ON otp_tokens (id) WHERE NOT canonical;
