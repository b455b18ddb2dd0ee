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

mod batch;
mod batched;
mod bridge;
mod connect;
mod first;
mod lanes;
mod lease;
mod listen;
mod ops;
mod own;
mod replay_cache;
mod schema;
mod tx;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;

use crate::error::{Error, StorageError, StorageKind};
use crate::format::record;

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
    pub io_timeout: Duration,
    pub synchronous_commit: bool,
    /// Capacity and maximum age of the replay cache; `None`: no cache.
    pub replay_cache: Option<(usize, Duration)>,
}

/// How long the store's own statements wait for a row lock another transaction holds
/// (`lock_timeout`): a claim blocked longer treats the key as busy and waits its turn within
/// the call's wait budget; a holder's own write tries again.
pub(crate) const LOCK_WAIT: Duration = Duration::from_millis(250);

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
    /// The longest one operation may take, by the client's clock.
    pub(crate) io_timeout: Duration,
    pub(crate) leases: lease::Leases,
    /// Whether calls claim or read first (see `first`).
    pub(crate) first: first::FirstStatement,
    hub: Arc<listen::Hub>,
    channel: String,
    /// New claims, outcomes and reads made while others of their kind are on their way.
    claims: batch::Batcher<batched::Claims>,
    outcomes: batch::Batcher<batched::Outcomes>,
    reads: batch::Batcher<batched::Reads>,
    /// The connection record reads are sent on, many at once (see `lanes`).
    lane: lanes::ReadLane,
    /// Connections sync callers drive on their own threads (see `own`).
    own: own::OwnConnections,
    /// Recorded outcomes read or written recently, if the store keeps them (see
    /// `replay_cache`).
    pub(crate) cache: Option<replay_cache::ReplayCache>,
}

/// See [`Shared::forgetting`].
pub(crate) struct Forgetting<'a> {
    shared: &'a Shared,
    key: &'a [u8],
}

impl Drop for Forgetting<'_> {
    fn drop(&mut self) {
        self.shared.forget_cached(self.key);
    }
}

impl Shared {
    /// Forgets `key`'s cached record.
    pub(crate) fn forget_cached(&self, key: &[u8]) {
        if let Some(cache) = &self.cache {
            cache.forget(key);
        }
    }

    /// Forgets `key`'s cached record now, before a write of it is sent, and again when the
    /// returned guard drops, once the write has ended (committed, failed, or given up): a read
    /// that saw the old record meanwhile is never kept past the write.
    pub(crate) fn forgetting<'a>(&'a self, key: &'a [u8]) -> Forgetting<'a> {
        self.forget_cached(key);
        Forgetting { shared: self, key }
    }

    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, Error> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Tells waiters in every replica that `key`'s record changed (only when one marked it).
    pub(crate) async fn notify(&self, client: &tokio_postgres::Client, key: &[u8]) {
        let tag = listen::tag_text(&listen::tag(&self.scope, key));
        self.notify_all(client, &[tag]).await;
    }

    /// Tells waiters in every replica that the records of `tags` (see `listen::tag_text`)
    /// changed. A notification that cannot be sent is left: waiters poll.
    async fn notify_all(&self, client: &tokio_postgres::Client, tags: &[String]) {
        let sent = client
            .execute(
                "SELECT pg_notify($1, t) FROM unnest($2::text[]) AS t",
                &[&self.channel, &tags],
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not notify waiters; they will poll");
        }
    }
}

