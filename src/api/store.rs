//! The public `Store`: opening, `execute_once`, inspection and shutdown.
//!
//! Invariants: a `Store` owns its background thread; dropping it (or [`Store::close`]) stops
//! and joins the sweeper, flushes the engine, and returns only once the engine has let go of
//! its files, so the path can be opened again at once. `Store` is `Send + Sync`: every method
//! takes `&self` and shares state only through the engine, the registry and atomics. It is
//! generic over its engine; everything but the sled-specific transactional API (`tree`,
//! `execute_once_in_tx`) works on every engine.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use crate::api::call::Call;
use crate::api::config::StoreBuilder;
use crate::core::options::{CallOptions, Durability, Settings};
use crate::core::outcome::{Outcome, RecordInfo};
use crate::core::policy::AllRetryable;
use crate::core::replay::decode_error;
use crate::driver::context::Context;
use crate::driver::registry::Registry;
use crate::driver::state::StoreState;
use crate::driver::sweeper::{self, SweeperThread};
use crate::driver::transaction::TxResult;
use crate::engine::sled::{self as sled_engine, SledEngine};
use crate::engine::{Engine, RecordIter};
use crate::error::{Error, ExecuteError};
use crate::format::record::{self, RecordState};
use crate::stats::{Counters, Stats};

/// An embedded, durable idempotency store.
///
/// Wrap a side effect in [`execute_once`](Self::execute_once): the first call with a key runs
/// it and durably records its outcome; later calls with that key get the recorded outcome back
/// without running it, across threads, retries and restarts, until the record expires.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let charge = |cents: u64| Ok::<String, std::io::Error>(format!("receipt for {cents}"));
/// let store = idemstore::Store::open(dir.path().join("idem-db"))?;
/// let receipt = store.execute_once("order-7f3a", || charge(4200))?; // runs
/// let again = store.execute_once("order-7f3a", || charge(4200))?; // replayed, no charge
/// assert_eq!(*receipt, *again);
/// assert!(again.is_replayed());
/// # Ok(()) }
/// ```
#[allow(private_bounds)]
pub struct Store<S: Engine = SledEngine> {
    /// Invariant: `Some` from open until shutdown, which only `close` and `drop` call.
    shared: Option<Arc<StoreState<S>>>,
    sweeper: Option<SweeperThread>,
    /// Run after the engine's last handle is gone (sled: wait for its file lock to go).
    after_close: Option<Box<dyn FnOnce() + Send + Sync>>,
}

