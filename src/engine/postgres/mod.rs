//! The PostgreSQL engine: one database shared by every replica of a service.
//!
//! Invariants (beyond those of every engine, see `engine`):
//! - every holder write (outcome, release, step, removal) is one statement fenced on the
//!   digest of the holder's exact Pending record, so a holder whose claim lapsed and was
//!   taken over writes nothing (the driver tells it [`Error::LeaseLost`]);
//! - a claim is one statement that inserts the record when absent or replaces the exact record
//!   read, and never a Pending record whose lease is still running by the database's clock;
//!   the lease is renewed by the holder's heartbeat (see `lease`), so liveness never depends
//!   on the replicas' clocks;
//! - each statement commits on its own: in `Immediate` durability every commit is synchronous
//!   (`synchronous_commit = on`), so a write is durable when it returns and `wait_durable` has
//!   nothing to wait for; in `Periodic` durability commits are asynchronous
//!   (`synchronous_commit = off`) and `flush` makes everything so far durable;
//! - records are scoped by tenant: every statement names its scope, so two tenants never see
//!   each other's keys.
//!
//! Record expiry (TTL) is decided by the store's clock, as on every engine; a replica whose
//! clock runs ahead expires records early by its skew. Takeovers depend only on leases.

mod bridge;
mod lease;
mod listen;
mod schema;
mod tx;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;

use crate::engine::{Engine, Held, RecordIter};
use crate::error::{Error, StorageError, StorageKind};
use crate::format::record::{self, ClaimToken};

pub(crate) use bridge::Bridge;
pub(crate) use schema::valid_schema_name;
pub use tx::PgTx;

/// How a store on PostgreSQL connects, where its tables live, and how long claims last.
#[derive(Debug, Clone)]
pub(crate) struct PgSettings {
    pub config: tokio_postgres::Config,
    pub schema: String,
    pub scope: String,
    pub pool_size: usize,
    pub lease: Duration,
    pub connect_timeout: Duration,
    pub statement_timeout: Option<Duration>,
    pub synchronous_commit: bool,
}

/// The engine on PostgreSQL: every replica of a service shares one database (or one schema
/// in it); opened by [`StoreBuilder::open_postgres`](crate::StoreBuilder::open_postgres).
pub struct PgEngine {
    shared: Arc<Shared>,
    /// Owned last: dropped after `shared`'s users are gone, without blocking.
    bridge: Arc<Bridge>,
}

/// What the engine's calls and background tasks share.
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    pub(crate) sql: schema::Statements,
    pub(crate) scope: String,
    pub(crate) schema: String,
    pub(crate) lease: Duration,
    pub(crate) leases: lease::Leases,
    hub: Arc<listen::Hub>,
    channel: String,
}

impl Shared {
    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, Error> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// The engine, opened, with the epoch of this open.
pub(crate) struct OpenedPg {
    pub engine: PgEngine,
    pub epoch: u64,
}

/// Connects, migrates the schema and starts the heartbeat and the listener.
pub(crate) fn open(settings: PgSettings) -> Result<OpenedPg, Error> {
    let bridge = Arc::new(Bridge::new(2)?);
    let mut config = settings.config.clone();
    config.connect_timeout(settings.connect_timeout);
    // Operators (and tests) find the store's sessions by name in pg_stat_activity.
    if config.get_application_name().is_none() {
        config.application_name("idemstore");
    }
    let mut options = format!(
        "-c synchronous_commit={}",
        if settings.synchronous_commit {
            "on"
        } else {
            "off"
        }
    );
    if let Some(timeout) = settings.statement_timeout {
        options.push_str(&format!(
            " -c statement_timeout={}",
            timeout.as_millis().max(1)
        ));
    }
    config.options(&options);
    let manager = Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .build()
        .map_err(|e| storage(e, StorageKind::Database))?;
    let channel = format!("idemstore.{}", settings.schema);
    let shared = Arc::new(Shared {
        pool,
        sql: schema::Statements::new(&settings.schema),
        scope: settings.scope.clone(),
        schema: settings.schema.clone(),
        lease: settings.lease,
        leases: lease::Leases::default(),
        hub: Arc::new(listen::Hub::default()),
        channel: channel.clone(),
    });
    let epoch = bridge.run(async {
        let mut client = shared.client().await?;
        schema::migrate(&mut client, &settings.schema).await?;
        schema::next_epoch(&**client, &shared.sql).await
    })?;
    bridge.spawn(lease::heartbeat(
        Arc::downgrade(&shared),
        settings.lease / 3,
    ));
    bridge.spawn(listen::listen_forever(
        config,
        channel,
        Arc::clone(&shared.hub),
    ));
    tracing::debug!(schema = %settings.schema, epoch, "idemstore opened on PostgreSQL");
    Ok(OpenedPg {
        engine: PgEngine { shared, bridge },
        epoch,
    })
}

fn storage(e: impl std::error::Error + Send + Sync + 'static, kind: StorageKind) -> Error {
    Error::Storage(StorageError::of_kind(e, None, kind))
}

/// A client error as a typed storage error.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> Error {
    let kind = match e.code() {
        _ if e.is_closed() => StorageKind::Connection,
        Some(code)
            if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE =>
        {
            StorageKind::Timeout
        }
        Some(code)
            if code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW =>
        {
            StorageKind::Connection
        }
        Some(_) => StorageKind::Database,
        // No server error code: the connection or the socket failed.
        None => StorageKind::Connection,
    };
    storage(e, kind)
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => pg_error(e),
        PoolError::Timeout(_) => storage(e, StorageKind::Timeout),
        other => storage(other, StorageKind::Connection),
    }
}

