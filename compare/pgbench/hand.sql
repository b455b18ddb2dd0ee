-- The comparison's hand-written protocol on a table with an indexed expiry, with its 36-byte result.
\set k random(1, 2000000000)
\set s random(1, 2000000000)
INSERT INTO idem_pgbench.idem (key, state, locked_until, expires_ms) VALUES (convert_to('key-' || :k || '-' || :s, 'UTF8'), 0, now() + interval '10 seconds', (extract(epoch from now()) * 1000)::bigint + 86400000) ON CONFLICT DO NOTHING RETURNING 1;
UPDATE idem_pgbench.idem SET state = 1, result = decode(repeat('ef', 36), 'hex'), locked_until = NULL WHERE key = convert_to('key-' || :k || '-' || :s, 'UTF8');