#[allow(private_bounds)]
impl<S: Engine> std::fmt::Debug for Store<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl Store<SledEngine> {
    /// Opens (or creates) a store at `path` with the default settings
    /// (see [`StoreBuilder`]).
    ///
    /// # Errors
    /// As [`StoreBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store, Error> {
        Self::builder(path).open()
    }

    /// A builder to configure the store before opening it.
    pub fn builder(path: impl AsRef<Path>) -> StoreBuilder {
        StoreBuilder::new(path.as_ref().to_path_buf())
    }

    pub(crate) fn open_with(b: StoreBuilder) -> Result<Store, Error> {
        let immediate = b.durability == Durability::Immediate;
        let flush_every_ms = match b.durability {
            Durability::Immediate => None,
            Durability::Periodic(interval) => Some(crate::clock::millis(interval).max(1)),
        };
        let config = sled::Config::new()
            .path(&b.path)
            .cache_capacity(b.cache_bytes)
            .flush_every_ms(flush_every_ms);
        let counters = Arc::new(Counters::default());
        let opened = sled_engine::open(&b.path, config, immediate, Arc::clone(&counters))?;
        let lock_file = b.path.join("db");
        let after_close = Box::new(move || sled_engine::wait_for_engine_release(&lock_file));
        Store::start(opened.engine, opened.epoch, counters, b, Some(after_close))
    }

    /// Opens (creating if needed) a tree of your own in the store's database, for effects that
    /// must commit together with an outcome (see [`execute_once_in_tx`](Self::execute_once_in_tx)).
    ///
    /// A tree keeps the database open: drop your trees before the store closes, or closing
    /// waits for them (up to 10 s, then logs a warning) and the path stays locked.
    ///
    /// # Errors
    /// [`Error::ReservedTreeName`] for names starting with `idemstore/`; [`Error::Storage`].
    pub fn tree(&self, name: &str) -> Result<sled::Tree, Error> {
        if name.starts_with(sled_engine::RESERVED_PREFIX) {
            return Err(Error::ReservedTreeName(name.to_owned()));
        }
        self.shared()
            .engine
            .db
            .open_tree(name)
            .map_err(sled_engine::sled_error)
    }
    /// Runs `f` exactly once for `key`, with its writes to `trees` and the Completed record
    /// committed in one transaction: after any crash, either both are durable or neither is.
    /// For effects on local state (decrement stock, append to a ledger, mark an order paid).
    /// Replays, fingerprints, TTLs and waiting behave as in [`execute_once`](Self::execute_once);
    /// no Pending record is ever visible.
    ///
    /// `f` gets one transactional view per tree, in order. It **may run more than once** (the
    /// engine re-runs a transaction on conflict; only the run that commits applies anything),
    /// so it must touch nothing but those views: no I/O, no calls to the store (sled 0.34 holds
    /// a database-wide lock while `f` runs; calling the store from `f` deadlocks). `f` aborts
    /// with `sled::transaction::abort(e)`: its writes are discarded and `e` is recorded as
    /// retryable (or permanent, see [`Call::permanent_if`] with [`Call::run_in_tx`]).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let store = idemstore::Store::open(dir.path().join("db"))?;
    /// let stock = store.tree("stock")?;
    /// stock.insert("sku-1", &10u64.to_be_bytes())?;
    /// for _ in 0..3 {
    ///     store.execute_once_in_tx("reserve:order-7", &[&stock], |t| {
    ///         let left = t[0].get("sku-1")?.map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
    ///         if left == 0 {
    ///             return sled::transaction::abort("out of stock");
    ///         }
    ///         t[0].insert("sku-1", &(left - 1).to_be_bytes())?;
    ///         Ok(left - 1)
    ///     })
    ///     .unwrap();
    /// }
    /// assert_eq!(stock.get("sku-1")?.unwrap().as_ref(), &9u64.to_be_bytes()); // applied once
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`execute_once`](Self::execute_once); [`Error::ResultTooLarge`] and
    /// [`Error::ResultNotEncodable`] here abort the transaction, so nothing was applied.
    pub fn execute_once_in_tx<T, E, F>(
        &self,
        key: impl AsRef<[u8]>,
        trees: &[&sled::Tree],
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(&[sled::transaction::TransactionalTree]) -> TxResult<T, E>,
    {
        self.call(key.as_ref()).run_in_tx(trees, f)
    }
}

