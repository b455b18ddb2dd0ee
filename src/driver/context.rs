//! What an operation sees while it runs: its key, attempt, claim token, and named steps.
//!
//! Invariants: the rules of steps are `step_run`'s; this is their synchronous I/O: a step is
//! recorded (durably, in `Immediate` mode) when it finishes, under the key's life and fenced
//! by the run's claim, before the step returns; the recorded steps are read once per run.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::{Duration, Instant};

use crate::core::settle::RunFailure;
use crate::driver::state::StoreState;
use crate::driver::step_run::StepRun;
use crate::engine::{Engine, Held};
use crate::error::Error;
use crate::format::codec::Codec;
use crate::format::record::ClaimToken;

/// The engine a context records steps in, as an object-safe trait (so `Context` needs no
/// engine parameter).
pub(crate) trait StepLog {
    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Vec<u8>)>, Error>;
    /// Records a step under the claim `held` (fenced); `OutcomeNotRecorded` or `LeaseLost` if
    /// the record is no longer the claim's.
    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<(), Error>;
    fn wait_durable(&self) -> Result<(), Error>;
}

impl<S: Engine> StepLog for StoreState<S> {
    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        // Recorded steps are replayed: they must be durable (see `StoreState`).
        self.durable_before_showing(false)?;
        Ok(self
            .engine
            .steps(key, life)?
            .into_iter()
            .map(|(i, b)| (i, b.as_ref().to_vec()))
            .collect())
    }
    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<(), Error> {
        match self.engine.write_step(held, index, step)? {
            true => Ok(()),
            false => Err(self.fenced_out(held)),
        }
    }
    fn wait_durable(&self) -> Result<(), Error> {
        StoreState::wait_durable(self)
    }
}

/// The error of one step: the step's own error, or the store's.
#[derive(Debug, thiserror::Error)]
pub enum StepError<E> {
    /// The step's closure returned this error; nothing was recorded for the step.
    #[error("step failed: {0}")]
    Failed(#[source] E),
    /// The store could not record or replay the step; the whole run fails with this error.
    #[error(transparent)]
    Store(#[from] Error),
}

/// What a [`Context`] knows of the claim it runs under.
pub(crate) struct RunClaim<'a> {
    pub held: Held<'a>,
    pub attempt: u32,
    pub codec: Codec,
    pub max_result_bytes: usize,
}

/// The run of one operation: passed to the closure of
/// [`Store::execute_steps`](crate::Store::execute_steps).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = idemstore::Store::open(dir.path().join("db"))?;
/// let out = store.execute_steps("checkout-91", |ctx| {
///     let charge_key = ctx.downstream_key("charge"); // send as the provider's idempotency key
///     let charge = ctx.step("charge", || Ok::<_, std::io::Error>(format!("ch for {charge_key}")))?;
///     ctx.step("confirm", || Ok::<_, std::io::Error>(()))?;
///     Ok::<_, idemstore::StepError<std::io::Error>>(charge)
/// })?;
/// assert!(out.starts_with("ch for "));
/// # Ok(()) }
/// ```
pub struct Context<'a> {
    log: &'a dyn StepLog,
    held: Held<'a>,
    run: StepRun,
}

impl<'a> Context<'a> {
    pub(crate) fn new(log: &'a dyn StepLog, claim: RunClaim<'a>) -> Self {
        Self {
            log,
            held: claim.held,
            run: StepRun::new(claim.attempt, claim.codec, claim.max_result_bytes),
        }
    }

    /// The idempotency key this run is for.
    pub fn key(&self) -> &[u8] {
        self.held.key
    }

    /// Which attempt this is (1 for the first run of the key).
    pub fn attempt(&self) -> u32 {
        self.run.attempt
    }

    /// This run's claim token: larger than the token of every earlier claim of this key's
    /// life (and, on the embedded engine, of any key, across restarts), so a downstream
    /// service that remembers the highest token it saw for the key can reject a stale attempt
    /// (fencing); see [`ClaimToken`].
    pub fn claim_token(&self) -> ClaimToken {
        self.held.token
    }

    /// A deterministic key for a downstream call made by step `step` (for example the
    /// Idempotency-Key to send to a payment provider): the same across every attempt of this
    /// key — in every life of it too, so after a removal or expiry a provider that still
    /// remembers the key deduplicates the call — and different for other steps and other
    /// keys. 64 hex digits.
    pub fn downstream_key(&self, step: &str) -> String {
        downstream_key(self.held.key, step)
    }