/// A 128-bit digest of a record's bytes: the engine compares records by it.
fn digest(bytes: &[u8]) -> Vec<u8> {
    blake3::hash(bytes).as_bytes()[..16].to_vec()
}

/// u64 values travel as bigint with the same bits.
fn big(v: u64) -> i64 {
    v as i64
}

/// Times compare as bigint; times past `i64::MAX` ms are never reached.
fn millis(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The columns derived from a record's header.
struct Columns {
    state: i16,
    expires_ms: i64,
    claim: (i64, i64),
    life: (i64, i64),
}

fn columns(key: &[u8], bytes: &[u8]) -> Result<Columns, Error> {
    let rec = record::decode(bytes).map_err(|e| crate::core::replay::decode_error(key, e))?;
    let h = rec.header;
    Ok(Columns {
        state: i16::from(h.state.to_byte()),
        expires_ms: millis(h.expires_ms),
        claim: (big(h.claim.epoch), big(h.claim.sequence)),
        life: (big(h.life.epoch), big(h.life.sequence)),
    })
}

impl PgEngine {
    fn run<T: Send>(
        &self,
        f: impl std::future::Future<Output = Result<T, Error>> + Send,
    ) -> Result<T, Error> {
        self.bridge.run(f)
    }

    /// Tells waiters in every replica that `key`'s record changed (only when one marked it).
    async fn notify(&self, client: &deadpool_postgres::Client, key: &[u8]) {
        let payload = listen::tag_text(&listen::tag(&self.shared.scope, key));
        let sent = client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&self.shared.channel, &payload],
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not notify waiters; they will poll");
        }
    }

    /// Ends the lease of every running claim in this engine's scope now, and stops renewing
    /// this process's: as if every holder had been paused past its lease. For tests.
    pub(crate) fn lapse_leases(&self) -> Result<(), Error> {
        let s = &self.shared;
        s.leases.let_go_all();
        self.run(async {
            let client = s.client().await?;
            client
                .execute(&s.sql.lapse, &[&s.scope])
                .await
                .map_err(pg_error)?;
            Ok(())
        })
    }

    /// The schema this engine's tables live in.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The tenant scope of this engine's keys.
    pub fn scope(&self) -> &str {
        &self.shared.scope
    }
}

impl std::fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEngine")
            .field("schema", &self.shared.schema)
            .field("scope", &self.shared.scope)
            .finish_non_exhaustive()
    }
}

/// Records are read a page at a time, in key order.
const PAGE: i64 = 512;