/// `sql` prepared on `client` (once per connection: deadpool keeps the statement cache).
pub(crate) async fn prepared(
    client: &deadpool_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Statement, Error> {
    client.prepare_cached(sql).await.map_err(pg_error)
}

/// The engine, opened, with the epoch of this open.
pub(crate) struct OpenedPg {
    pub engine: PgEngine,
    pub epoch: u64,
}

/// Connects, migrates the schema and starts the heartbeat and the listener.
pub(crate) fn open(settings: PgSettings) -> Result<OpenedPg, Error> {
    // Workers for the connections' I/O: as many as the machine's cores, within reason.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let bridge = Arc::new(Bridge::new(workers)?);
    let mut config = settings.config.clone();
    config.connect_timeout(settings.connect_timeout);
    // Operators (and tests) find the store's sessions by name in pg_stat_activity.
    if config.get_application_name().is_none() {
        config.application_name("idemstore");
    }
    // A half-open connection (a network partition) is noticed in seconds, not hours.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
    }
    // The user's options first, the store's last (the last setting of a name wins).
    let mut options = config.get_options().map(str::to_owned).unwrap_or_default();
    options.push_str(&format!(
        " -c synchronous_commit={} -c lock_timeout={}",
        if settings.synchronous_commit {
            "on"
        } else {
            "off"
        },
        LOCK_WAIT.as_millis()
    ));
    if let Some(timeout) = settings.statement_timeout {
        options.push_str(&format!(
            " -c statement_timeout={}",
            timeout.as_millis().max(1)
        ));
    }
    config.options(options.trim_start());
    let manager = Manager::from_connect(
        config.clone(),
        connect::OnEngineRuntime(bridge.handle()),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // A share of the pool's connections is kept for sync callers' own connections.
    let own_max = own::share_of(settings.pool_size);
    let pool = Pool::builder(manager)
        .max_size(settings.pool_size - own_max)
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
        io_timeout: settings.io_timeout,
        leases: lease::Leases::default(),
        first: first::FirstStatement::default(),
        hub: Arc::new(listen::Hub::default()),
        channel: channel.clone(),
        claims: batch::Batcher::new(batched::CLAIMS_IN_FLIGHT, bridge.handle()),
        outcomes: batch::Batcher::new(
            settings.pool_size.min(batched::OUTCOMES_IN_FLIGHT),
            bridge.handle(),
        ),
        reads: batch::Batcher::new(batched::READS_IN_FLIGHT, bridge.handle()),
        lane: lanes::ReadLane::new(config.clone(), bridge.handle()),
        own: own::OwnConnections::new(own_max, config.clone(), settings.connect_timeout),
        cache: settings
            .replay_cache
            .map(|(capacity, max_age)| replay_cache::ReplayCache::new(capacity, max_age)),
    });
    let epoch = bridge.run(async {
        let mut client = shared.client().await?;
        schema::migrate(&mut client, &settings.schema).await?;
        schema::next_epoch_alone(&mut client, &shared.sql, 0).await
    })?;
    bridge.spawn(lease::heartbeat(
        Arc::downgrade(&shared),
        config.clone(),
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
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let kind = match e.code() {
        _ if e.is_closed() || io => StorageKind::Connection,
        Some(code) if *code == SqlState::QUERY_CANCELED => StorageKind::Timeout,
        Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE => StorageKind::Busy,
        Some(code)
            if code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                // The server ended a session that sat idle past its `idle_session_timeout`.
                || *code == SqlState::IDLE_SESSION_TIMEOUT =>
        {
            StorageKind::Connection
        }
        // A server error, or one of the client's own (a row count, a type conversion).
        Some(_) | None => StorageKind::Database,
    };
    storage(e, kind)
}

/// `f`, failing with [`no_answer`] if it has not finished within `limit`.
pub(crate) async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(no_answer(limit)))
}

/// The error of an operation the database did not answer within `limit`.
pub(crate) fn no_answer(limit: Duration) -> Error {
    storage(
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the database within {limit:?}"),
        ),
        StorageKind::Timeout,
    )
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
#[derive(Clone, Copy)]
pub(crate) struct Columns {
    pub(crate) state: i16,
    pub(crate) expires_ms: i64,
    pub(crate) claim: (i64, i64),
    pub(crate) life: (i64, i64),
}

/// A statement parameter.
pub(crate) type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// A whole record as its row: the bytes, their digest and the columns derived from its
/// header, bound as `$1` to `$10` (scope, key, record, digest, state, expiry, claim, life) by
/// every statement that writes a whole record (an outcome, a transaction's write, an import).
pub(crate) struct RecordRow<'r> {
    record: &'r [u8],
    digest: Vec<u8>,
    columns: Columns,
}

impl<'r> RecordRow<'r> {
    pub(crate) fn of(key: &[u8], record: &'r [u8]) -> Result<Self, Error> {
        Ok(Self {
            record,
            digest: digest(record),
            columns: columns(key, record)?,
        })
    }

