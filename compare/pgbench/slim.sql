-- The same records on a row without the digest and life columns, fenced on the claim token.
\set k random(1, 2000000000)
\set s random(1, 2000000000)
INSERT INTO idem_pgbench.slim (scope, key, record, state, expires_ms, claim_epoch, claim_seq, lease_until) VALUES ('', convert_to('key-' || :k || '-' || :s, 'UTF8'), decode(repeat('ab', 114), 'hex'), 0, 1800000000000, 5, :s, now() + 10000::float8 * interval '1 millisecond') ON CONFLICT (scope, key) DO NOTHING RETURNING 1;
UPDATE idem_pgbench.slim SET record = decode(repeat('ef', 124), 'hex'), state = 1, lease_until = NULL WHERE scope = '' AND key = convert_to('key-' || :k || '-' || :s, 'UTF8') AND claim_epoch = 5 AND claim_seq = :s AND state = 0 RETURNING waiters;
