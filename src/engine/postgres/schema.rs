//! The PostgreSQL schema: its versioned migrations and the statements the engine runs.
//!
//! Invariants: the schema name is a plain lower-case identifier (checked before any SQL is
//! built, so it is safe to splice into statements, always double-quoted, so reserved words
//! work too); every other value is a bound parameter.
//! Migrations run in one transaction under a transaction-scoped advisory lock named after the
//! schema, so replicas starting together apply each version exactly once and none starts on
//! a half-made schema; every migration is idempotent (`IF NOT EXISTS`). A schema whose version
//! is newer than this build knows is refused, never written.
//!
//! Tables (one row per key per tenant scope; columns beside `record` are derived from its
//! header at every write, so statements can check states, leases and expiry in SQL):
//! `records (scope, key, record, digest, state, expires_ms, claim_*, life_*, lease_until,
//! waiters)` and `steps (scope, key, life_*, idx, step)`; the sequence `epochs` hands out
//! every open's epoch and every fresh one.

use tokio_postgres::GenericClient;

use crate::error::Error;

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i32 = 1;

/// Migration `n` is `MIGRATIONS[n - 1]`; `{s}` stands for the schema.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [r#"
CREATE TABLE IF NOT EXISTS {s}.records (
    scope       text        NOT NULL,
    key         bytea       NOT NULL,
    record      bytea       NOT NULL,
    digest      bytea       NOT NULL,
    state       smallint    NOT NULL,
    expires_ms  bigint      NOT NULL,
    claim_epoch bigint      NOT NULL,
    claim_seq   bigint      NOT NULL,
    life_epoch  bigint      NOT NULL,
    life_seq    bigint      NOT NULL,
    lease_until timestamptz,
    waiters     boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS records_by_expiry ON {s}.records (scope, expires_ms);
CREATE TABLE IF NOT EXISTS {s}.steps (
    scope      text    NOT NULL,
    key        bytea   NOT NULL,
    life_epoch bigint  NOT NULL,
    life_seq   bigint  NOT NULL,
    idx        integer NOT NULL,
    step       bytea   NOT NULL,
    PRIMARY KEY (scope, key, life_epoch, life_seq, idx)
);
CREATE SEQUENCE IF NOT EXISTS {s}.epochs;
"#];

/// The longest schema name accepted (the notification channel adds a prefix to it).
pub(crate) const MAX_SCHEMA_LEN: usize = 48;

/// Whether `name` is a schema name the engine accepts: `[a-z_][a-z0-9_]*`, at most
/// [`MAX_SCHEMA_LEN`] bytes, not `pg_...` (PostgreSQL's own). Statements quote it, so reserved
/// words (`user`) are fine.
pub(crate) fn valid_schema_name(name: &str) -> bool {
    if name.starts_with("pg_") {
        return false;
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && name.len() <= MAX_SCHEMA_LEN
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Creates or upgrades `schema` to [`SCHEMA_VERSION`].
///
/// # Errors
/// [`Error::UnsupportedSchemaVersion`] if the schema is newer; [`Error::Storage`] otherwise.
pub(crate) async fn migrate(
    client: &mut deadpool_postgres::Client,
    schema: &str,
) -> Result<(), Error> {
    let tx = client.transaction().await.map_err(super::pg_error)?;
    // One lock per schema name, shared by every idemstore build (the first key is constant).
    tx.execute(
        "SELECT pg_advisory_xact_lock(1768189285, hashtext($1))",
        &[&schema],
    )
    .await
    .map_err(super::pg_error)?;
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\".schema_version (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    );
    tx.batch_execute(&setup).await.map_err(super::pg_error)?;
    let found: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM \"{schema}\".schema_version"),
            &[],
        )
        .await
        .map_err(super::pg_error)?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(Error::UnsupportedSchemaVersion {
            schema: schema.to_owned(),
            found,
        });
    }
    for version in found + 1..=SCHEMA_VERSION {
        // Invariant: 1 <= version <= SCHEMA_VERSION = MIGRATIONS.len().
        let migration = MIGRATIONS[version as usize - 1].replace("{s}", &format!("\"{schema}\""));
        tx.batch_execute(&migration)
            .await
            .map_err(super::pg_error)?;
        tx.execute(
            &format!("INSERT INTO \"{schema}\".schema_version (version) VALUES ($1)"),
            &[&version],
        )
        .await
        .map_err(super::pg_error)?;
        tracing::info!(schema, version, "idemstore schema migrated");
    }
    tx.commit().await.map_err(super::pg_error)?;
    Ok(())
}