impl Engine for PgEngine {
    type Bytes = Vec<u8>;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let s = &self.shared;
        self.run(async {
            let client = s.client().await?;
            let statement = client.prepare_cached(&s.sql.get).await.map_err(pg_error)?;
            let row = client
                .query_opt(&statement, &[&s.scope, &key])
                .await
                .map_err(pg_error)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn records(&self) -> RecordIter<'_, Vec<u8>> {
        let mut after: Vec<u8> = Vec::new();
        let mut page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)> = Vec::new().into_iter();
        let mut done = false;
        Box::new(std::iter::from_fn(move || loop {
            if let Some(item) = page.next() {
                return Some(Ok(item));
            }
            if done {
                return None;
            }
            let s = &self.shared;
            let fetched = self.run(async {
                let client = s.client().await?;
                let rows = client
                    .query(&s.sql.page, &[&s.scope, &after, &PAGE])
                    .await
                    .map_err(pg_error)?;
                Ok(rows
                    .into_iter()
                    .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                    .collect::<Vec<_>>())
            });
            match fetched {
                Ok(rows) => {
                    done = (rows.len() as i64) < PAGE;
                    if let Some((last, _)) = rows.last() {
                        after = last.clone();
                    }
                    page = rows.into_iter();
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }))
    }

    fn claim(&self, key: &[u8], expected: Option<&[u8]>, pending: Vec<u8>) -> Result<bool, Error> {
        let s = &self.shared;
        let c = columns(key, &pending)?;
        let new_digest = digest(&pending);
        let expected_digest = expected.map(digest);
        let lease_ms = s.lease.as_millis() as f64;
        let claimed = self.run(async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&s.sql.claim)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_opt(
                    &statement,
                    &[
                        &s.scope,
                        &key,
                        &pending,
                        &new_digest,
                        &c.expires_ms,
                        &c.claim.0,
                        &c.claim.1,
                        &c.life.0,
                        &c.life.1,
                        &lease_ms,
                        &expected_digest,
                    ],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.is_some())
        })?;
        if claimed {
            s.leases.hold(key, new_digest);
        }
        Ok(claimed)
    }

    fn finish(&self, held: &Held<'_>, record: Option<Vec<u8>>) -> Result<bool, Error> {
        let s = &self.shared;
        let held_digest = digest(held.record);
        // Whatever happens below, the holder is done with its claim: stop renewing it.
        s.leases.let_go(held.key, &held_digest);
        let key = held.key;
        let columns = match &record {
            Some(bytes) => Some(columns(key, bytes)?),
            None => None,
        };
        self.run(async {
            let client = s.client().await?;
            let row = match (&record, &columns) {
                (Some(bytes), Some(c)) => {
                    let statement = client
                        .prepare_cached(&s.sql.finish)
                        .await
                        .map_err(pg_error)?;
                    client
                        .query_opt(
                            &statement,
                            &[
                                &s.scope,
                                &key,
                                bytes,
                                &digest(bytes),
                                &c.state,
                                &c.expires_ms,
                                &c.claim.0,
                                &c.claim.1,
                                &c.life.0,
                                &c.life.1,
                                &held_digest,
                            ],
                        )
                        .await
                }
                _ => {
                    let statement = client
                        .prepare_cached(&s.sql.release)
                        .await
                        .map_err(pg_error)?;
                    client
                        .query_opt(&statement, &[&s.scope, &key, &held_digest])
                        .await
                }
            }
            .map_err(pg_error)?;
            match row {
                Some(row) => {
                    if row.get::<_, bool>(0) {
                        self.notify(&client, key).await;
                    }
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<bool, Error> {
        let s = &self.shared;
        let held_digest = digest(held.record);
        let index = i32::try_from(index).map_err(|_| Error::InvalidConfig("too many steps"))?;
        self.run(async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&s.sql.write_step)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_opt(
                    &statement,
                    &[
                        &s.scope,
                        &held.key,
                        &held_digest,
                        &big(held.life.epoch),
                        &big(held.life.sequence),
                        &index,
                        &step,
                    ],
                )
                .await
                .map_err(pg_error)?;
            match row {
                Some(_) => Ok(true),
                None => Ok(false),
            }
        })
    }

    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let s = &self.shared;
        self.run(async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&s.sql.steps)
                .await
                .map_err(pg_error)?;
            let rows = client
                .query(
                    &statement,
                    &[&s.scope, &key, &big(life.epoch), &big(life.sequence)],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    fn remove_record(
        &self,
        key: &[u8],
        expected: &[u8],
        _steps_of: Option<ClaimToken>,
    ) -> Result<bool, Error> {
        let s = &self.shared;
        let expected_digest = digest(expected);
        // A holder in this process whose record goes stops renewing it.
        s.leases.let_go(key, &expected_digest);
        self.run(async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&s.sql.remove)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_opt(&statement, &[&s.scope, &key, &expected_digest])
                .await
                .map_err(pg_error)?;
            match row {
                Some(row) => {
                    if row.get::<_, bool>(0) {
                        self.notify(&client, key).await;
                    }
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn index_expiry(&self, _expires_ms: u64, _key: &[u8]) -> Result<(), Error> {
        // The expiry column is the index: written with the record, in the same statement.
        Ok(())
    }

    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let s = &self.shared;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async {
            let client = s.client().await?;
            let rows = client
                .query(&s.sql.due, &[&s.scope, &millis(now_ms), &limit])
                .await
                .map_err(pg_error)?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)))
                .collect())
        })
    }

    fn unindex_expiries(&self, _entries: &[(u64, Vec<u8>)]) -> Result<(), Error> {
        Ok(())
    }

    fn sweep_batch(&self, now_ms: u64, limit: usize) -> Option<Result<u64, Error>> {
        let s = &self.shared;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Some(self.run(async {
            let client = s.client().await?;
            let row = client
                .query_one(&s.sql.sweep, &[&s.scope, &millis(now_ms), &limit])
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, i64>(0) as u64)
        }))
    }

