//! The engine interface: what the drivers need from a storage engine, and the engines.
//!
//! Invariants every engine keeps (the conformance suite in `tests/conformance.rs` checks
//! them on each engine):
//! - **claims** are compare-and-swap: a claim succeeds only if the key's record is still the
//!   exact bytes the claimer read (or still absent);
//! - **holder writes are fenced**: a step, an outcome or a release succeeds only while the
//!   key's record is still the holder's exact Pending record; otherwise it changes nothing
//!   (a step written meanwhile is taken back) and reports `false`, so a stale holder can
//!   never overwrite a newer claim's record or add to its steps;
//! - **steps belong to a life**: they are stored and read under (key, life, index);
//! - **one removal**: a record leaves only through [`Engine::remove_record`], together with
//!   its life's steps, atomically;
//! - **expiry index**: every durable record has an entry at its expiry (written first);
//! - **durability**: `wait_durable` returns once every write applied before it is durable (per the mode);
//! - **liveness**: [`Engine::holder_live`] says whether the holder of a Pending claim is still
//!   running; an engine one process owns answers from that process's registry, a shared
//!   engine from the claim's lease, which its holder renews until it finishes or abandons it;
//! - **epochs**: [`Engine::fresh_epoch`] returns an epoch larger than its floor and every one handed out
//!   before, to any open of any process.

pub(crate) mod keys;
pub(crate) mod sled;

#[cfg(feature = "postgres")]
pub(crate) mod postgres;

#[cfg(feature = "memory-engine")]
pub mod memory;

#[cfg(feature = "tokio")]
use std::future::Future;
use std::time::Duration;

use crate::error::Error;
use crate::format::record::ClaimToken;

/// How long one look waits for a holder elsewhere, unless the engine can be told when it ends.
pub(crate) const HOLDER_POLL: Duration = Duration::from_millis(20);

/// Every record of an engine, in key order: (key, record bytes).
pub(crate) type RecordIter<'a, B> = Box<dyn Iterator<Item = Result<(Vec<u8>, B), Error>> + 'a>;

/// What a claim-first attempt found.
pub(crate) enum ClaimOrGet<B> {
    /// The key had no record: the claim is written.
    Claimed,
    /// The key's record, as it is: nothing written.
    Existing(B),
}

/// A claim as its holder knows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held<'a> {
    pub key: &'a [u8],
    /// The exact Pending record the holder wrote.
    pub record: &'a [u8],
    pub token: ClaimToken,
    pub life: ClaimToken,
}

