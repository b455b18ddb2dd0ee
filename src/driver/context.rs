//! What an operation sees while it runs: its key, attempt, claim token, and named steps.
//!
//! Invariants:
//! - steps are numbered in the order a run asks for them, and a recorded step is found by its
//!   own index (never by its position among the recorded ones), so a step whose error the
//!   operation ignored leaves no gap that shifts later steps;
//! - step `i` is recorded (durably, in `Immediate` mode) when it finishes, under the key's
//!   life and fenced by the run's claim: if the record is no longer this claim's Pending
//!   record (removed, taken over), the step is taken back and the run fails;
//! - a later attempt of the same life gets step `i`'s recorded outcome back only if it asks
//!   for step `i` by the same name; otherwise the run fails with `StepSequenceChanged`;
//! - a step that ran but whose result cannot be stored is recorded as such, so it never runs
//!   again, and the run ends with that error (recorded, so the operation does not run again);
//! - after a store error in any step, no further step runs: each returns that error, and the
//!   run fails with it whatever the operation returns.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::core::settle::RunFailure;
use crate::driver::state::StoreState;
use crate::engine::{Engine, Held};
use crate::error::Error;
use crate::format::codec::{self, Codec};
use crate::format::record::{ClaimToken, OutcomeKind};
use crate::format::step::{self, StepRecord};
use crate::format::unstorable;
use crate::key::KeyName;

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
        self.durable_before_replay()?;
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
    claim: RunClaim<'a>,
    recorded: Option<Vec<(u32, Vec<u8>)>>,
    next_index: u32,
    names: HashSet<String>,
    failure: Option<RunFailure>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(log: &'a dyn StepLog, claim: RunClaim<'a>) -> Self {
        Self {
            log,
            claim,
            recorded: None,
            next_index: 0,
            names: HashSet::new(),
            failure: None,
        }
    }

    /// The idempotency key this run is for.
    pub fn key(&self) -> &[u8] {
        self.claim.held.key
    }

    /// Which attempt this is (1 for the first run of the key).
    pub fn attempt(&self) -> u32 {
        self.claim.attempt
    }

    /// This run's claim token: it grows with every claim of any key, across restarts, so a
    /// downstream service that remembers the highest token it saw can reject a stale attempt
    /// (fencing).
    pub fn claim_token(&self) -> ClaimToken {
        self.claim.held.token
    }

    /// A deterministic key for a downstream call made by step `step` (for example the
    /// Idempotency-Key to send to a payment provider): the same across every attempt of this
    /// key — in every life of it too, so after a removal or expiry a provider that still
    /// remembers the key deduplicates the call — and different for other steps and other
    /// keys. 64 hex digits.
    pub fn downstream_key(&self, step: &str) -> String {
        downstream_key(self.claim.held.key, step)
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
    /// run again, and neither will the operation), [`Error::OutcomeNotRecorded`] (the record
    /// was removed or taken over while the run went on) or [`Error::Storage`]. After a store
    /// error no further step runs: each returns the first store error.
    pub fn step<S, E, F>(&mut self, name: &str, f: F) -> Result<S, StepError<E>>
    where
        S: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<S, E>,
    {
        let index = self.begin(name)?;
        if let Some(value) = self.recorded_result(index, name)? {
            return Ok(value);
        }
        let value = f().map_err(StepError::Failed)?;
        self.record(index, name, &value)?;
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
        if let Some(value) = self.recorded_result(index, name)? {
            return Ok(value);
        }
        let started = Instant::now();
        let mut tries = 0u32;
        let value = loop {
            tries += 1;
            match f() {
                Ok(value) => break value,
                Err(e) if is_transient(&e) => {
                    match policy.delay_before(tries + 1, started.elapsed(), self.claim.held.key) {
                        Some(delay) => std::thread::sleep(delay),
                        None => return Err(StepError::Failed(e)),
                    }
                }
                Err(e) => return Err(StepError::Failed(e)),
            }
        };
        self.record(index, name, &value)?;
        Ok(value)
    }

    /// Takes the store failure that failed this run, if any.
    pub(crate) fn take_failure(&mut self) -> Option<RunFailure> {
        self.failure.take()
    }

    /// Fails the run with `error` (the first failure wins) and returns the step's error.
    fn fail<E>(&mut self, error: Error, terminal: Option<(OutcomeKind, Vec<u8>)>) -> StepError<E> {
        self.fail_with(RunFailure {
            error,
            terminal,
            in_doubt: false,
        })
    }

    fn fail_with<E>(&mut self, failure: RunFailure) -> StepError<E> {
        let failure = self.failure.get_or_insert(failure);
        StepError::Store(failure.error.clone())
    }

    /// Checks that the run may go on and the name is usable; takes the next step index.
    fn begin<E>(&mut self, name: &str) -> Result<u32, StepError<E>> {
        if let Some(failure) = &self.failure {
            return Err(StepError::Store(failure.error.clone()));
        }
        if name.is_empty() || name.len() > step::MAX_NAME || !self.names.insert(name.to_owned()) {
            let error = Error::InvalidStep {
                key: KeyName::new(self.claim.held.key),
                name: name.to_owned(),
            };
            return Err(self.fail(error, None));
        }
        let index = self.next_index;
        self.next_index += 1;
        Ok(index)
    }

    /// The recorded result of step `index`, if an earlier attempt of this life finished it.
    fn recorded_result<S: Serialize + DeserializeOwned, E>(
        &mut self,
        index: u32,
        name: &str,
    ) -> Result<Option<S>, StepError<E>> {
        if self.recorded.is_none() {
            match self.log.steps(self.claim.held.key, self.claim.held.life) {
                Ok(steps) => self.recorded = Some(steps),
                Err(e) => return Err(self.fail(e, None)),
            }
        }
        let key = || KeyName::new(self.claim.held.key);
        let recorded = self.recorded.as_deref().unwrap_or_default();
        let Ok(at) = recorded.binary_search_by_key(&index, |(i, _)| *i) else {
            return Ok(None);
        };
        let (error, terminal) = match step::decode(&recorded[at].1) {
            Err(reason) => (
                Error::CorruptStep {
                    key: key(),
                    index,
                    reason,
                },
                None,
            ),
            Ok(step) if step.name != name => (
                Error::StepSequenceChanged {
                    key: key(),
                    index,
                    recorded: step.name.to_owned(),
                    requested: name.to_owned(),
                },
                None,
            ),
            Ok(step) => match unstorable::replay(self.claim.held.key, step.outcome, step.payload) {
                Some(error) => (error, Some((step.outcome, step.payload.to_vec()))),
                None => match codec::decode::<S>(step.payload, step.codec, step.shape) {
                    Ok(value) => return Ok(Some(value)),
                    Err(message) => (
                        Error::Decode {
                            key: key(),
                            what: "step result",
                            message,
                        },
                        None,
                    ),
                },
            },
        };
        Err(self.fail(error, terminal))
    }

    /// Records a finished step durably, or that its outcome could not be stored.
    fn record<S: Serialize + DeserializeOwned, E>(
        &mut self,
        index: u32,
        name: &str,
        value: &S,
    ) -> Result<(), StepError<E>> {
        let limit = self.claim.max_result_bytes;
        let (encoded, unstorable) = match codec::encode(value, self.claim.codec, limit) {
            Ok(e) => (e, None),
            Err(failure) => {
                let (kind, payload, error) =
                    unstorable::record(self.claim.held.key, failure, limit);
                let note = codec::Encoded {
                    bytes: payload,
                    codec: self.claim.codec,
                    shape: 0,
                };
                (note, Some((kind, error)))
            }
        };
        let outcome = unstorable.as_ref().map_or(OutcomeKind::Stored, |(k, _)| *k);
        let bytes = step::encode(&StepRecord {
            name,
            outcome,
            codec: encoded.codec,
            shape: Some(encoded.shape).filter(|s| *s != 0),
            payload: &encoded.bytes,
        });
        let written = self
            .log
            .write_step(&self.claim.held, index, bytes)
            .and_then(|()| self.log.wait_durable());
        match (written, unstorable) {
            // Refused by fencing: the record is no longer this claim's, nothing to leave.
            (Err(e @ (Error::OutcomeNotRecorded { .. } | Error::LeaseLost { .. })), _) => {
                Err(self.fail(e, None))
            }
            // The step ran; whether its record is stored is unknown.
            (Err(e), _) => Err(self.fail_with(RunFailure {
                error: e,
                terminal: None,
                in_doubt: true,
            })),
            (Ok(()), Some((kind, error))) => Err(self.fail(error, Some((kind, encoded.bytes)))),
            (Ok(()), None) => Ok(()),
        }
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