#[allow(private_bounds)]
impl<S: Engine> Store<S> {
    /// Starts a store on an opened engine: the shared state, then the sweeper.
    pub(crate) fn start(
        engine: S,
        epoch: u64,
        counters: Arc<Counters>,
        b: StoreBuilder,
        after_close: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Result<Store<S>, Error> {
        crate::stats::describe();
        let shared = Arc::new(StoreState {
            engine,
            registry: Registry::new(),
            clock: b.clock,
            counters,
            settings: Settings {
                default_ttl: b.default_ttl,
                wait_timeout: b.wait_timeout,
                orphan_policy: b.orphan_policy,
                max_key_bytes: b.max_key_bytes,
                max_result_bytes: b.max_result_bytes,
                immediate: b.durability == Durability::Immediate,
                codec: b.codec,
            },
            epoch: AtomicU64::new(epoch),
            last_claim: AtomicU64::new(0),
            durability_failed: AtomicBool::new(false),
            left_behind: Default::default(),
        });
        let sweeper = match b.sweep_interval {
            Some(interval) => Some(
                sweeper::start(Arc::clone(&shared), interval)
                    .map_err(sled_engine::io_at(&b.path))?,
            ),
            None => None,
        };
        tracing::debug!(epoch, "idemstore opened");
        Ok(Store {
            shared: Some(shared),
            sweeper,
            after_close,
        })
    }

    /// Runs `f` once for `key` and records its outcome; later calls with the same key, until
    /// the record expires, return that outcome without running `f`.
    ///
    /// | the key's record | what happens |
    /// |---|---|
    /// | absent, expired, or failed with a retryable error | claim it (durably), run `f`, record the outcome (durably), return it |
    /// | completed | return the recorded value with [`Outcome::is_replayed`] true; `f` does not run |
    /// | failed with a permanent error | return it as [`ExecuteError::Operation`] with `replayed: true` |
    /// | running in another call of this process | wait for it (up to the wait timeout), then as above |
    /// | left Pending by a run that died | by [`OrphanPolicy`](crate::OrphanPolicy): run `f` again, or [`Error::Interrupted`] |
    ///
    /// An `Err` from `f` is retryable here (use [`Store::call`] and
    /// [`Call::permanent_if`] to record permanent errors); a panic in `f` leaves the record
    /// retryable, wakes waiters and continues to the caller.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let store = idemstore::Store::open(dir.path().join("db"))?;
    /// let mut runs = 0;
    /// for _ in 0..3 {
    ///     let id = store.execute_once("create-order-1", || {
    ///         runs += 1;
    ///         Ok::<_, std::io::Error>(1001u64)
    ///     })?;
    ///     assert_eq!(*id, 1001);
    /// }
    /// assert_eq!(runs, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ExecuteError::Operation`]: `f`'s error, now or replayed. [`ExecuteError::Store`]:
    /// [`Error::EmptyKey`] / [`Error::KeyTooLong`] (nothing written);
    /// [`Error::InProgress`]; [`Error::Interrupted`]; [`Error::CorruptRecord`] /
    /// [`Error::UnsupportedRecordVersion`] / [`Error::Decode`] (nothing ran);
    /// [`Error::PermanentErrorRecorded`]; [`Error::ResultTooLarge`] /
    /// [`Error::ResultNotEncodable`] (`f` ran; it will not run again for this key);
    /// [`Error::OutcomeNotRecorded`]; [`Error::Storage`] (before the claim is durable: `f` did
    /// not run; after: `f` ran and its outcome may not be durable).
    pub fn execute_once<T, E, F>(
        &self,
        key: impl AsRef<[u8]>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T, E>,
    {
        self.call(key.as_ref()).run(f)
    }

    /// As [`execute_once`](Self::execute_once), for an operation made of named steps
    /// (recovery points). Each [`Context::step`] records its outcome durably when it finishes;
    /// when a later attempt runs (after a retryable error, a panic or a crash), finished steps
    /// return their recorded outcome without running, so a checkout whose charge succeeded
    /// and whose confirmation failed retries only the confirmation.
    ///
    /// Step names must be unique within a run and the same, in the same order, on every
    /// attempt; a retry that asks for a different step than the one recorded at that position
    /// fails with [`Error::StepSequenceChanged`]. Steps live and expire with their key, show in
    /// [`Store::steps`], and go with [`Store::remove`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use idemstore::{StepError, Store};
    /// let store = Store::open(dir.path().join("db"))?;
    /// let (mut charges, mut mails) = (0, 0);
    /// for attempt in 1..=2 {
    ///     let r = store.execute_steps("checkout-91", |ctx| {
    ///         let charge = ctx.step("charge", || { charges += 1; Ok::<_, std::io::Error>(4200u64) })?;
    ///         ctx.step("confirm", || {
    ///             mails += 1;
    ///             if attempt == 1 { Err(std::io::Error::other("smtp down")) } else { Ok(()) }
    ///         })?;
    ///         Ok::<_, StepError<std::io::Error>>(charge)
    ///     });
    ///     assert_eq!(r.is_ok(), attempt == 2);
    /// }
    /// assert_eq!((charges, mails), (1, 2)); // charged once, confirmed on the retry
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`execute_once`](Self::execute_once); a store error inside a step fails the run with
    /// that error.
    pub fn execute_steps<T, E, F>(
        &self,
        key: impl AsRef<[u8]>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut Context<'_>) -> Result<T, E>,
    {
        self.call(key.as_ref()).run_steps(f)
    }

    /// The former name of [`execute_steps`](Self::execute_steps).
    ///
    /// # Errors
    /// As [`execute_steps`](Self::execute_steps).
    #[deprecated(since = "0.2.0", note = "renamed to `execute_steps`")]
    pub fn execute_once_with<T, E, F>(
        &self,
        key: impl AsRef<[u8]>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut Context<'_>) -> Result<T, E>,
    {
        self.execute_steps(key, f)
    }

    /// The recorded steps of `key`'s operation, in order (empty if none, or if the key is
    /// absent or expired).
    ///
    /// # Errors
    /// [`Error::CorruptStep`] for bad step bytes; [`Error::Storage`] for I/O failures.
    pub fn steps(&self, key: impl AsRef<[u8]>) -> Result<Vec<StepInfo>, Error> {
        let key = key.as_ref();
        let shared = self.shared();
        // What inspection shows must be durable, as what a replay returns (see StoreState).
        shared.durable_before_showing(false)?;
        let Some(bytes) = shared.engine.get(key)? else {
            return Ok(Vec::new());
        };
        let rec = record::decode(bytes.as_ref()).map_err(|e| decode_error(key, e))?;
        if rec.header.is_expired(shared.clock.now_millis()) {
            return Ok(Vec::new());
        }
        self.step_infos(key, rec.header.life)
    }

    /// The recorded steps of `key`'s life `life`, as inspection shows them.
    pub(crate) fn step_infos(
        &self,
        key: &[u8],
        life: crate::format::record::ClaimToken,
    ) -> Result<Vec<StepInfo>, Error> {
        let mut steps = Vec::new();
        for (index, bytes) in self.shared().engine.steps(key, life)? {
            let step = crate::format::step::decode(bytes.as_ref()).map_err(|reason| {
                Error::CorruptStep {
                    key: crate::key::KeyName::new(key),
                    index,
                    reason,
                }
            })?;
            steps.push(StepInfo {
                index,
                name: step.name.to_owned(),
                outcome_bytes: step.payload.len(),
            });
        }
        Ok(steps)
    }

    /// Starts configuring one call (fingerprint, TTL, wait, orphan policy, permanent errors);
    /// finish with [`Call::run`].
    pub fn call<'k, K: AsRef<[u8]> + ?Sized>(&self, key: &'k K) -> Call<'_, 'k, AllRetryable, S> {
        Call {
            store: self,
            key: key.as_ref(),
            options: CallOptions::default(),
            policy: AllRetryable,
        }
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn shared_arc(&self) -> &Arc<StoreState<S>> {
        // Invariant: as in `shared`.
        self.shared.as_ref().expect("store is open")
    }

    pub(crate) fn shared(&self) -> &StoreState<S> {
        // Invariant: only shutdown takes `shared`, and it runs in `close(self)` or `drop`,
        // after which no method can be called.
        self.shared.as_deref().expect("store is open")
    }

    /// The metadata of `key`'s record, or `None` if it is absent or expired.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use idemstore::{RecordState, Store};
    /// let store = Store::open(dir.path().join("db")).unwrap();
    /// store.execute_once("k", || Ok::<_, std::io::Error>(String::from("done"))).unwrap();
    /// let info = store.record("k").unwrap().unwrap();
    /// assert_eq!((info.state, info.attempts), (RecordState::Completed, 1));
    /// ```
    ///
    /// # Errors
    /// [`Error::CorruptRecord`] / [`Error::UnsupportedRecordVersion`] for bad bytes;
    /// [`Error::Storage`] for I/O failures.
    pub fn record(&self, key: impl AsRef<[u8]>) -> Result<Option<RecordInfo>, Error> {
        let key = key.as_ref();
        let shared = self.shared();
        // What inspection shows must be durable, as what a replay returns (see StoreState):
        // read first, then the durability point that covers what was read.
        let Some(bytes) = shared.engine.get(key)? else {
            shared.durable_before_showing(false)?;
            return Ok(None);
        };
        let rec = record::decode(bytes.as_ref()).map_err(|e| decode_error(key, e))?;
        shared.durable_before_showing(rec.header.state == RecordState::Pending)?;
        let now = shared.clock.now_millis();
        Ok((!rec.header.is_expired(now)).then(|| RecordInfo::new(&rec.header, rec.payload.len())))
    }

    /// Removes `key`'s record (whatever its state or bytes); returns whether there was one.
    /// The next call with the key runs its operation. In `Immediate` mode the removal is
    /// durable when this returns. A call running the key meanwhile will report
    /// [`Error::OutcomeNotRecorded`] rather than overwrite.
    ///
    /// # Errors
    /// [`Error::Storage`] for I/O failures.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<bool, Error> {
        let (key, engine) = (key.as_ref(), &self.shared().engine);
        // Whatever the engine holds now, no call of this store replays the key from a cache.
        engine.forget_cached(key);
        let removed = loop {
            let Some(bytes) = engine.get(key)? else {
                break false;
            };
            // A corrupt record has no steps anyone can reach: remove its bytes alone.
            let steps_of = record::decode(bytes.as_ref())
                .ok()
                .and_then(|r| r.header.has_steps.then_some(r.header.life));
            if engine.remove_record(key, bytes.as_ref(), steps_of)? {
                break true;
            }
        };
        self.shared().wait_durable()?;
        Ok(removed)
    }

    /// Iterates over live (unexpired) records in key order. Items for corrupt records are
    /// errors naming the key; iteration continues after them.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = idemstore::Store::open(dir.path().join("db")).unwrap();
    /// store.execute_once("a", || Ok::<_, std::io::Error>(1)).unwrap();
    /// let keys: Vec<Vec<u8>> = store.records().map(|r| r.unwrap().0).collect();
    /// assert_eq!(keys, vec![b"a".to_vec()]);
    /// ```
    pub fn records(&self) -> Records<'_, S> {
        // What inspection shows must be durable, as what a replay returns (see StoreState).
        let not_durable = self.shared().durable_before_showing(false).err();
        Records {
            iter: match not_durable {
                Some(e) => Box::new(std::iter::once(Err(e))),
                None => self.shared().engine.records(),
            },
            now_ms: self.shared().clock.now_millis(),
            state: None,
            shared: self.shared(),
            pending_synced: false,
        }
    }

    /// Iterates over live records in `state`; see [`Store::records`].
    pub fn records_in_state(&self, state: RecordState) -> Records<'_, S> {
        Records {
            state: Some(state),
            ..self.records()
        }
    }

