//! Opening a store on PostgreSQL.
//!
//! Invariants: every setting is checked before a connection is made ([`Error::InvalidConfig`]);
//! the schema name is a plain identifier, so it is safe in statements.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::call::Call;
use crate::api::config::StoreBuilder;
use crate::api::store::Store;
use crate::core::options::Durability;
use crate::core::outcome::Outcome;
use crate::core::policy::ErrorPolicy;
use crate::engine::postgres::{self as pg, valid_schema_name, PgEngine, PgSettings, PgTx};
use crate::error::{Error, ExecuteError};
use crate::stats::Counters;

/// The longest key the PostgreSQL engine accepts: with the tenant, an index entry must stay
/// under PostgreSQL's limit of about 2700 bytes.
const MAX_PG_KEY_BYTES: usize = 2048;

/// A store on PostgreSQL, shared by every replica of a service.
pub type PgStore = Store<PgEngine>;

/// Where a [`PgStore`] connects and how it keeps its claims (feature `postgres`).
///
/// | setting | default |
/// |---|---|
/// | [`schema`](Self::schema) | `idemstore` |
/// | [`tenant`](Self::tenant) | `""` (one scope for every key) |
/// | [`pool_size`](Self::pool_size) | 16 connections |
/// | [`lease`](Self::lease) | 10 seconds |
/// | [`connect_timeout`](Self::connect_timeout) | 10 seconds |
/// | [`statement_timeout`](Self::statement_timeout) | none (the server's) |
/// | [`io_timeout`](Self::io_timeout) | 30 seconds |
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idemstore::{PgOptions, PgStore};
/// let store = PgStore::connect(
///     PgOptions::new("host=127.0.0.1 user=postgres dbname=test").tenant("shop-eu"),
/// )?;
/// let id = store.execute_once("order-17", || Ok::<_, std::io::Error>(17u64))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgOptions {
    url: String,
    schema: String,
    tenant: String,
    pool_size: usize,
    lease: Duration,
    connect_timeout: Duration,
    statement_timeout: Option<Duration>,
    io_timeout: Duration,
    replay_cache: Option<(usize, Duration)>,
}