/// A fresh epoch from the schema's sequence, above `floor`, on a connection of its own (in a
/// transaction of its own, so the lock below ends with it whatever happens).
pub(crate) async fn next_epoch_alone(
    client: &mut tokio_postgres::Client,
    sql: &Statements,
    floor: u64,
) -> Result<u64, Error> {
    let tx = client.transaction().await.map_err(super::pg_error)?;
    let epoch = next_epoch(&tx, sql, floor).await?;
    tx.commit().await.map_err(super::pg_error)?;
    Ok(epoch)
}

/// A fresh epoch from the schema's sequence, above `floor`; `client` must be inside a
/// transaction. Every epoch is handed out under one transaction-scoped advisory lock, so a
/// raise (moving the sequence up to `floor` while it is below it) never interleaves with
/// another raise or a `nextval`: the sequence never goes back and no epoch is handed out twice.
pub(crate) async fn next_epoch(
    client: &impl GenericClient,
    sql: &Statements,
    floor: u64,
) -> Result<u64, Error> {
    client
        .query(&sql.epoch_lock, &[])
        .await
        .map_err(super::pg_error)?;
    if floor > 0 {
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        client
            .query(&sql.raise_epoch, &[&floor])
            .await
            .map_err(super::pg_error)?;
    }
    let row = client
        .query_one(&sql.next_epoch, &[])
        .await
        .map_err(super::pg_error)?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The engine's statements, with the schema spliced in.
pub(crate) struct Statements {
    pub get: String,
    pub page: String,
    pub claim_new: String,
    pub claim_new_batch: String,
    pub get_batch: String,
    pub finish_batch: String,
    pub claim_over: String,
    pub finish: String,
    pub release: String,
    pub write_step: String,
    pub steps: String,
    pub remove: String,
    pub due: String,
    pub sweep: String,
    pub holder_live: String,
    pub mark_waiting: String,
    pub renew: String,
    pub lapse: String,
    pub end_lease: String,
    pub next_epoch: String,
    pub raise_epoch: String,
    pub epoch_lock: String,
    pub lock: String,
    pub put: String,
    pub delete_steps: String,
    pub import: String,
    pub size: String,
}

impl Statements {
    pub(crate) fn new(s: &str) -> Self {
        Self {
            get: format!("SELECT record FROM \"{s}\".records WHERE scope = $1 AND key = $2"),
            page: format!(
                "SELECT key, record FROM \"{s}\".records WHERE scope = $1 AND key > $2 \
                 ORDER BY key LIMIT $3"
            ),
            // A claim is one statement: an insert when the key was read absent; otherwise a
            // takeover of the exact record read, never while another holder's lease runs (by
            // the database's clock). Never an upsert: after a concurrent removal an upsert
            // would insert, continuing the removed life.
            claim_new: format!(
                "INSERT INTO \"{s}\".records (scope, key, record, digest, state, expires_ms, \
                     claim_epoch, claim_seq, life_epoch, life_seq, lease_until) \
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7, $8, $9, \
                     now() + $10::float8 * interval '1 millisecond') \
                 ON CONFLICT (scope, key) DO NOTHING \
                 RETURNING 1"
            ),
            // Several callers' claims in one statement (see `batch`), in key order, so two
            // batches waiting on each other's keys always wait in one direction.
            claim_new_batch: format!(
                "INSERT INTO \"{s}\".records (scope, key, record, digest, state, expires_ms, \
                     claim_epoch, claim_seq, life_epoch, life_seq, lease_until) \
                 SELECT $1, t.key, t.record, t.digest, 0, t.expires_ms, t.ce, t.cs, t.le, t.ls, \
                     now() + $2::float8 * interval '1 millisecond' \
                 FROM unnest($3::bytea[], $4::bytea[], $5::bytea[], $6::int8[], $7::int8[], \
                     $8::int8[], $9::int8[], $10::int8[]) \
                     AS t(key, record, digest, expires_ms, ce, cs, le, ls) \
                 ORDER BY t.key \
                 ON CONFLICT (scope, key) DO NOTHING \
                 RETURNING key"
            ),
            // Several holders' outcomes in one statement, each fenced as `finish` is; the rows
            // are locked in key order first (as the heartbeat's renewal locks them), so a
            // batch and a renewal never wait on each other both ways.
            finish_batch: format!(
                "WITH t AS (SELECT * FROM unnest($2::bytea[], $3::bytea[], $4::bytea[], \
                         $5::int2[], $6::int8[], $7::int8[], $8::int8[], $9::int8[], \
                         $10::int8[], $11::bytea[]) \
                     AS t(key, record, digest, state, expires_ms, ce, cs, le, ls, held)), \
                 locked AS (SELECT r.key FROM \"{s}\".records r JOIN t ON r.key = t.key \
                     WHERE r.scope = $1 AND r.digest = t.held ORDER BY r.key FOR UPDATE OF r) \
                 UPDATE \"{s}\".records r SET record = t.record, digest = t.digest, \
                     state = t.state, expires_ms = t.expires_ms, claim_epoch = t.ce, \
                     claim_seq = t.cs, life_epoch = t.le, life_seq = t.ls, lease_until = NULL \
                 FROM t JOIN locked ON locked.key = t.key \
                 WHERE r.scope = $1 AND r.key = t.key AND r.digest = t.held \
                 RETURNING r.key, r.waiters"
            ),
            // Several reads in one statement: one primary-key probe per key, whatever the
            // plan. (`key = ANY($2)`, whose cached generic plan, with no statistics yet, could
            // scan every row of the scope, is not used; OFFSET 0 keeps the lookup a
            // per-key subquery the planner cannot turn into a scan.)
            get_batch: format!(
                "SELECT k.key, r.record FROM unnest($2::bytea[]) AS k(key) \
                 CROSS JOIN LATERAL (SELECT record FROM \"{s}\".records \
                     WHERE scope = $1 AND key = k.key OFFSET 0) AS r"
            ),
            claim_over: format!(
                "UPDATE \"{s}\".records SET record = $3, digest = $4, state = 0, \
                     expires_ms = $5, claim_epoch = $6, claim_seq = $7, life_epoch = $8, \
                     life_seq = $9, lease_until = now() + $10::float8 * interval '1 millisecond', \
                     waiters = false \
                 WHERE scope = $1 AND key = $2 AND digest = $11 \
                     AND (state <> 0 OR lease_until IS NULL OR lease_until <= now()) \
                 RETURNING 1"
            ),
            finish: format!(
                "UPDATE \"{s}\".records SET record = $3, digest = $4, state = $5, expires_ms = $6, \
                     claim_epoch = $7, claim_seq = $8, life_epoch = $9, life_seq = $10, \
                     lease_until = NULL \
                 WHERE scope = $1 AND key = $2 AND digest = $11 RETURNING waiters"
            ),
            release: format!(
                "DELETE FROM \"{s}\".records WHERE scope = $1 AND key = $2 AND digest = $3 \
                 RETURNING waiters"
            ),
            // The record row is locked (shared) while the step goes in, so a takeover or
            // removal either happens before (no row matches: nothing written) or after.
            write_step: format!(
                "WITH held AS (SELECT 1 FROM \"{s}\".records \
                     WHERE scope = $1 AND key = $2 AND digest = $3 FOR SHARE) \
                 INSERT INTO \"{s}\".steps (scope, key, life_epoch, life_seq, idx, step) \
                 SELECT $1, $2, $4, $5, $6, $7 FROM held \
                 ON CONFLICT (scope, key, life_epoch, life_seq, idx) \
                     DO UPDATE SET step = EXCLUDED.step \
                 RETURNING 1"
            ),
            steps: format!(
                "SELECT idx, step FROM \"{s}\".steps WHERE scope = $1 AND key = $2 \
                     AND life_epoch = $3 AND life_seq = $4 ORDER BY idx"
            ),
            remove: format!(
                "WITH gone AS (DELETE FROM \"{s}\".records \
                     WHERE scope = $1 AND key = $2 AND digest = $3 \
                     RETURNING key, life_epoch, life_seq, waiters), \
                 gone_steps AS (DELETE FROM \"{s}\".steps t USING gone \
                     WHERE t.scope = $1 AND t.key = gone.key \
                     AND t.life_epoch = gone.life_epoch AND t.life_seq = gone.life_seq) \
                 SELECT waiters FROM gone"
            ),
            due: format!(
                "SELECT expires_ms, key FROM \"{s}\".records WHERE scope = $1 AND expires_ms <= $2 \
                 AND (expires_ms, key) > ($4, $5) ORDER BY expires_ms, key LIMIT $3"
            ),
            // Batched expiry: several replicas may sweep at once (SKIP LOCKED); a Pending
            // record whose lease runs is never taken.
            sweep: format!(
                "WITH due AS (SELECT key FROM \"{s}\".records \
                     WHERE scope = $1 AND expires_ms <= $2 \
                     AND (state <> 0 OR lease_until IS NULL OR lease_until <= now()) \
                     ORDER BY expires_ms LIMIT $3 FOR UPDATE SKIP LOCKED), \
                 gone AS (DELETE FROM \"{s}\".records r USING due \
                     WHERE r.scope = $1 AND r.key = due.key \
                     RETURNING r.key, r.life_epoch, r.life_seq), \
                 gone_steps AS (DELETE FROM \"{s}\".steps t USING gone \
                     WHERE t.scope = $1 AND t.key = gone.key \
                     AND t.life_epoch = gone.life_epoch AND t.life_seq = gone.life_seq) \
                 SELECT count(*) FROM gone"
            ),
            // A Pending row with no lease (moved in by an import) has no holder: as for a
            // takeover (`claim_over`), it is an orphan.
            holder_live: format!(
                "SELECT coalesce(lease_until > now(), false) FROM \"{s}\".records WHERE scope = $1 AND key = $2 \
                     AND state = 0 AND claim_epoch = $3 AND claim_seq = $4"
            ),
            mark_waiting: format!(
                "UPDATE \"{s}\".records SET waiters = true WHERE scope = $1 AND key = $2 \
                     AND state = 0 AND claim_epoch = $3 AND claim_seq = $4 RETURNING 1"
            ),
            // Rows are locked in key order first, as a batch of outcomes locks them.
            renew: format!(
                "WITH locked AS (SELECT r.key FROM \"{s}\".records r \
                     JOIN unnest($3::bytea[], $4::bytea[]) AS held(key, digest) \
                         ON r.key = held.key AND r.digest = held.digest \
                     WHERE r.scope = $1 AND r.state = 0 ORDER BY r.key FOR UPDATE OF r) \
                 UPDATE \"{s}\".records r SET lease_until = now() + $2::float8 * interval '1 millisecond' \
                 FROM locked WHERE r.scope = $1 AND r.key = locked.key \
                 RETURNING r.key"
            ),
            end_lease: format!(
                "UPDATE \"{s}\".records SET lease_until = now() - interval '1 millisecond' \
                 WHERE scope = $1 AND key = $2 AND digest = $3 AND state = 0"
            ),
            lapse: format!(
                "UPDATE \"{s}\".records SET lease_until = now() - interval '1 millisecond' \
                 WHERE scope = $1 AND state = 0 AND lease_until > now()"
            ),
            lock: format!(
                "SELECT record, state = 0 AND lease_until > now() FROM \"{s}\".records \
                 WHERE scope = $1 AND key = $2 FOR UPDATE"
            ),
            put: format!(
                "INSERT INTO \"{s}\".records AS r (scope, key, record, digest, state, expires_ms, \
                     claim_epoch, claim_seq, life_epoch, life_seq, lease_until) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL) \
                 ON CONFLICT (scope, key) DO UPDATE SET record = EXCLUDED.record, \
                     digest = EXCLUDED.digest, state = EXCLUDED.state, \
                     expires_ms = EXCLUDED.expires_ms, \
                     claim_epoch = EXCLUDED.claim_epoch, claim_seq = EXCLUDED.claim_seq, \
                     life_epoch = EXCLUDED.life_epoch, life_seq = EXCLUDED.life_seq, \
                     lease_until = NULL \
                 WHERE r.digest = $11 \
                 RETURNING 1"
            ),
            delete_steps: format!(
                "DELETE FROM \"{s}\".steps WHERE scope = $1 AND key = $2 \
                     AND life_epoch = $3 AND life_seq = $4"
            ),
            // A record moved in from another store, only where the key has none, with the
            // steps of its life: one statement, so both or neither.
            import: format!(
                "WITH put AS (INSERT INTO \"{s}\".records (scope, key, record, digest, state, \
                     expires_ms, claim_epoch, claim_seq, life_epoch, life_seq, lease_until) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL) \
                 ON CONFLICT (scope, key) DO NOTHING RETURNING 1), \
                 put_steps AS (INSERT INTO \"{s}\".steps (scope, key, life_epoch, life_seq, idx, step) \
                 SELECT $1, $2, $9, $10, t.idx, t.step \
                     FROM unnest($11::int4[], $12::bytea[]) AS t(idx, step) \
                     WHERE EXISTS (SELECT 1 FROM put) \
                 ON CONFLICT (scope, key, life_epoch, life_seq, idx) \
                     DO UPDATE SET step = EXCLUDED.step) \
                 SELECT count(*) FROM put"
            ),
            size: format!(
                "SELECT (pg_total_relation_size('\"{s}\".records') \
                     + pg_total_relation_size('\"{s}\".steps'))::bigint"
            ),
            next_epoch: format!("SELECT nextval('\"{s}\".epochs')"),
            epoch_lock: format!(
                "SELECT pg_advisory_xact_lock(1768189285, hashtext('{s} epochs'))"
            ),
            raise_epoch: format!(
                "SELECT setval('\"{s}\".epochs', $1) FROM \"{s}\".epochs WHERE last_value < $1"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in [
            "idemstore",
            "_x",
            "a1_b2",
            "user",
            "select",
            &"a".repeat(MAX_SCHEMA_LEN),
        ] {
            assert!(valid_schema_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "A",
            "a-b",
            "a;drop table x",
            "a b",
            "\"a\"",
            "pg_catalog",
            &"a".repeat(MAX_SCHEMA_LEN + 1),
        ] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }
}