    /// Removes every expired record now; returns how many. The background sweeper does the
    /// same every `sweep_interval`.
    ///
    /// # Errors
    /// [`Error::Storage`] for I/O failures.
    pub fn sweep_now(&self) -> Result<u64, Error> {
        sweeper::sweep(self.shared(), self.shared().clock.now_millis())
    }

    /// A snapshot of the store's counters.
    pub fn stats(&self) -> Stats {
        self.shared().counters.snapshot()
    }

    /// This open's epoch: 1 for a new store, one more on every open (and, on a shared
    /// engine, larger when a claim needed a token above another process's).
    pub fn epoch(&self) -> u64 {
        self.shared()
            .epoch
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes every write so far durable (useful in `Periodic` mode before a planned exit).
    ///
    /// # Errors
    /// [`Error::Storage`] if the flush fails.
    pub fn flush(&self) -> Result<(), Error> {
        self.shared().engine.flush()
    }

    /// Stops the background threads, waits (up to 10 s) for the work that dropped async calls
    /// left to tokio's blocking pool (their outcome's durability point, or the record of a run
    /// whose predicate panicked), flushes, and reports whether the final flush succeeded. Dropping
    /// the store does the same but can only log a failure.
    ///
    /// # Errors
    /// [`Error::Storage`] if the final flush fails.
    pub fn close(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        drop(self.sweeper.take());
        // What dropped async calls left to tasks holds the engine: let it finish, and flush it.
        if !shared
            .left_behind
            .wait_none(std::time::Duration::from_secs(10))
        {
            tracing::warn!("closing without the work dropped async calls left, not done within 10 s; it goes on, and holds the engine until it is done");
        }
        let flushed = shared.engine.flush();
        drop(shared);
        if let Some(after_close) = self.after_close.take() {
            after_close();
        }
        flushed
    }
}

#[allow(private_bounds)]
impl<S: Engine> Drop for Store<S> {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "final flush failed while closing the store");
        }
    }
}