impl PgOptions {
    /// Options for the database at `url`: a URL (`postgres://user@host/db`) or key-value
    /// pairs (`host=... user=... dbname=...`), as libpq takes them. TLS is not supported.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "idemstore".into(),
            tenant: String::new(),
            pool_size: 16,
            lease: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            statement_timeout: None,
            io_timeout: Duration::from_secs(30),
            replay_cache: None,
        }
    }

    /// The schema that holds the store's tables (created and migrated on open): a plain
    /// lower-case identifier, `[a-z_][a-z0-9_]*`, at most 48 bytes.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The tenant scope of this store's keys (at most 255 bytes): stores with different
    /// tenants share the tables but never see each other's keys.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// The most connections the store's claims, outcomes, steps and transactions use at once
    /// (1 to 1024). A quarter of them (rounded down) are kept for sync callers whose
    /// claim or outcome goes alone: such a caller's own thread drives the connection, so
    /// no other thread is woken on the way; the rest are pooled. The store also keeps three
    /// connections of its own beside these: one for notifications, one for renewing leases,
    /// and one read lane, on which every record read is sent, many callers' reads at once.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long a claim stays live without its holder renewing it (at least 300 ms). A
    /// holder renews every third of it while its operation runs; after a holder's process
    /// dies (or stays paused longer than about two thirds of it), another replica may take the
    /// key over once it has ended, by the database's clock.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long to wait for a connection (new or from the pool) before an error.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Cancels any statement of the store that runs longer (`statement_timeout`); the call
    /// gets a [`StorageKind::Timeout`](crate::StorageKind::Timeout) error.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// The longest one statement of the store may take by the client's clock (a connection
    /// the server no longer answers on, a lock held by another session): after it the call
    /// gets a [`StorageKind::Timeout`](crate::StorageKind::Timeout) error. This bounds the
    /// statements an operation runs through [`PgTx`](crate::PgTx) too.
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// Keeps up to `capacity` recorded outcomes this process recorded or read, each for up to
    /// `max_age` after it was written or read, so that a retry arriving at this replica again
    /// is replayed without a round trip (off by default).
    ///
    /// **What it may serve.** Within `max_age` of its read, an entry answers for its key as the
    /// record it holds, even if another replica has since removed the key (an operator's
    /// `remove`) or recorded a new outcome for it after that: such a retry gets the
    /// old outcome (or `FingerprintMismatch` against it) instead of running again. This
    /// replica's own writes and removals of a key forget its entry first, and a record past
    /// its expiry is never served. Keep `max_age` at what a stale replay may cost you: seconds,
    /// not hours. Transactional calls ([`PgStore::execute_once_in_tx`]) always read the
    /// database. A `capacity` or `max_age` of zero is no cache.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), idemstore::Error> {
    /// use idemstore::{PgOptions, StoreBuilder};
    /// use std::time::Duration;
    /// let store = StoreBuilder::default().open_postgres(
    ///     PgOptions::new("postgres://postgres@127.0.0.1/test")
    ///         .replay_cache(10_000, Duration::from_secs(5)),
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn replay_cache(mut self, capacity: usize, max_age: Duration) -> Self {
        self.replay_cache = Some((capacity, max_age));
        self
    }

    fn settings(&self, synchronous_commit: bool) -> Result<PgSettings, Error> {
        let config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|_| Error::InvalidConfig("the PostgreSQL connection string does not parse"))?;
        if !valid_schema_name(&self.schema) {
            return Err(Error::InvalidConfig(
                "the schema must match [a-z_][a-z0-9_]* and be at most 48 bytes",
            ));
        }
        if self.tenant.len() > 255 || self.tenant.contains('\0') {
            return Err(Error::InvalidConfig(
                "the tenant must be at most 255 bytes, with no NUL character",
            ));
        }
        if !(1..=1024).contains(&self.pool_size) {
            return Err(Error::InvalidConfig("pool_size must be between 1 and 1024"));
        }
        if self.lease < Duration::from_millis(300) {
            return Err(Error::InvalidConfig("the lease must be at least 300 ms"));
        }
        if self.connect_timeout.is_zero()
            || self.io_timeout.is_zero()
            || self.statement_timeout.is_some_and(|t| t.is_zero())
        {
            return Err(Error::InvalidConfig("timeouts must be non-zero"));
        }
        Ok(PgSettings {
            config,
            schema: self.schema.clone(),
            scope: self.tenant.clone(),
            pool_size: self.pool_size,
            lease: self.lease,
            connect_timeout: self.connect_timeout,
            statement_timeout: self.statement_timeout,
            // A server-side statement timeout answers first; the client's waits a little longer.
            io_timeout: match self.statement_timeout {
                Some(t) => self.io_timeout.min(t + Duration::from_secs(1)),
                None => self.io_timeout,
            },
            synchronous_commit,
            replay_cache: self
                .replay_cache
                .filter(|&(capacity, max_age)| capacity > 0 && !max_age.is_zero()),
        })
    }
}

impl StoreBuilder {
    /// Opens a store on PostgreSQL with these settings (the builder's path is not used;
    /// [`StoreBuilder::default`] has none). [`Durability::Immediate`] makes every commit
    /// synchronous; [`Durability::Periodic`] maps to `synchronous_commit = off`: a server
    /// crash (not a replica's) may lose the commits of its last moments (up to three times
    /// the server's `wal_writer_delay`, 600 ms by default), including recorded outcomes, so
    /// their operations may run again.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), idemstore::Error> {
    /// use idemstore::{PgOptions, StoreBuilder};
    /// use std::time::Duration;
    /// let store = StoreBuilder::default()
    ///     .default_ttl(Duration::from_secs(3600))
    ///     .open_postgres(PgOptions::new("postgres://postgres@127.0.0.1/test"))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an out-of-range setting or a connection string that does
    /// not parse (nothing is written); [`Error::UnsupportedSchemaVersion`] for a schema
    /// written by a newer idemstore; [`Error::Storage`] when the server cannot be reached
    /// ([`StorageKind::Connection`](crate::StorageKind::Connection)) or refuses the schema's
    /// creation.
    pub fn open_postgres(self, options: PgOptions) -> Result<PgStore, Error> {
        self.validate_settings()?;
        if self.max_key_bytes > MAX_PG_KEY_BYTES {
            return Err(Error::InvalidConfig(
                "max_key_bytes must be at most 2048 on PostgreSQL (keys are indexed)",
            ));
        }
        let settings = options.settings(self.durability == Durability::Immediate)?;
        let opened = pg::open(settings)?;
        Store::start(
            opened.engine,
            opened.epoch,
            Arc::new(Counters::default()),
            self,
            None,
        )
    }
}