    pub(crate) fn params<'a>(&'a self, scope: &'a String, key: &'a &'a [u8]) -> [Param<'a>; 10] {
        let c = &self.columns;
        [
            scope,
            key,
            &self.record,
            &self.digest,
            &c.state,
            &c.expires_ms,
            &c.claim.0,
            &c.claim.1,
            &c.life.0,
            &c.life.1,
        ]
    }
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
        // Boxed once: a statement's future (pool, client, timer) is kilobytes, and driving it
        // moves it through several frames.
        self.bridge.run(Box::pin(self.timed(f)))
    }

    /// Runs a sync call's operation `op`, made for the own connection `own` if it has one
    /// (see `own`): on that connection's runtime, on this thread; through the bridge if not.
    fn run_sync<T: Send>(
        &self,
        own: Option<&own::OwnConnection>,
        op: impl std::future::Future<Output = Result<T, Error>> + Send,
    ) -> Result<T, Error> {
        match own {
            Some(own) => own.block_on(self.timed(op)),
            None => self.run(op),
        }
    }

    /// `f`, failing with a typed timeout if the database does not answer within the store's
    /// I/O timeout (a dead connection the server never saw, a lock held for long).
    pub(crate) fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, Error>> + Send,
    ) -> impl std::future::Future<Output = Result<T, Error>> + Send {
        bounded(self.shared.io_timeout, f)
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

    /// How many own connections are open (see `own`).
    pub(crate) fn own_connections(&self) -> usize {
        self.shared.own.open()
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

#[cfg(test)]
pub(crate) mod fixtures {
    //! What the engine's own tests share: a record of a given state, an engine on the test
    //! server (`IDEMSTORE_TEST_POSTGRES`; `None` when unset), and dropping its schema.

    use super::*;
    use crate::format::record::{ClaimToken, Header, OutcomeKind, RecordState};

    /// A record in `state` with claim token `token` (a completed one holds the token's bytes).
    pub(crate) fn record(state: RecordState, token: u64) -> Vec<u8> {
        let claim = ClaimToken {
            epoch: 1,
            sequence: token,
        };
        let completed = state == RecordState::Completed;
        let header = Header {
            state,
            outcome: if completed {
                OutcomeKind::Stored
            } else {
                OutcomeKind::None
            },
            attempts: 1,
            created_ms: 0,
            updated_ms: 0,
            expires_ms: u64::MAX >> 2,
            claim,
            fingerprint: None,
            has_steps: false,
            life: claim,
            codec: crate::format::codec::Codec::Bincode,
            shape: None,
        };
        let payload = if completed {
            token.to_le_bytes().to_vec()
        } else {
            Vec::new()
        };
        record::encode(&header, &payload)
    }

    /// An engine in `schema` with a pool of `pool_size` and a 30 s lease.
    pub(crate) fn engine(schema: &str, pool_size: usize) -> Option<PgEngine> {
        let url = std::env::var("IDEMSTORE_TEST_POSTGRES").ok()?;
        let settings = PgSettings {
            config: url.parse().expect("connection string"),
            schema: schema.to_owned(),
            scope: String::new(),
            pool_size,
            lease: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            statement_timeout: None,
            io_timeout: Duration::from_secs(30),
            synchronous_commit: true,
            replay_cache: None,
        };
        Some(open(settings).expect("open").engine)
    }

    /// Drops `schema` and everything in it.
    pub(crate) fn drop_schema(engine: &PgEngine, schema: &str) {
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

#[cfg(test)]
mod tests {
    //! The claim statement's own guard, which the driver's liveness check normally makes
    //! redundant: it is what holds when a holder renews between another replica's look at its
    //! lease and that replica's claim. Needs `IDEMSTORE_TEST_POSTGRES`.

    use super::fixtures::{drop_schema, engine, record};
    use crate::engine::Engine;
    use crate::format::record::RecordState;

    fn pending(token: u64) -> Vec<u8> {
        record(RecordState::Pending, token)
    }

    #[test]
    fn a_claim_never_replaces_a_pending_record_whose_lease_runs() {
        let schema = format!("unit_{}", std::process::id());
        let Some(engine) = engine(&schema, 2) else {
            return;
        };
        let first = pending(1);
        assert!(engine.claim(b"k", None, first.clone()).expect("claim"));
        // Another replica that (wrongly) believes the holder dead: refused while the lease runs.
        assert!(!engine.claim(b"k", Some(&first), pending(2)).expect("claim"));
        engine.lapse_leases().expect("lapse");
        assert!(engine.claim(b"k", Some(&first), pending(3)).expect("claim"));
        drop_schema(&engine, &schema);
    }
}