/// One recorded step of a multi-step operation; see [`Store::steps`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepInfo {
    /// Position in the run (0-based).
    pub index: u32,
    /// The step's name.
    pub name: String,
    /// Size of its recorded outcome in bytes.
    pub outcome_bytes: usize,
}

/// Iterator over records; see [`Store::records`].
#[allow(private_bounds)]
pub struct Records<'s, S: Engine = SledEngine> {
    iter: RecordIter<'s, S::Bytes>,
    now_ms: u64,
    state: Option<RecordState>,
    /// The store, for the durability point before the first Pending record shown.
    shared: &'s StoreState<S>,
    /// A durability point was made after a Pending record shown was read.
    pending_synced: bool,
}

#[allow(private_bounds)]
impl<S: Engine> Iterator for Records<'_, S> {
    type Item = Result<(Vec<u8>, RecordInfo), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (key, bytes) = match self.iter.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e)),
            };
            let rec = match record::decode(bytes.as_ref()) {
                Ok(rec) => rec,
                Err(e) => return Some(Err(decode_error(&key, e))),
            };
            if rec.header.is_expired(self.now_ms)
                || self.state.is_some_and(|s| s != rec.header.state)
            {
                continue;
            }
            // A Pending record's claim may not be durable yet (design §6): one durability point,
            // after reading it, covers it and every record read before.
            let pending = rec.header.state == RecordState::Pending;
            if pending && !self.pending_synced {
                if let Err(e) = self.shared.durable_before_showing(true) {
                    return Some(Err(e));
                }
                self.pending_synced = true;
            }
            return Some(Ok((key, RecordInfo::new(&rec.header, rec.payload.len()))));
        }
    }
}
