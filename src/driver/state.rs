//! The state a store's drivers share: the engine, the registry of running calls, the clock,
//! the counters, the settings and the claim counter.
//!
//! Invariants: claim tokens are `(epoch, sequence)` with the epoch bumped durably by every
//! open before any claim and the sequence taken from one atomic counter, so tokens are unique.
//! A claim over a record gets a token larger than the record's: when this open's epoch is not
//! above it (another process sharing the engine opened later), the engine hands out a fresh
//! epoch first, so each key's tokens grow with every claim, across processes and restarts. Every durability point of
//! the drivers goes through [`StoreState::wait_durable`]: once one has failed, a record read
//! from the engine may be one that never became durable, so every replay (of an outcome or a
//! step) first makes a durability point of its own, and fails rather than return it if that
//! fails too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::clock::Clock;
use crate::core::options::Settings;
use crate::driver::registry::Registry;
use crate::engine::{Engine, Held};
use crate::error::{Error, StorageError};
use crate::format::record::{self, ClaimToken};
use crate::key::KeyName;
use crate::stats::Counters;

/// What every call and background thread of one store shares.
pub(crate) struct StoreState<S> {
    pub engine: S,
    pub registry: Registry,
    pub clock: Arc<dyn Clock>,
    pub counters: Arc<Counters>,
    pub settings: Settings,
    /// This open's epoch (persisted; grows on every open, and when a claim needs a larger one).
    pub epoch: AtomicU64,
    /// The last claim sequence number handed out in this epoch.
    pub last_claim: AtomicU64,
    /// A durability point has failed since the store opened.
    pub durability_failed: AtomicBool,
    /// Work dropped async calls left to tasks, not yet done.
    pub left_behind: LeftBehind,
}

/// A count of the work dropped async calls left to tasks (their last write and durability
/// point): closing the store waits until none is pending, so the store lets go of its engine
/// (and sled its files) only once that work is done, as when a drop did it in place.
#[derive(Default)]
pub(crate) struct LeftBehind {
    pending: parking_lot::Mutex<usize>,
    done: parking_lot::Condvar,
}

impl LeftBehind {
    /// One more piece of work is pending.
    pub(crate) fn enter(&self) {
        *self.pending.lock() += 1;
    }

    /// One piece of work is done.
    pub(crate) fn exit(&self) {
        let mut pending = self.pending.lock();
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.done.notify_all();
        }
    }

    /// Blocks until no work is pending, or `limit` has passed (false then): the work may wait
    /// for a thread of a blocking pool that the caller itself holds.
    pub(crate) fn wait_none(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut pending = self.pending.lock();
        while *pending > 0 {
            if self.done.wait_until(&mut pending, deadline).timed_out() {
                return *pending == 0;
            }
        }
        true
    }
}

impl<S> AsRef<Registry> for StoreState<S> {
    fn as_ref(&self) -> &Registry {
        &self.registry
    }
}

impl<S: Engine> StoreState<S> {
    /// Returns once every write applied before the call is durable (per the mode); remembers
    /// a failure.
    pub(crate) fn wait_durable(&self) -> Result<(), Error> {
        let synced = crate::stats::timed_durable_point(|| self.engine.wait_durable());
        if synced.is_err() {
            self.durability_failed.store(true, Ordering::SeqCst);
        }
        synced
    }

    /// As [`StoreState::wait_durable`], awaiting the engine's `waiting` durability point.
    #[cfg(feature = "tokio")]
    pub(crate) async fn waited_durable(
        &self,
        waiting: impl std::future::Future<Output = Result<(), Error>>,
    ) -> Result<(), Error> {
        let synced = crate::stats::timed_durable_point_async(waiting).await;
        if synced.is_err() {
            self.durability_failed.store(true, Ordering::SeqCst);
        }
        synced
    }

    /// Whether showing a stored record to a caller (a replay, an inspection, an `Interrupted`)
    /// needs a durability point first, so that what is shown survives a crash: after a failed
    /// one; and for a Pending record in `Immediate` mode, whose claim may not be durable on its
    /// own (design §6: only claims under `Report` are).
    pub(crate) fn sync_before_showing(&self, pending: bool) -> bool {
        self.durability_failed.load(Ordering::SeqCst) || (pending && self.settings.immediate)
    }

    /// Makes the durability point [`sync_before_showing`](Self::sync_before_showing) asks for,
    /// if it does (or the caller gets the error). Call it after reading what is shown.
    pub(crate) fn durable_before_showing(&self, pending: bool) -> Result<(), Error> {
        match self.sync_before_showing(pending) {
            true => self.wait_durable(),
            false => Ok(()),
        }
    }

