//! PostgreSQL in the comparison: idemstore's PostgreSQL engine against the same protocol
//! written by hand in plain SQL, as a careful user of a synchronous service would write it.
//!
//! Invariants:
//! - both sides reach the server through a deadpool-postgres pool of [`POOL_SIZE`] connections
//!   (so no thread count measured here waits for a connection), recycled the same way, with
//!   `synchronous_commit = on` and one auto-committed statement per call; plain threads block
//!   on a tokio runtime with two workers for every statement (the engine's own runtime has
//!   two), so neither side gets a different execution model;
//! - every measurement runs in a schema of its own, named after this run and a counter,
//!   which is dropped after it, also when the measurement panics: no measurement sees
//!   another's rows and no run leaves anything behind;
//! - a measured window starts after a warm-up (on keys the window never uses) and a
//!   checkpoint, so connection set-up is outside it and every window starts from the same
//!   WAL state; its sessions are gone before the next measurement opens its own (the server
//!   allows few connections);
//! - a statement error is a broken measurement, not a figure: it panics with the error.

use crate::{key, measure, receipt, Receipt, VALUE};
use idemstore::{PgOptions, PgStore, StoreBuilder};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Connections per pool, on both sides.
pub const POOL_SIZE: usize = 64;

/// Workers of the runtime the hand-written side blocks on (as many as the engine's).
const WORKERS: usize = 2;

/// How long a warm-up runs before a measured window.
const WARM_UP: Duration = Duration::from_millis(300);

/// Warm-up keys are `key(t, WARM_UP_KEYS + n)`: the measured window counts from 0 and never
/// gets near it.
const WARM_UP_KEYS: u64 = 1 << 48;

/// Completed keys a replay measurement reads, round robin.
const REPLAY_KEYS: u64 = 1000;

/// The server, and what a run needs on it: the blocking runtime and an admin connection.
pub struct Server {
    url: String,
    config: tokio_postgres::Config,
    runtime: tokio::runtime::Runtime,
    admin: tokio_postgres::Client,
    /// Prefix of this run's schema names: unique per process and start time.
    run: String,
    schemas: AtomicUsize,
}

impl Server {
    /// Connects to the server at `url`; an error says why it did not answer.
    pub fn connect(url: &str) -> Result<Server, String> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("the connection string does not parse: {e}"))?;
        config.connect_timeout(Duration::from_secs(3));
        config.options("-c synchronous_commit=on");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("compare-postgres")
            .enable_all()
            .build()
            .map_err(|e| format!("no tokio runtime: {e}"))?;
        let admin = runtime
            .block_on(async {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                Ok::<_, tokio_postgres::Error>(client)
            })
            .map_err(|e| match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            })?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let server = Server {
            url: url.to_string(),
            config,
            runtime,
            admin,
            run: format!("idemcmp_{}_{started}", std::process::id()),
            schemas: AtomicUsize::new(0),
        };
        server.warn_if_few_connections();
        Ok(server)
    }

    /// Runs `sql` (one or more statements) on the admin connection.
    fn admin(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.runtime.block_on(self.admin.batch_execute(sql))
    }

    /// The one bigint `sql` returns, from the admin connection.
    fn count(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<i64, tokio_postgres::Error> {
        let row = self.runtime.block_on(self.admin.query_one(sql, params))?;
        Ok(row.get(0))
    }

    fn warn_if_few_connections(&self) {
        let free = self.count(
            "SELECT current_setting('max_connections')::bigint \
                 - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
            &[],
        );
        match free {
            Ok(free) if free < POOL_SIZE as i64 + 2 => eprintln!(
                "  (PostgreSQL has {free} free connections; a pool of {POOL_SIZE} may be refused)"
            ),
            Ok(_) => {}
            Err(e) => eprintln!("  (could not count PostgreSQL's free connections: {e})"),
        }
    }

    /// A fresh, empty schema name for one measurement; dropped with its guard.
    fn fresh_schema(&self) -> Schema<'_> {
        let n = self.schemas.fetch_add(1, Ordering::Relaxed);
        Schema {
            server: self,
            name: format!("{}_{n}", self.run),
        }
    }

    /// The connection string of a measurement's sessions: named after its schema, so they
    /// can be told apart from everyone else's in `pg_stat_activity`.
    fn url_named(&self, schema: &Schema<'_>) -> String {
        let name = &schema.name;
        if self.url.starts_with("postgres://") || self.url.starts_with("postgresql://") {
            let joint = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{joint}application_name={name}", self.url)
        } else {
            format!("{} application_name={name}", self.url)
        }
    }

    /// Waits (up to ten seconds) until the sessions of `schema`'s measurement have ended.
    fn wait_sessions_gone(&self, schema: &Schema<'_>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.count(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&schema.name],
            );
            match left {
                Ok(0) => return,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(n) => return eprintln!("  ({n} sessions of {} still open)", schema.name),
                Err(e) => return eprintln!("  (could not count sessions: {e})"),
            }
        }
    }

    /// Runs `op` for a warm-up, checkpoints, then measures it as [`measure`] does.
    fn window<F>(&self, threads: usize, secs: f64, op: F) -> f64
    where
        F: Fn(usize, u64) + Sync,
    {
        measure(threads, WARM_UP.as_secs_f64(), |t, n| {
            op(t, WARM_UP_KEYS + n)
        });
        if let Err(e) = self.admin("CHECKPOINT") {
            eprintln!("  (no checkpoint before the window: {e})");
        }
        measure(threads, secs, op)
    }

    /// A pool like the engine's: same size, same recycling, synchronous commits.
    fn pool(&self, schema: &Schema<'_>) -> deadpool_postgres::Pool {
        let mut config = self.config.clone();
        config.application_name(&schema.name);
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            // Invariant: building fails only without a runtime, and one is named above.
            .expect("a pool with a runtime builds")
    }
}

