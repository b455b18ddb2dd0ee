//! What an async operation sees while it runs: the async counterpart of [`Context`](crate::Context).
//!
//! Invariants: the rules of steps are `step_run`'s, as for the sync context; a step is
//! recorded (durably, in `Immediate` mode) before its `step` future completes, and no lock is
//! held across an `.await`. The context is a cheap handle (clones share the run); a clone kept
//! past the run is refused before its step runs (`OutcomeNotRecorded`): the run's claim is no
//! longer its to use.

// Futures are returned as `impl Future + Send` on purpose: declared `Send` where every
// lifetime is concrete, they stay provably `Send` inside the callers' futures (an `async fn`'s
// would be re-proven there, which the compiler cannot do across its generic lifetimes).
#![allow(clippy::manual_async_fn)]

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::core::settle::RunFailure;
use crate::driver::context::{downstream_key, StepError};
use crate::driver::state::StoreState;
use crate::driver::step_run::StepRun;
use crate::engine::{Engine, Held};
use crate::error::Error;
use crate::format::codec::Codec;
use crate::format::record::ClaimToken;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Recorded steps as read: (index, bytes), in index order.
type StepsRead = Result<Vec<(u32, Vec<u8>)>, Error>;

/// The engine an async context records steps in, as an object-safe trait (so the context
/// needs no engine parameter).
pub(crate) trait AsyncStepLog: Send + Sync {
    fn steps<'a>(&'a self, key: &'a [u8], life: ClaimToken) -> BoxFuture<'a, StepsRead>;
    /// Records a step under the claim `held` (fenced) and waits for it to be durable.
    fn write_step<'a>(
        &'a self,
        held: &'a Held<'a>,
        index: u32,
        step: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

/// One store's async step log.
pub(crate) struct StoreLog<S>(pub Arc<StoreState<S>>);

impl<S: Engine> AsyncStepLog for StoreLog<S> {
    fn steps<'a>(&'a self, key: &'a [u8], life: ClaimToken) -> BoxFuture<'a, StepsRead> {
        Box::pin(async move {
            // Recorded steps are replayed: they must be durable (see `StoreState`).
            self.0.durable_before_showing(false)?;
            Ok(self
                .0
                .engine
                .steps_async(key, life)
                .await?
                .into_iter()
                .map(|(i, b)| (i, b.as_ref().to_vec()))
                .collect())
        })
    }

    fn write_step<'a>(
        &'a self,
        held: &'a Held<'a>,
        index: u32,
        step: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !self.0.engine.write_step_async(held, index, step).await? {
                return Err(fenced_out_async(&self.0, held).await);
            }
            durable_async(&self.0).await
        })
    }
}

/// As [`StoreState::fenced_out`], without blocking a thread.
pub(crate) fn fenced_out_async<'a, S: Engine>(
    state: &'a StoreState<S>,
    held: &'a Held<'a>,
) -> impl Future<Output = Error> + Send + 'a {
    async move {
        let current = state.engine.get_async(held.key).await.ok().flatten();
        state.fenced_out_given(held, current.as_ref().map(AsRef::as_ref))
    }
}

/// As [`StoreState::wait_durable`], without blocking a runtime worker: an engine whose
/// durability point waits on a device is awaited ([`Engine::wait_durable_async`]) or, without
/// that, waited for on the blocking pool.
pub(crate) fn durable_async<S: Engine>(
    state: &Arc<StoreState<S>>,
) -> impl Future<Output = Result<(), Error>> + Send + 'static {
    let state = Arc::clone(state);
    async move {
        if !state.engine.durability_blocks() {
            return state.wait_durable();
        }
        if let Some(waiting) = state.engine.wait_durable_async() {
            return state.waited_durable(waiting).await;
        }
        match tokio::task::spawn_blocking(move || state.wait_durable()).await {
            Ok(done) => done,
            // The closure does not panic, and the runtime is running (this future is polled).
            Err(e) => Err(Error::Storage(crate::error::StorageError::new(
                std::io::Error::other(e.to_string()),
                None,
            ))),
        }
    }
}

struct AsyncRun {
    log: Arc<dyn AsyncStepLog>,
    key: Vec<u8>,
    /// The claim's exact Pending record.
    record: Vec<u8>,
    token: ClaimToken,
    life: ClaimToken,
    run: Mutex<StepRun>,
    /// The run is over: a step asked for now is refused before it runs.
    ended: std::sync::atomic::AtomicBool,
}