/// What the drivers need from a storage engine.
pub(crate) trait Engine: Send + Sync + 'static {
    /// Owned stored bytes.
    type Bytes: AsRef<[u8]> + Send;

    /// The record stored for `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Self::Bytes>, Error>;

    /// Every record, in key order (for inspection).
    fn records(&self) -> RecordIter<'_, Self::Bytes>;

    /// Writes `pending` for `key` if its record is still `expected` (None: absent).
    fn claim(&self, key: &[u8], expected: Option<&[u8]>, pending: Vec<u8>) -> Result<bool, Error>;

    /// The holder's write of its outcome (or of the record as it was, to release a claim it
    /// could not make durable: `None` removes it). Fenced: only while the record is `held`'s.
    fn finish(&self, held: &Held<'_>, record: Option<Vec<u8>>) -> Result<bool, Error>;

    /// Records step `index` of the holder's life. Fenced: if the record is no longer
    /// `held`'s, the step is taken back and the result is `false`.
    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<bool, Error>;

    /// The recorded steps of `key`'s life `life`, as (index, bytes), in index order.
    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Self::Bytes)>, Error>;

    /// Removes `key`'s record if it is still `expected`, together with the steps of
    /// `steps_of` (the record's life, when it has steps), atomically. Returns whether it
    /// removed.
    fn remove_record(
        &self,
        key: &[u8],
        expected: &[u8],
        steps_of: Option<ClaimToken>,
    ) -> Result<bool, Error>;

    /// Writes `record` for `key` if the key has no record, together with `steps`, the recorded
    /// steps of the record's life `life` (as (index, bytes)), atomically; the caller indexes
    /// its expiry first. For moving records between stores (`Store::import`): it never
    /// replaces a record. Returns whether it wrote.
    fn import_record(
        &self,
        key: &[u8],
        record: &[u8],
        life: ClaimToken,
        steps: &[(u32, Vec<u8>)],
    ) -> Result<bool, Error>;

    /// Adds an expiry index entry pointing at `key`.
    fn index_expiry(&self, expires_ms: u64, key: &[u8]) -> Result<(), Error>;

    /// Up to `limit` expiry index entries due at `now_ms` (expires_ms <= now_ms), in index
    /// order (oldest first, then by key), from the first one after `after` (expires_ms, key).
    fn due_expiries(
        &self,
        now_ms: u64,
        after: Option<(u64, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error>;

    /// Removes expiry index entries.
    fn unindex_expiries(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), Error>;

    /// Whether a sweep pass of several batches should remove index entries on a second thread
    /// while it handles the next batch's records (an engine whose writes run in parallel and
    /// whose removals of index entries cost as much as those of records).
    fn unindex_in_parallel(&self) -> bool {
        false
    }

    /// Returns when every write applied before the call is durable (per the durability mode).
    fn wait_durable(&self) -> Result<(), Error>;

    /// Makes every write so far durable, whatever the mode (`Store::flush`, close).
    fn flush(&self) -> Result<(), Error>;

    /// Whether the holder of `key`'s Pending claim `claim` is still running. `running_here`:
    /// a call of this store runs the key now.
    fn holder_live(&self, key: &[u8], claim: ClaimToken, running_here: bool) -> bool;

    /// Blocks for at most `max` while `key`'s Pending claim `claim`, held elsewhere, may still
    /// be running; returns early when the engine learns that it changed.
    fn wait_for_holder(&self, _key: &[u8], _claim: ClaimToken, max: Duration) {
        std::thread::sleep(max.min(HOLDER_POLL));
    }

    /// The holder leaves its claim Pending without an outcome (to the orphan policy): an
    /// engine with leases stops renewing it.
    fn abandon(&self, _held: &Held<'_>) {}

    /// Bytes the engine's storage takes, if it can tell (for operators).
    fn size_on_disk(&self) -> Result<Option<u64>, Error> {
        Ok(None)
    }

    /// An epoch larger than every epoch handed out before, to any open of any process, and
    /// larger than `floor` (an epoch of a record moved in from another store).
    fn fresh_epoch(&self, floor: u64) -> Result<u64, Error>;

    // The async driver's view: the same operations as futures. An embedded engine answers
    // them in place (its reads and writes do not wait on a device; its durability point does,
    // and the driver runs that on the blocking pool, see `durability_blocks`); a networked
    // engine overrides them with its own asynchronous I/O.

    /// As [`Engine::get`].
    #[cfg(feature = "tokio")]
    fn get_async<'a>(
        &'a self,
        key: &'a [u8],
    ) -> impl Future<Output = Result<Option<Self::Bytes>, Error>> + Send + 'a {
        std::future::ready(self.get(key))
    }

    /// As [`Engine::claim`].
    #[cfg(feature = "tokio")]
    fn claim_async<'a>(
        &'a self,
        key: &'a [u8],
        expected: Option<&'a [u8]>,
        pending: Vec<u8>,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        std::future::ready(self.claim(key, expected, pending))
    }

    /// As [`Engine::finish`].
    #[cfg(feature = "tokio")]
    fn finish_async<'a>(
        &'a self,
        held: &'a Held<'a>,
        record: Option<Vec<u8>>,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        std::future::ready(self.finish(held, record))
    }

    /// As [`Engine::write_step`].
    #[cfg(feature = "tokio")]
    fn write_step_async<'a>(
        &'a self,
        held: &'a Held<'a>,
        index: u32,
        step: Vec<u8>,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        std::future::ready(self.write_step(held, index, step))
    }

    /// As [`Engine::steps`].
    #[cfg(feature = "tokio")]
    fn steps_async<'a>(
        &'a self,
        key: &'a [u8],
        life: ClaimToken,
    ) -> impl Future<Output = Result<Vec<(u32, Self::Bytes)>, Error>> + Send + 'a {
        std::future::ready(self.steps(key, life))
    }

    /// As [`Engine::remove_record`].
    #[cfg(feature = "tokio")]
    fn remove_record_async<'a>(
        &'a self,
        key: &'a [u8],
        expected: &'a [u8],
        steps_of: Option<ClaimToken>,
    ) -> impl Future<Output = Result<bool, Error>> + Send + 'a {
        std::future::ready(self.remove_record(key, expected, steps_of))
    }

    /// As [`Engine::holder_live`].
    #[cfg(feature = "tokio")]
    fn holder_live_async<'a>(
        &'a self,
        key: &'a [u8],
        claim: ClaimToken,
        running_here: bool,
    ) -> impl Future<Output = bool> + Send + 'a {
        std::future::ready(self.holder_live(key, claim, running_here))
    }

    /// As [`Engine::wait_for_holder`], without blocking a thread.
    #[cfg(feature = "tokio")]
    fn wait_for_holder_async<'a>(
        &'a self,
        _key: &'a [u8],
        _claim: ClaimToken,
        max: Duration,
    ) -> impl Future<Output = ()> + Send + 'a {
        tokio::time::sleep(max.min(HOLDER_POLL))
    }

    /// As [`Engine::fresh_epoch`].
    #[cfg(feature = "tokio")]
    fn fresh_epoch_async(
        &self,
        floor: u64,
    ) -> impl Future<Output = Result<u64, Error>> + Send + '_ {
        std::future::ready(self.fresh_epoch(floor))
    }

    /// Whether the next call should try to claim its key before reading it: an engine whose
    /// every write is durable when it returns, and whose round trips cost more than a write,
    /// answers a new key in one statement (a taken key is then read). An engine may
    /// change its answer between calls (PostgreSQL follows its traffic); each call asks once.
    fn claims_first(&self) -> bool {
        false
    }

    /// Whether a read is answered in place, without waiting on a device or a network (an
    /// embedded engine's cache): only such a read may be made from async code synchronously.
    #[cfg(feature = "tokio")]
    fn reads_in_place(&self) -> bool {
        true
    }

    /// A call's first read of its key found a record (`found`) or none: for an engine that
    /// chooses [`claims_first`](Engine::claims_first) by its traffic.
    fn note_first_look(&self, _found: bool) {}

    /// A recorded outcome of `key` this engine read or wrote recently and kept in its process
    /// (an engine with a replay cache): a call's first look may replay it without a round trip.
    /// The rules still decide on it; [`forget_cached`](Engine::forget_cached) when they would
    /// not replay it.
    fn cached(&self, _key: &[u8]) -> Option<std::sync::Arc<[u8]>> {
        None
    }

    /// `key`'s cached record no longer answers a first look.
    fn forget_cached(&self, _key: &[u8]) {}

    /// Claims `key` with `pending` if it has no record, else returns its record; `None` if
    /// neither could be decided (a record that appeared meanwhile: look again).
    fn claim_or_get(
        &self,
        key: &[u8],
        pending: Vec<u8>,
    ) -> Result<Option<ClaimOrGet<Self::Bytes>>, Error> {
        match self.get(key)? {
            Some(bytes) => Ok(Some(ClaimOrGet::Existing(bytes))),
            None => Ok(self
                .claim(key, None, pending)?
                .then_some(ClaimOrGet::Claimed)),
        }
    }

    /// As [`Engine::claim_or_get`].
    #[cfg(feature = "tokio")]
    fn claim_or_get_async<'a>(
        &'a self,
        key: &'a [u8],
        pending: Vec<u8>,
    ) -> impl Future<Output = Result<Option<ClaimOrGet<Self::Bytes>>, Error>> + Send + 'a {
        std::future::ready(self.claim_or_get(key, pending))
    }

    /// Whether another caller may read a write before it is durable (a write lands in memory,
    /// a later durability point makes it durable). Where it may, a replay of an outcome that a
    /// call of this process still makes durable waits for that call.
    fn visible_before_durable(&self) -> bool {
        true
    }

    /// Whether [`Engine::wait_durable`] may block on a device (the async driver then awaits
    /// [`Engine::wait_durable_async`], or runs it on the blocking pool).
    #[cfg(feature = "tokio")]
    fn durability_blocks(&self) -> bool {
        true
    }

    /// As [`Engine::wait_durable`], awaited without holding a runtime thread while another
    /// caller's flush covers this one; `None` when the engine has no such way (the driver then
    /// runs [`Engine::wait_durable`] on the blocking pool).
    #[cfg(feature = "tokio")]
    fn wait_durable_async(
        &self,
    ) -> Option<impl Future<Output = Result<(), Error>> + Send + 'static> {
        None::<std::future::Ready<Result<(), Error>>>
    }

    /// The holder of a running claim gave up without an outcome (its caller dropped the
    /// call): as [`Engine::abandon`], and an engine with leases ends the lease now, so the
    /// claim is an orphan at once rather than when the lease runs out.
    fn interrupted(&self, held: &Held<'_>) {
        self.abandon(held);
    }

    /// Removes up to `limit` records expired at `now_ms` whose holders are not live, with
    /// their steps, in one batch, if the engine does this itself; `None`: the sweeper goes
    /// through the expiry index and [`Engine::remove_record`].
    fn sweep_batch(&self, _now_ms: u64, _limit: usize) -> Option<Result<u64, Error>> {
        None
    }
}