    fn wait_durable(&self) -> Result<(), Error> {
        // Each statement committed before it returned (synchronously, unless relaxed).
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        let s = &self.shared;
        self.run(async {
            let mut client = s.client().await?;
            // A synchronous commit that writes a commit record flushes the WAL up to it, and
            // so every earlier (asynchronous) commit.
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.batch_execute("SET LOCAL synchronous_commit = on; SELECT txid_current();")
                .await
                .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)
        })
    }

    fn holder_live(&self, key: &[u8], claim: ClaimToken, running_here: bool) -> bool {
        if running_here {
            return true;
        }
        let s = &self.shared;
        let live = self.run(async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&s.sql.holder_live)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_opt(
                    &statement,
                    &[&s.scope, &key, &big(claim.epoch), &big(claim.sequence)],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.and_then(|r| r.get::<_, Option<bool>>(0)))
        });
        match live {
            Ok(live) => live.unwrap_or(false),
            Err(e) => {
                // Unknown: treat it as live. Waiting is bounded; a takeover would not be.
                tracing::warn!(error = %e, "could not read a claim's lease; treating it as live");
                true
            }
        }
    }

    fn wait_for_holder(&self, key: &[u8], claim: ClaimToken, max: Duration) {
        let s = &self.shared;
        let waiter = s.hub.register(listen::tag(&s.scope, key));
        let marked = self.run(async {
            let client = s.client().await?;
            let statement = client
                .prepare_cached(&s.sql.mark_waiting)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_opt(
                    &statement,
                    &[&s.scope, &key, &big(claim.epoch), &big(claim.sequence)],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.is_some())
        });
        match marked {
            // The claim is no longer Pending: look again at once.
            Ok(false) => {}
            Ok(true) => waiter.wait(max.min(listen::POLL)),
            Err(_) => std::thread::sleep(max.min(listen::POLL)),
        }
    }

    fn abandon(&self, held: &Held<'_>) {
        self.shared.leases.let_go(held.key, &digest(held.record));
    }

    fn fresh_epoch(&self) -> Result<u64, Error> {
        let s = &self.shared;
        self.run(async {
            let client = s.client().await?;
            schema::next_epoch(&**client, &s.sql).await
        })
    }
}

#[cfg(test)]
mod tests {
    //! The claim statement's own guard, which the driver's liveness check normally makes
    //! redundant: it is what holds when a holder renews between another replica's look at its
    //! lease and that replica's claim. Needs `IDEMSTORE_TEST_POSTGRES`.

    use super::*;
    use crate::format::record::{Header, OutcomeKind, RecordState};

    fn pending(token: u64) -> Vec<u8> {
        let claim = ClaimToken {
            epoch: 1,
            sequence: token,
        };
        let header = Header {
            state: RecordState::Pending,
            outcome: OutcomeKind::None,
            attempts: 1,
            created_ms: 0,
            updated_ms: 0,
            expires_ms: u64::MAX,
            claim,
            fingerprint: None,
            has_steps: false,
            life: claim,
            codec: crate::format::codec::Codec::Bincode,
            shape: None,
        };
        record::encode(&header, &[])
    }

    #[test]
    fn a_claim_never_replaces_a_pending_record_whose_lease_runs() {
        let Ok(url) = std::env::var("IDEMSTORE_TEST_POSTGRES") else {
            return;
        };
        let schema = format!("unit_{}", std::process::id());
        let settings = PgSettings {
            config: url.parse().expect("connection string"),
            schema: schema.clone(),
            scope: String::new(),
            pool_size: 2,
            lease: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            statement_timeout: None,
            synchronous_commit: true,
        };
        let engine = open(settings).expect("open").engine;
        let first = pending(1);
        assert!(engine.claim(b"k", None, first.clone()).expect("claim"));
        // Another replica that (wrongly) believes the holder dead: refused while the lease runs.
        assert!(!engine.claim(b"k", Some(&first), pending(2)).expect("claim"));
        engine.lapse_leases().expect("lapse");
        assert!(engine.claim(b"k", Some(&first), pending(3)).expect("claim"));
        engine
            .run(async {
                let client = engine.shared.client().await?;
                client
                    .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                    .await
                    .map_err(pg_error)
            })
            .expect("drop the schema");
    }
}