/// The run of one async operation: passed to the closure of
/// [`Store::execute_steps_async`](crate::Store::execute_steps_async). Clones share the run.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use idemstore::{StepError, Store};
/// let store = Store::open(dir.path().join("db"))?;
/// let out = store
///     .execute_steps_async("checkout-91", |ctx| async move {
///         let charge = ctx.step("charge", || async { Ok::<_, std::io::Error>(4200u64) }).await?;
///         ctx.step("confirm", || async { Ok::<_, std::io::Error>(()) }).await?;
///         Ok::<_, StepError<std::io::Error>>(charge)
///     })
///     .await?;
/// assert_eq!(*out, 4200);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncContext {
    inner: Arc<AsyncRun>,
}

impl std::fmt::Debug for AsyncContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncContext")
            .field("attempt", &self.attempt())
            .field("claim_token", &self.inner.token)
            .finish_non_exhaustive()
    }
}

/// What an async context knows of the claim it runs under.
pub(crate) struct AsyncClaim<'a> {
    pub held: Held<'a>,
    pub attempt: u32,
    pub codec: Codec,
    pub max_result_bytes: usize,
}

impl AsyncContext {
    pub(crate) fn new(log: Arc<dyn AsyncStepLog>, claim: AsyncClaim<'_>) -> Self {
        Self {
            inner: Arc::new(AsyncRun {
                log,
                key: claim.held.key.to_vec(),
                record: claim.held.record.to_vec(),
                token: claim.held.token,
                life: claim.held.life,
                run: Mutex::new(StepRun::new(
                    claim.attempt,
                    claim.codec,
                    claim.max_result_bytes,
                )),
                ended: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    fn held(&self) -> Held<'_> {
        Held {
            key: &self.inner.key,
            record: &self.inner.record,
            token: self.inner.token,
            life: self.inner.life,
        }
    }

    /// The idempotency key this run is for.
    pub fn key(&self) -> &[u8] {
        &self.inner.key
    }

    /// Which attempt this is (1 for the first run of the key).
    pub fn attempt(&self) -> u32 {
        self.inner.run.lock().attempt
    }

    /// This run's claim token; see [`Context::claim_token`](crate::Context::claim_token).
    pub fn claim_token(&self) -> ClaimToken {
        self.inner.token
    }

    /// A deterministic key for a downstream call made by step `step`; see
    /// [`Context::downstream_key`](crate::Context::downstream_key).
    pub fn downstream_key(&self, step: &str) -> String {
        downstream_key(&self.inner.key, step)
    }

    /// Runs step `name` once per key, as [`Context::step`](crate::Context::step) does, with
    /// an async step.
    ///
    /// # Errors
    /// As [`Context::step`](crate::Context::step).
    pub async fn step<V, E, F, Fut>(&self, name: &str, f: F) -> Result<V, StepError<E>>
    where
        V: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let key = self.key();
        if self.inner.ended.load(std::sync::atomic::Ordering::SeqCst) {
            // A clone kept past its run: its claim is no longer this run's to use.
            return Err(StepError::Store(Error::OutcomeNotRecorded {
                key: crate::key::KeyName::new(key),
            }));
        }
        let (index, read) = {
            let mut run = self.inner.run.lock();
            (run.begin(key, name)?, run.needs_recorded())
        };
        if read {
            let steps = self.inner.log.steps(key, self.inner.life).await;
            self.inner.run.lock().load_recorded(steps)?;
        }
        let recorded = self.inner.run.lock().recorded_result(key, index, name)?;
        if let Some(value) = recorded {
            return Ok(value);
        }
        let value = f().await.map_err(StepError::Failed)?;
        let (bytes, unstorable) = self.inner.run.lock().prepare(key, name, &value).split();
        let held = self.held();
        let written = self.inner.log.write_step(&held, index, bytes).await;
        self.inner.run.lock().after_write(written, unstorable)?;
        Ok(value)
    }

    /// A guard that marks the run ended when dropped.
    pub(crate) fn ender(&self) -> RunEnder {
        RunEnder(Arc::clone(&self.inner))
    }

    /// Takes the store failure that failed this run, if any.
    pub(crate) fn take_failure(&self) -> Option<RunFailure> {
        self.inner.run.lock().take_failure()
    }
}

/// Marks its run ended when dropped (when the run returns, or its call's future is dropped).
pub(crate) struct RunEnder(Arc<AsyncRun>);

impl Drop for RunEnder {
    fn drop(&mut self) {
        self.0
            .ended
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
