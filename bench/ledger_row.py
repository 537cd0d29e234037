"""The per-row baseline's decision-shaped row: one statement inserting what a fresh nonce's
decision writes, a ``spent_nonces`` row and a ``ledger`` row, into copies of those tables
(``LIKE … INCLUDING ALL``: the same indexes).

``bench/run.py``'s baseline commits it through asyncpg without HTTP; ``bench/floor_app.py``
commits it behind a bare aiohttp handler (the durable floor).
"""

BASELINE_DDL = """
CREATE TABLE IF NOT EXISTS bench_ledger (LIKE ledger INCLUDING ALL);
CREATE TABLE IF NOT EXISTS bench_spent (LIKE spent_nonces INCLUDING ALL);
"""
ROW_SQL = """
WITH s AS (INSERT INTO bench_spent (digest, first_seq) VALUES ($1, $3)
           ON CONFLICT (digest) DO NOTHING RETURNING digest)
INSERT INTO bench_ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload, prev_hash, hash)
VALUES ($3, $4, 'nonce', $2, 'bench', $1, 'accept', 'ok', $5::jsonb, $6, $7)
"""
BATCH_SQL = """
WITH s AS (INSERT INTO bench_spent (digest, first_seq)
           SELECT d, s FROM unnest($1::bytea[], $3::bigint[]) AS x(d, s)
           ON CONFLICT (digest) DO NOTHING RETURNING digest)
INSERT INTO bench_ledger (seq, ts_us, kind, vm_id, subject, cred_digest, decision, reason, payload, prev_hash, hash)
SELECT s, t, 'nonce', v, 'bench', d, 'accept', 'ok', $5::jsonb, h, h
FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::bigint[], $6::bytea[]) AS x(d, v, s, t, h)
"""
PAYLOAD = '{"ttl_s": 300, "flags": [], "epoch": 0, "receipt": "absent"}'
