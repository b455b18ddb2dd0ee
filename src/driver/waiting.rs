//! One call's waiting budget, shared by every wait it makes.
//!
//! Invariants: a call waits at most its wait timeout in all (the budget starts at its first
//! wait and is counted once in the stats); past it, the call gets `InProgress`. Waiting for a
//! call of this store blocks on that call's condition variable (no polling); waiting for a
//! holder elsewhere (a shared engine's live lease) waits on the engine in short steps within
//! the budget, looking at the record again after each.

// Futures are returned as `impl Future + Send` on purpose: declared `Send` where every
// lifetime is concrete, they stay provably `Send` inside the callers' futures (an `async fn`'s
// would be re-proven there, which the compiler cannot do across its generic lifetimes).
#![allow(clippy::manual_async_fn)]

use std::time::{Duration, Instant};

use crate::core::options::CallOptions;
use crate::driver::registry::RunningCall;
use crate::driver::state::StoreState;
use crate::engine::Engine;
use crate::error::Error;
use crate::format::record::ClaimToken;
use crate::key::KeyName;
use crate::stats::Counters;

/// One call's waiting budget.
pub(crate) struct Waiting<'a, S> {
    state: &'a StoreState<S>,
    timeout: Duration,
    /// Set at the first wait: None inside means no deadline (an unrepresentable timeout).
    deadline: Option<Option<Instant>>,
}

impl<'a, S> Waiting<'a, S> {
    pub(crate) fn new(state: &'a StoreState<S>, options: &CallOptions) -> Self {
        Self {
            state,
            timeout: options.wait_timeout.unwrap_or(state.settings.wait_timeout),
            deadline: None,
        }
    }

    fn deadline(&mut self) -> Option<Instant> {
        *self.deadline.get_or_insert_with(|| {
            Counters::bump(&self.state.counters.waits);
            Instant::now().checked_add(self.timeout)
        })
    }

    fn in_progress(&self, key: &[u8]) -> Error {
        Counters::bump(&self.state.counters.in_progress_rejections);
        Error::InProgress {
            key: KeyName::new(key),
            waited: self.timeout,
        }
    }

    /// Waits for the running call (with `until_claimed`, only until its claim is written);
    /// `InProgress` once this call's budget is spent.
    pub(crate) fn wait(
        &mut self,
        key: &[u8],
        call: &RunningCall,
        until_claimed: bool,
    ) -> Result<(), Error> {
        let deadline = self.deadline();
        match call.wait_until(deadline, until_claimed) {
            true => Ok(()),
            false => Err(self.in_progress(key)),
        }
    }

    /// As [`Waiting::wait`], without blocking a thread.
    #[cfg(feature = "tokio")]
    pub(crate) fn wait_async<'w>(
        &'w mut self,
        key: &'w [u8],
        call: &'w RunningCall,
        until_claimed: bool,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + use<'w, 'a, S>
    where
        S: Engine,
    {
        async move {
            let deadline = self.deadline();
            match call.wait_until_async(deadline, until_claimed).await {
                true => Ok(()),
                false => Err(self.in_progress(key)),
            }
        }
    }

    /// As [`Waiting::wait_for_holder`], without blocking a thread.
    #[cfg(feature = "tokio")]
    pub(crate) fn wait_for_holder_async<'w>(
        &'w mut self,
        key: &'w [u8],
        claim: ClaimToken,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + use<'w, 'a, S>
    where
        S: Engine,
    {
        async move {
            let left = self.left(key)?;
            self.state
                .engine
                .wait_for_holder_async(key, claim, left)
                .await;
            Ok(())
        }
    }

    /// What is left of the budget; `InProgress` once it is spent.
    fn left(&mut self, key: &[u8]) -> Result<Duration, Error> {
        match self.deadline() {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(left),
                _ => Err(self.in_progress(key)),
            },
            None => Ok(Duration::MAX),
        }
    }

    /// Waits a little for `key`'s holder `claim` elsewhere; `InProgress` once the budget is
    /// spent.
    pub(crate) fn wait_for_holder(&mut self, key: &[u8], claim: ClaimToken) -> Result<(), Error>
    where
        S: Engine,
    {
        let left = self.left(key)?;
        self.state.engine.wait_for_holder(key, claim, left);
        Ok(())
    }
}