    /// Runs step `name` once per key: on a later attempt, a step that finished returns its
    /// recorded result without running. An `Err` from `f` records nothing (the step runs again
    /// on the next attempt); the operation may ignore it and go on with other steps.
    ///
    /// # Errors
    /// [`StepError::Failed`] with `f`'s error; [`StepError::Store`] with
    /// [`Error::StepSequenceChanged`] (this attempt's steps differ from the recorded ones),
    /// [`Error::InvalidStep`], [`Error::CorruptStep`], [`Error::Decode`],
    /// [`Error::ResultTooLarge`] / [`Error::ResultNotEncodable`] (the step ran; it will not
    /// run again, and neither will the operation), [`Error::OutcomeNotRecorded`] /
    /// [`Error::LeaseLost`] (the record was removed or taken over while the run went on) or
    /// [`Error::Storage`]. After a store error no further step runs: each returns the first
    /// store error.
    pub fn step<S, E, F>(&mut self, name: &str, f: F) -> Result<S, StepError<E>>
    where
        S: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<S, E>,
    {
        let index = self.begin(name)?;
        if let Some(value) = self.run.recorded_result(self.held.key, index, name)? {
            return Ok(value);
        }
        let value = f().map_err(StepError::Failed)?;
        self.record(name, index, &value)?;
        Ok(value)
    }

    /// As [`step`](Self::step), retrying `f` within this run while `is_transient` says its
    /// error is transient, as `policy` allows (exponential backoff with jitter, bounded in
    /// attempts and total time). The last error is returned when the policy gives up.
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn step_with_retry<S, E, F, R>(
        &mut self,
        name: &str,
        policy: &RetryPolicy,
        is_transient: R,
        mut f: F,
    ) -> Result<S, StepError<E>>
    where
        S: Serialize + DeserializeOwned,
        F: FnMut() -> Result<S, E>,
        R: Fn(&E) -> bool,
    {
        let index = self.begin(name)?;
        if let Some(value) = self.run.recorded_result(self.held.key, index, name)? {
            return Ok(value);
        }
        let started = Instant::now();
        let mut tries = 0u32;
        let value = loop {
            tries += 1;
            match f() {
                Ok(value) => break value,
                Err(e) if is_transient(&e) => {
                    match policy.delay_before(tries + 1, started.elapsed(), self.held.key) {
                        Some(delay) => std::thread::sleep(delay),
                        None => return Err(StepError::Failed(e)),
                    }
                }
                Err(e) => return Err(StepError::Failed(e)),
            }
        };
        self.record(name, index, &value)?;
        Ok(value)
    }

    /// Takes the store failure that failed this run, if any.
    pub(crate) fn take_failure(&mut self) -> Option<RunFailure> {
        self.run.take_failure()
    }

    /// Takes the next step index, with the recorded steps read (once per run).
    fn begin<E>(&mut self, name: &str) -> Result<u32, StepError<E>> {
        let index = self.run.begin(self.held.key, name)?;
        if self.run.needs_recorded() {
            let read = self.log.steps(self.held.key, self.held.life);
            self.run.load_recorded(read)?;
        }
        Ok(index)
    }

    /// Records a finished step durably, or that its outcome could not be stored.
    fn record<S: Serialize + DeserializeOwned, E>(
        &mut self,
        name: &str,
        index: u32,
        value: &S,
    ) -> Result<(), StepError<E>> {
        let (bytes, unstorable) = self.run.prepare(self.held.key, name, value).split();
        let written = self
            .log
            .write_step(&self.held, index, bytes)
            .and_then(|()| self.log.wait_durable());
        self.run.after_write(written, unstorable)
    }
}

/// The deterministic downstream key of `step` under `key`; see [`Context::downstream_key`].
pub(crate) fn downstream_key(key: &[u8], step: &str) -> String {
    let mut h = blake3::Hasher::new_derive_key("idemstore 2026-11 downstream call key v1");
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(step.as_bytes());
    h.finalize().to_hex().to_string()
}

/// Exponential backoff with full jitter, bounded in attempts and in total time.
///
/// ```
/// use idemstore::RetryPolicy;
/// use std::time::Duration;
/// let policy = RetryPolicy::new()
///     .max_attempts(5)
///     .initial_delay(Duration::from_millis(50))
///     .max_delay(Duration::from_secs(2))
///     .max_total(Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    max_delay: Duration,
    max_total: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// 3 attempts, 100 ms initial delay, 2 s cap per delay, 10 s in all.
    pub fn new() -> Self {
        Self {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_total: Duration::from_secs(10),
        }
    }

    /// Attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The delay cap before the second attempt; it doubles after each attempt.
    pub fn initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// The largest delay cap.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// No attempt starts after this much time has passed since the first.
    pub fn max_total(mut self, d: Duration) -> Self {
        self.max_total = d;
        self
    }

    /// The delay before attempt `attempt` (2 or more), or None if the policy gives up.
    /// Full jitter: uniform in `[0, min(max_delay, initial_delay * 2^(attempt-2))]`.
    pub(crate) fn delay_before(
        &self,
        attempt: u32,
        elapsed: Duration,
        seed: &[u8],
    ) -> Option<Duration> {
        if attempt > self.max_attempts {
            return None;
        }
        let cap = self
            .initial_delay
            .saturating_mul(1u32 << (attempt - 2).min(20))
            .min(self.max_delay);
        // RandomState is freshly seeded per instance: a cheap source of jitter.
        let random = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write(seed);
            h.write_u32(attempt);
            h.finish()
        };
        let delay = cap.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64);
        (elapsed + delay <= self.max_total).then_some(delay)
    }
}
