//! The state a store's drivers share: the engine, the registry of running calls, the clock,
//! the counters, the settings and the claim counter.
//!
//! Invariants: claim tokens are `(epoch, sequence)` with the epoch bumped durably by every
//! open before any claim and the sequence taken from one atomic counter, so every claim of any
//! key gets a token larger than every earlier one, across restarts. Every durability point of
//! the drivers goes through [`StoreState::wait_durable`]: once one has failed, a record read
//! from the engine may be one that never became durable, so every replay (of an outcome or a
//! step) first makes a durability point of its own, and fails rather than return it if that
//! fails too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::clock::Clock;
use crate::core::options::Settings;
use crate::driver::registry::Registry;
use crate::engine::Engine;
use crate::error::Error;
use crate::format::record::ClaimToken;
use crate::stats::Counters;

/// What every call and background thread of one store shares.
pub(crate) struct StoreState<S> {
    pub engine: S,
    pub registry: Registry,
    pub clock: Arc<dyn Clock>,
    pub counters: Arc<Counters>,
    pub settings: Settings,
    /// This open's epoch (persisted; grows on every open).
    pub epoch: u64,
    /// The last claim sequence number handed out in this epoch.
    pub last_claim: AtomicU64,
    /// A durability point has failed since the store opened.
    pub durability_failed: AtomicBool,
}

impl<S: Engine> StoreState<S> {
    /// Returns once every write applied before the call is durable (per the mode); remembers
    /// a failure.
    pub(crate) fn wait_durable(&self) -> Result<(), Error> {
        let synced = self.engine.wait_durable();
        if synced.is_err() {
            self.durability_failed.store(true, Ordering::SeqCst);
        }
        synced
    }

    /// Before returning a stored record to a caller: if a durability point has failed, makes
    /// one now, so what is returned is durable (or the caller gets the error).
    pub(crate) fn durable_before_replay(&self) -> Result<(), Error> {
        match self.durability_failed.load(Ordering::SeqCst) {
            true => self.engine.wait_durable(),
            false => Ok(()),
        }
    }
}

impl<S> StoreState<S> {
    /// A claim token no earlier claim of any key has had.
    pub(crate) fn next_claim_token(&self) -> ClaimToken {
        ClaimToken {
            epoch: self.epoch,
            sequence: self.last_claim.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

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