/// One measurement's schema; dropped (with everything in it) when the guard goes.
struct Schema<'s> {
    server: &'s Server,
    name: String,
}

impl Drop for Schema<'_> {
    fn drop(&mut self) {
        let drop_it = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        if let Err(e) = self.server.admin(&drop_it) {
            eprintln!("  (schema {} not dropped: {e})", self.name);
        }
    }
}

// ---- idemstore's PostgreSQL engine ----

/// What the replay cache keeps when a measurement turns it on: every replayed key, each for
/// a few seconds (a window is about as long, so entries expire and are read again meanwhile).
const CACHE: (usize, Duration) = (10_000, Duration::from_secs(5));

fn open_engine(server: &Server, schema: &Schema<'_>, cache: bool) -> PgStore {
    let mut options = PgOptions::new(server.url_named(schema))
        .schema(schema.name.as_str())
        .pool_size(POOL_SIZE);
    if cache {
        options = options.replay_cache(CACHE.0, CACHE.1);
    }
    StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(options)
        .expect("the PostgreSQL engine opens on a server that answered")
}

/// Durable new keys through idemstore's engine (Immediate: synchronous commits).
pub fn engine_new_keys(server: &Server, threads: usize, secs: f64) -> f64 {
    let schema = server.fresh_schema();
    let store = open_engine(server, &schema, false);
    let ops = server.window(threads, secs, |t, n| {
        store
            .execute_once(key(t, n), || Ok::<_, std::io::Error>(receipt(VALUE)))
            .expect("a new key runs and records its outcome");
    });
    drop(store);
    server.wait_sessions_gone(&schema);
    ops
}

/// Replays of completed keys through idemstore's engine, with its replay cache if `cache`.
pub fn engine_replay(server: &Server, threads: usize, secs: f64, cache: bool) -> f64 {
    let schema = server.fresh_schema();
    let store = open_engine(server, &schema, cache);
    let keys: Vec<String> = (0..REPLAY_KEYS).map(|i| format!("k{i}")).collect();
    for k in &keys {
        store
            .execute_once(k, || Ok::<_, std::io::Error>(receipt(VALUE)))
            .expect("a new key runs and records its outcome");
    }
    let ops = server.window(threads, secs, |_, n| {
        let out = store
            .execute_once(
                &keys[(n % REPLAY_KEYS) as usize],
                || -> Result<Receipt, std::io::Error> {
                    unreachable!("replay must not run the operation")
                },
            )
            .expect("a completed key replays");
        std::hint::black_box(out);
    });
    drop(store);
    server.wait_sessions_gone(&schema);
    ops
}

// ---- the same protocol by hand, in plain SQL ----

/// Record states of the hand-written table.
const PENDING: i16 = 0;
const COMPLETED: i16 = 1;

/// The hand-written table: as the protocol needs it, or with an expiry a sweep can find.
#[derive(Clone, Copy)]
pub enum Table {
    /// Key, state, result and lock: nothing can tell when a row may go.
    Plain,
    /// Also an expiry time, set by the claim (a day ahead) and kept by the completion (so the
    /// update stays a heap-only one), with an index on it, as a table whose rows a sweeper
    /// deletes needs (idemstore's own table has one).
    Expiring,
}

/// The hand-written protocol's statements, on one schema's table.
struct ByHand {
    pool: deadpool_postgres::Pool,
    claim: String,
    complete: String,
    replay: String,
}

impl ByHand {
    /// Creates the table in `schema` and a pool for it.
    fn create(server: &Server, schema: &Schema<'_>, table: Table) -> ByHand {
        let s = &schema.name;
        // The expiry's column definition, index, column name and value in the claim.
        let (expiry_column, expiry_index, expiry_name, expiry_value) = match table {
            Table::Plain => ("", String::new(), "", ""),
            Table::Expiring => (
                ", expires_ms bigint NOT NULL",
                format!("CREATE INDEX ON {s}.idem (expires_ms);"),
                ", expires_ms",
                ", (extract(epoch from now()) * 1000)::bigint + 86400000",
            ),
        };
        server
            .admin(&format!(
                "CREATE SCHEMA {s};
                 CREATE TABLE {s}.idem (
                     key          bytea    PRIMARY KEY,
                     state        smallint NOT NULL,
                     result       bytea,
                     locked_until timestamptz
                     {expiry_column}
                 );
                 {expiry_index}"
            ))
            .expect("a fresh schema and its table are created");
        ByHand {
            pool: server.pool(schema),
            // The claim is the lookup: a row comes back only when this call inserted it.
            claim: format!(
                "INSERT INTO {s}.idem (key, state, locked_until{expiry_name}) \
                 VALUES ($1, {PENDING}, now() + interval '10 seconds'{expiry_value}) \
                 ON CONFLICT DO NOTHING RETURNING 1"
            ),
            complete: format!(
                "UPDATE {s}.idem SET state = {COMPLETED}, result = $2, locked_until = NULL \
                 WHERE key = $1"
            ),
            replay: format!("SELECT state, result FROM {s}.idem WHERE key = $1"),
        }
    }

