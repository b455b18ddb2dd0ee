-- The engine's table as schema version 1 makes it, a slimmer one, and the hand-written one.
DROP SCHEMA IF EXISTS idem_pgbench CASCADE;
CREATE SCHEMA idem_pgbench;
CREATE TABLE idem_pgbench.records (
    scope text NOT NULL, key bytea NOT NULL, record bytea NOT NULL, digest bytea NOT NULL,
    state smallint NOT NULL, expires_ms bigint NOT NULL,
    claim_epoch bigint NOT NULL, claim_seq bigint NOT NULL,
    life_epoch bigint NOT NULL, life_seq bigint NOT NULL,
    lease_until timestamptz, waiters boolean NOT NULL DEFAULT false,
    PRIMARY KEY (scope, key)
);
CREATE INDEX ON idem_pgbench.records (scope, expires_ms);
CREATE TABLE idem_pgbench.slim (
    scope text NOT NULL, key bytea NOT NULL, record bytea NOT NULL,
    state smallint NOT NULL, expires_ms bigint NOT NULL,
    claim_epoch bigint NOT NULL, claim_seq bigint NOT NULL,
    lease_until timestamptz, waiters boolean NOT NULL DEFAULT false,
    PRIMARY KEY (scope, key)
);
CREATE INDEX ON idem_pgbench.slim (scope, expires_ms);
CREATE TABLE idem_pgbench.idem (
    key bytea PRIMARY KEY, state smallint NOT NULL, result bytea,
    locked_until timestamptz, expires_ms bigint NOT NULL
);
CREATE INDEX ON idem_pgbench.idem (expires_ms);