    /// The error for a holder write that fencing refused: [`Error::LeaseLost`] if another
    /// claim took the key over in the holder's life, else [`Error::OutcomeNotRecorded`] (the
    /// record was removed, or replaced by a new life).
    pub(crate) fn fenced_out(&self, held: &Held<'_>) -> Error {
        let current = self.engine.get(held.key).ok().flatten();
        self.fenced_out_given(held, current.as_ref().map(AsRef::as_ref))
    }

    /// As [`fenced_out`](Self::fenced_out), given the key's record as read after the refusal.
    pub(crate) fn fenced_out_given(&self, held: &Held<'_>, current: Option<&[u8]>) -> Error {
        let key = KeyName::new(held.key);
        let taken_over = current.is_some_and(|bytes| {
            record::decode(bytes)
                .is_ok_and(|r| r.header.life == held.life && r.header.claim != held.token)
        });
        match taken_over {
            true => Error::LeaseLost { key },
            false => Error::OutcomeNotRecorded { key },
        }
    }

    /// A claim token no other claim has had, larger than `above` (the token of the record the
    /// claim replaces, if any).
    ///
    /// # Errors
    /// [`Error::Storage`] if a fresh epoch was needed and the engine could not give one.
    pub(crate) fn next_claim_token(&self, above: Option<ClaimToken>) -> Result<ClaimToken, Error> {
        self.next_claim_token_from(above, |floor| self.engine.fresh_epoch(floor))
    }

    /// The epoch a fresh one must exceed for a claim that replaces `above`, if this open's
    /// own epoch cannot give a token larger than it (`above` came from another process, or
    /// was moved in by an import).
    #[cfg(feature = "tokio")]
    pub(crate) fn epoch_floor(&self, above: Option<ClaimToken>) -> Option<u64> {
        let next = ClaimToken {
            epoch: self.epoch.load(Ordering::SeqCst),
            sequence: self.last_claim.load(Ordering::Relaxed) + 1,
        };
        floor_for(next, above)
    }

    /// As [`next_claim_token`](Self::next_claim_token), with the fresh epoch (if one is
    /// needed) from `fresh_epoch(floor)`, an epoch above `floor` (from a transaction's own
    /// connection, say).
    pub(crate) fn next_claim_token_from(
        &self,
        above: Option<ClaimToken>,
        fresh_epoch: impl FnOnce(u64) -> Result<u64, Error>,
    ) -> Result<ClaimToken, Error> {
        let sequence = self.last_claim.fetch_add(1, Ordering::Relaxed) + 1;
        let mut token = ClaimToken {
            epoch: self.epoch.load(Ordering::SeqCst),
            sequence,
        };
        if let Some(floor) = floor_for(token, above) {
            token.epoch = fresh_epoch(floor)?;
            if token.epoch <= floor {
                return Err(Error::Storage(StorageError::new(
                    std::io::Error::other("the engine gave an epoch below the one asked for"),
                    None,
                )));
            }
            self.epoch.fetch_max(token.epoch, Ordering::SeqCst);
        }
        Ok(token)
    }

    /// Whether a call still runs `key`, whose record has header `h`: a call of this store, or
    /// a live holder elsewhere. What removals that act on expiry (the sweeper, an import over
    /// an expired record) leave alone, even past the record's expiry.
    pub(crate) fn call_still_runs(&self, key: &[u8], h: &record::Header) -> bool {
        self.registry.running(key).is_some()
            || (h.state == record::RecordState::Pending
                && self.engine.holder_live(key, h.claim, false))
    }

    /// Raises this open's epoch above `floor` (records moved in carry epochs up to it), so
    /// every later claim's token is larger than theirs.
    pub(crate) fn raise_epoch_above(&self, floor: u64) -> Result<(), Error> {
        if self.epoch.load(Ordering::SeqCst) > floor {
            return Ok(());
        }
        let epoch = self.engine.fresh_epoch(floor)?;
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }
}

impl<S> StoreState<S> {
    pub(crate) fn check_key(&self, key: &[u8]) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.settings.max_key_bytes {
            return Err(Error::KeyTooLong {
                len: key.len(),
                limit: self.settings.max_key_bytes,
            });
        }
        Ok(())
    }
}

/// The epoch a fresh one must exceed when `next` would not be above `above`, the token of the
/// record a claim replaces. Usually `above` is this open's own (same epoch, smaller sequence)
/// or an earlier open's; a token from another process or an import may be larger.
fn floor_for(next: ClaimToken, above: Option<ClaimToken>) -> Option<u64> {
    let above = above?;
    (next <= above).then_some(above.epoch)
}
