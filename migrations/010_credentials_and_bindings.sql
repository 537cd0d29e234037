-- replayguard 010: credentials remembered as credentials, spent nonces, API tokens bound to VMs.
--
-- otp_credentials: one row per OTP secret (keyed by its HMAC fingerprint under the pepper,
-- replayguard/core/credentials.py secret_fingerprint), holding the highest counter or time
-- step ever accepted for it. Every token row enrolled with that secret, for any principal,
-- before or after a deletion, shares it: deleting a token and enrolling its secret again
-- does not reopen a used code. The fingerprint can only be computed from the decrypted
-- secret, so rows of tokens enrolled before this migration are filled in by the service at
-- start (TokenStore.backfill_fingerprints), which also carries their last_counter over and
-- re-keys their recorded uses; otp_tokens.last_counter is not read or written after that.
CREATE TABLE otp_credentials (
    fingerprint  bytea  PRIMARY KEY,
    last_counter bigint NOT NULL DEFAULT -1
);
ALTER TABLE otp_tokens ADD COLUMN fingerprint bytea;
CREATE INDEX otp_tokens_unfingerprinted ON otp_tokens (id) WHERE fingerprint IS NULL;

-- spent_nonces: the digest of every consumed nonce whose `uses` row retention purged. A
-- nonce is never accepted twice, whatever ttl_s or issued_at a later presentation claims,
-- so its identity outlives the row that holds its first use's details.
CREATE TABLE spent_nonces (
    digest bytea PRIMARY KEY
);

-- API tokens: callout and hypervisor tokens may be bound to VMs by shell-style patterns
-- over vm_id (empty: every VM). Names unique among active tokens: migration 011.
ALTER TABLE api_tokens ADD COLUMN vm_patterns text[] NOT NULL DEFAULT '{}';