    /// A table in `schema` holding `REPLAY_KEYS` completed keys, and those keys.
    fn preloaded(server: &Server, schema: &Schema<'_>) -> (ByHand, Vec<String>) {
        let by_hand = ByHand::create(server, schema, Table::Plain);
        let keys: Vec<String> = (0..REPLAY_KEYS).map(|i| format!("k{i}")).collect();
        for k in &keys {
            server
                .runtime
                .block_on(by_hand.claim(k.as_bytes()))
                .expect("the claim statement runs");
            server
                .runtime
                .block_on(by_hand.complete(k.as_bytes(), VALUE))
                .expect("the completion statement runs");
        }
        (by_hand, keys)
    }

    /// Claims `key`: true when this call inserted its Pending row.
    async fn claim(&self, key: &[u8]) -> Result<bool, deadpool_postgres::PoolError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.claim).await?;
        Ok(client.query_opt(&statement, &[&key]).await?.is_some())
    }

    /// Records `result` as `key`'s outcome; the number of rows written.
    async fn complete(
        &self,
        key: &[u8],
        result: &[u8],
    ) -> Result<u64, deadpool_postgres::PoolError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.complete).await?;
        Ok(client.execute(&statement, &[&key, &result]).await?)
    }

    /// The state and result recorded for `key`, if any.
    async fn replay(
        &self,
        key: &[u8],
    ) -> Result<Option<(i16, Option<Vec<u8>>)>, deadpool_postgres::PoolError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.replay).await?;
        let row = client.query_opt(&statement, &[&key]).await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

/// Durable new keys by hand: claim, run the operation, record its outcome, in `table`.
pub fn by_hand_new_keys(server: &Server, threads: usize, secs: f64, table: Table) -> f64 {
    let schema = server.fresh_schema();
    let by_hand = ByHand::create(server, &schema, table);
    let rt = &server.runtime;
    let ops = server.window(threads, secs, |t, n| {
        let k = key(t, n);
        let claimed = rt
            .block_on(by_hand.claim(k.as_bytes()))
            .expect("the claim statement runs");
        assert!(claimed, "a fresh key in a fresh table is always claimed");
        let result = VALUE; // the operation
        let written = rt
            .block_on(by_hand.complete(k.as_bytes(), result))
            .expect("the completion statement runs");
        assert_eq!(written, 1, "the claimed row is there to complete");
    });
    drop(by_hand);
    server.wait_sessions_gone(&schema);
    ops
}

/// Replays by hand: one SELECT of a completed key.
pub fn by_hand_replay(server: &Server, threads: usize, secs: f64) -> f64 {
    let schema = server.fresh_schema();
    let (by_hand, keys) = ByHand::preloaded(server, &schema);
    let rt = &server.runtime;
    let ops = server.window(threads, secs, |_, n| {
        let k = &keys[(n % REPLAY_KEYS) as usize];
        let found = rt
            .block_on(by_hand.replay(k.as_bytes()))
            .expect("the replay statement runs");
        assert!(
            matches!(&found, Some((COMPLETED, Some(_)))),
            "a preloaded key is completed"
        );
        std::hint::black_box(found);
    });
    drop(by_hand);
    server.wait_sessions_gone(&schema);
    ops
}

/// Replays by hand as a request makes them, not knowing it is a retry: the claim (which finds
/// the key taken), then the read.
pub fn by_hand_request_replay(server: &Server, threads: usize, secs: f64) -> f64 {
    let schema = server.fresh_schema();
    let (by_hand, keys) = ByHand::preloaded(server, &schema);
    let rt = &server.runtime;
    let ops = server.window(threads, secs, |_, n| {
        let k = &keys[(n % REPLAY_KEYS) as usize];
        let claimed = rt
            .block_on(by_hand.claim(k.as_bytes()))
            .expect("the claim statement runs");
        assert!(!claimed, "a preloaded key is taken");
        let found = rt
            .block_on(by_hand.replay(k.as_bytes()))
            .expect("the replay statement runs");
        assert!(
            matches!(&found, Some((COMPLETED, Some(_)))),
            "a preloaded key is completed"
        );
        std::hint::black_box(found);
    });
    drop(by_hand);
    server.wait_sessions_gone(&schema);
    ops
}
