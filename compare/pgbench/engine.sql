-- The engine's claim and outcome (src/engine/postgres/schema.rs), with records of the sizes the
-- comparison's receipt gives: a 114-byte Pending record, a 124-byte Completed one.
\set k random(1, 2000000000)
\set s random(1, 2000000000)
INSERT INTO idem_pgbench.records (scope, key, record, digest, state, expires_ms, claim_epoch, claim_seq, life_epoch, life_seq, lease_until) VALUES ('', convert_to('key-' || :k || '-' || :s, 'UTF8'), decode(repeat('ab', 114), 'hex'), decode(repeat('cd', 16), 'hex'), 0, 1800000000000, 5, :s, 5, :s, now() + 10000::float8 * interval '1 millisecond') ON CONFLICT (scope, key) DO NOTHING RETURNING 1;
UPDATE idem_pgbench.records SET record = decode(repeat('ef', 124), 'hex'), digest = decode(repeat('01', 16), 'hex'), state = 1, expires_ms = 1800000000000, claim_epoch = 5, claim_seq = :s, life_epoch = 5, life_seq = :s, lease_until = NULL WHERE scope = '' AND key = convert_to('key-' || :k || '-' || :s, 'UTF8') AND digest = decode(repeat('cd', 16), 'hex') RETURNING waiters;