impl Store<PgEngine> {
    /// Opens a store on PostgreSQL with the default settings; see
    /// [`StoreBuilder::open_postgres`].
    ///
    /// # Errors
    /// As [`StoreBuilder::open_postgres`].
    pub fn connect(options: PgOptions) -> Result<PgStore, Error> {
        StoreBuilder::default().open_postgres(options)
    }

    /// Runs `f` exactly once for `key`, with its writes to your own tables and the key's
    /// outcome committed in one PostgreSQL transaction: after any crash (of a replica or of
    /// the server), either both are committed or neither is. For effects on data in the same
    /// database (decrement stock, append to a ledger, mark an order paid): this is what makes
    /// them exactly-once rather than at-least-once. Replays, fingerprints, TTLs and waiting
    /// behave as in [`execute_once`](Store::execute_once); no Pending record is ever visible.
    ///
    /// `f` writes through the [`PgTx`] it is given. It **may run more than once** (when
    /// another replica inserts the key first, the transaction rolls back and the call looks
    /// again); only the run that commits applies anything, so it must have no effects outside
    /// the transaction. An `Err` from `f` rolls its writes back and is recorded (retryable, or
    /// permanent with [`Call::permanent_if`] and [`Call::run_in_tx`]) in the same transaction.
    /// The row of the key's record stays locked while `f` runs: keep it short.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use idemstore::{PgOptions, PgStore};
    /// let store = PgStore::connect(PgOptions::new("host=127.0.0.1 user=postgres dbname=test"))?;
    /// let left = store.execute_once_in_tx("reserve:order-7", |tx| {
    ///     let row = tx.query_one(
    ///         "UPDATE stock SET left = left - 1 WHERE sku = $1 AND left > 0 RETURNING left",
    ///         &[&"sku-1"],
    ///     )?;
    ///     Ok::<i64, idemstore::Error>(row.get(0))
    /// })?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`execute_once`](Store::execute_once). [`Error::Storage`] from the commit leaves
    /// the outcome unknown, but never half-applied: a retry either replays it or runs `f`
    /// on data it never touched.
    pub fn execute_once_in_tx<T, E, F>(
        &self,
        key: impl AsRef<[u8]>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut PgTx<'_>) -> Result<T, E>,
    {
        self.call(key.as_ref()).run_in_tx(f)
    }

    /// Ends the lease of every running claim of this store's tenant now, and stops renewing
    /// this store's: as if every holder had been paused past its lease. For tests of
    /// takeovers; never call it in a service.
    ///
    /// # Errors
    /// [`Error::Storage`] if the database cannot be reached.
    #[doc(hidden)]
    pub fn __lapse_leases(&self) -> Result<(), Error> {
        self.shared().engine.lapse_leases()
    }

    /// Whether this store's next call claims before it reads (the first statement follows
    /// the traffic: design §13). For tests.
    #[doc(hidden)]
    pub fn __claims_first(&self) -> bool {
        use crate::engine::Engine;
        self.shared().engine.claims_first()
    }

    /// How many connections sync callers drive on their own threads are open (design §13,
    /// "Own connections"). For tests.
    #[doc(hidden)]
    pub fn __own_connections(&self) -> usize {
        self.shared().engine.own_connections()
    }
}

/// The PostgreSQL-specific part of a call: exactly-once local effects.
impl<P> Call<'_, '_, P, PgEngine> {
    /// As [`run`](Self::run), with the operation's writes committed in one PostgreSQL
    /// transaction with its outcome; see [`PgStore::execute_once_in_tx`].
    ///
    /// # Errors
    /// As [`PgStore::execute_once_in_tx`].
    pub fn run_in_tx<T, E, F>(self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut PgTx<'_>) -> Result<T, E>,
        P: ErrorPolicy<E>,
    {
        crate::driver::pg_transaction::execute_in_pg_tx(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            f,
        )
    }
}
