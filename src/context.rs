//! What an operation sees while it runs: its key, attempt, claim token, and named steps.
//!
//! Invariants: steps are numbered in the order a run asks for them; step `i` is recorded
//! (durably, in `Immediate` mode) when it finishes, under the parent key's claim, and a later
//! attempt gets the recorded outcome of step `i` back only if it asks for step `i` by the same
//! name; otherwise the run fails with `StepSequenceChanged` and nothing more runs. A store
//! error in any step fails the whole run with that error, even if the operation ignored it.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::codec::{self, EncodeFailure};
use crate::storage::Storage;
use crate::{step, ClaimToken, Error, KeyName};

/// The storage a context needs, as an object-safe trait.
pub(crate) trait StepLog {
    fn steps(&self, key: &[u8]) -> Result<Vec<Vec<u8>>, Error>;
    fn put_step(&self, key: &[u8], index: u32, step: Vec<u8>) -> Result<(), Error>;
    fn barrier(&self) -> Result<(), Error>;
}

impl<S: Storage> StepLog for S {
    fn steps(&self, key: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        Ok(Storage::steps(self, key)?
            .into_iter()
            .map(|b| b.as_ref().to_vec())
            .collect())
    }
    fn put_step(&self, key: &[u8], index: u32, step: Vec<u8>) -> Result<(), Error> {
        Storage::put_step(self, key, index, step)
    }
    fn barrier(&self) -> Result<(), Error> {
        Storage::barrier(self)
    }
}

/// The error of one step: the step's own error, or the store's.
#[derive(Debug, thiserror::Error)]
pub enum StepError<E> {
    /// The step's closure returned this error; nothing was recorded for the step.
    #[error("step failed")]
    Failed(#[source] E),
    /// The store could not record or replay the step; the whole run fails with this error.
    #[error(transparent)]
    Store(#[from] Error),
}

/// The run of one operation: passed to the closure of
/// [`Store::execute_once_with`](crate::Store::execute_once_with).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = idemstore::Store::open(dir.path().join("db"))?;
/// let out = store.execute_once_with("checkout-91", |ctx| {
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
    key: &'a [u8],
    attempt: u32,
    claim: ClaimToken,
    max_result_bytes: usize,
    recorded: Option<Vec<Vec<u8>>>,
    next_index: u32,
    names: HashSet<String>,
    failure: Option<Error>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        log: &'a dyn StepLog,
        key: &'a [u8],
        attempt: u32,
        claim: ClaimToken,
        max_result_bytes: usize,
    ) -> Self {
        Self {
            log,
            key,
            attempt,
            claim,
            max_result_bytes,
            recorded: None,
            next_index: 0,
            names: HashSet::new(),
            failure: None,
        }
    }

    /// The idempotency key this run is for.
    pub fn key(&self) -> &[u8] {
        self.key
    }

    /// Which attempt this is (1 for the first run of the key).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// This run's claim token: it grows with every claim of any key, across restarts, so a
    /// downstream service that remembers the highest token it saw can reject a stale attempt
    /// (fencing).
    pub fn claim_token(&self) -> ClaimToken {
        self.claim
    }

    /// A deterministic key for a downstream call made by step `step` (for example the
    /// Idempotency-Key to send to a payment provider): the same across every attempt of this
    /// key, different for other steps and other keys. 64 hex digits.
    pub fn downstream_key(&self, step: &str) -> String {
        downstream_key(self.key, step)
    }

    /// Runs step `name` once per key: on a later attempt, a step that finished returns its
    /// recorded result without running. An `Err` from `f` records nothing (the step runs again
    /// on the next attempt).
    ///
    /// # Errors
    /// [`StepError::Failed`] with `f`'s error; [`StepError::Store`] with
    /// [`Error::StepSequenceChanged`] (this attempt's steps differ from the recorded ones),
    /// [`Error::InvalidStep`], [`Error::CorruptStep`], [`Error::Decode`],
    /// [`Error::ResultTooLarge`] / [`Error::ResultNotEncodable`] or [`Error::Storage`].
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
                    match policy.delay_before(tries + 1, started.elapsed(), self.key) {
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

    /// Takes the store error that failed this run, if any.
    pub(crate) fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    fn fail<E>(&mut self, make: impl Fn() -> Error) -> StepError<E> {
        if self.failure.is_none() {
            self.failure = Some(make());
        }
        StepError::Store(make())
    }

    /// Checks the name and takes the next step index.
    fn begin<E>(&mut self, name: &str) -> Result<u32, StepError<E>> {
        if name.is_empty() || name.len() > step::MAX_NAME || !self.names.insert(name.to_owned()) {
            let key = KeyName::new(self.key);
            return Err(self.fail(|| Error::InvalidStep {
                key: key.clone(),
                name: name.to_owned(),
            }));
        }
        let index = self.next_index;
        self.next_index += 1;
        Ok(index)
    }

    /// The recorded result of step `index`, if an earlier attempt finished it.
    fn recorded_result<S: DeserializeOwned, E>(
        &mut self,
        index: u32,
        name: &str,
    ) -> Result<Option<S>, StepError<E>> {
        if self.recorded.is_none() {
            match self.log.steps(self.key) {
                Ok(steps) => self.recorded = Some(steps),
                Err(Error::Storage(e)) => return Err(self.fail(|| Error::Storage(e.clone()))),
                Err(e) => return Err(StepError::Store(e)),
            }
        }
        let key = KeyName::new(self.key);
        let Some(bytes) = self.recorded.as_ref().and_then(|r| r.get(index as usize)) else {
            return Ok(None);
        };
        let decoded =
            step::decode(bytes).map(|s| (s.name.to_owned(), codec::decode::<S>(s.payload)));
        match decoded {
            Err(reason) => Err(self.fail(|| Error::CorruptStep {
                key: key.clone(),
                index,
                reason,
            })),
            Ok((recorded, _)) if recorded != name => {
                Err(self.fail(|| Error::StepSequenceChanged {
                    key: key.clone(),
                    index,
                    recorded: recorded.clone(),
                    requested: name.to_owned(),
                }))
            }
            Ok((_, Ok(value))) => Ok(Some(value)),
            Ok((_, Err(message))) => Err(self.fail(|| Error::Decode {
                key: key.clone(),
                what: "step result",
                message: message.clone(),
            })),
        }
    }

    /// Records a finished step durably.
    fn record<S: Serialize, E>(
        &mut self,
        index: u32,
        name: &str,
        value: &S,
    ) -> Result<(), StepError<E>> {
        let key = KeyName::new(self.key);
        let limit = self.max_result_bytes;
        let payload = match codec::encode(value, limit) {
            Ok(p) => p,
            Err(EncodeFailure::TooLarge { size }) => {
                return Err(self.fail(|| Error::ResultTooLarge {
                    key: key.clone(),
                    size,
                    limit: limit as u64,
                }))
            }
            Err(EncodeFailure::Serializer(message)) => {
                return Err(self.fail(|| Error::ResultNotEncodable {
                    key: key.clone(),
                    message: message.clone(),
                }))
            }
        };
        let written = self
            .log
            .put_step(self.key, index, step::encode(name, &payload))
            .and_then(|()| self.log.barrier());
        match written {
            Ok(()) => Ok(()),
            Err(Error::Storage(e)) => Err(self.fail(|| Error::Storage(e.clone()))),
            Err(e) => Err(StepError::Store(e)),
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
