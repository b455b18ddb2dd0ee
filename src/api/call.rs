//! Per-call options: fingerprint, TTL, wait, orphan policy, and which errors are permanent.
//!
//! Invariants: a call's error policy decides at compile time whether its error type needs an
//! encoding: [`AllRetryable`] (the default) never stores an error, so any `E` works, serde or
//! not; only [`PermanentIf`] requires `E: Serialize + DeserializeOwned`, because only a
//! permanent error is recorded and replayed.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

use crate::api::store::Store;
use crate::core::options::{CallOptions, OrphanPolicy};
use crate::core::outcome::Outcome;
use crate::core::policy::{AllRetryable, ErrorPolicy, PermanentIf};
use crate::driver::context::Context;
use crate::driver::transaction::TxResult;
use crate::engine::sled::SledEngine;
use crate::engine::Engine;
use crate::error::ExecuteError;
use crate::format::codec::Codec;
use crate::format::fingerprint::Fingerprint;
use crate::stats::CallTimer;

/// One call being configured: made by [`Store::call`], run by [`Call::run`].
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use idemstore::{Fingerprint, Store};
/// use std::time::Duration;
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize, thiserror::Error)]
/// enum PayError {
///     #[error("card declined")]
///     Declined,
///     #[error("gateway timeout")]
///     Timeout,
/// }
///
/// let store = Store::open(dir.path().join("db"))?;
/// let request = ("tok_visa", 4200u64);
/// let call = || store
///     .call("order-1")
///     .fingerprint(Fingerprint::of(&request).unwrap())
///     .ttl(Duration::from_secs(3600))
///     .permanent_if(|e: &PayError| matches!(e, PayError::Declined));
///
/// let first = call().run(|| Err::<u64, _>(PayError::Declined));
/// let again = call().run(|| Ok::<u64, PayError>(1)); // not run: the decline is replayed
/// assert!(matches!(again, Err(idemstore::ExecuteError::Operation { replayed: true, .. })));
/// # let _ = first; Ok(()) }
/// ```
#[must_use = "a call does nothing until `run`"]
#[allow(private_bounds)]
pub struct Call<'s, 'k, P = AllRetryable, S: Engine = SledEngine> {
    pub(crate) store: &'s Store<S>,
    pub(crate) key: &'k [u8],
    pub(crate) options: CallOptions,
    pub(crate) policy: P,
}

#[allow(private_bounds)]
impl<'s, 'k, P, S: Engine> Call<'s, 'k, P, S> {
    /// The request's fingerprint: a later call with this key and a different fingerprint gets
    /// [`Error::FingerprintMismatch`](crate::Error::FingerprintMismatch) and nothing runs.
    pub fn fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.options.fingerprint = Some(fingerprint);
        self
    }

    /// This record's TTL, counted from its claim, instead of the store's default (at least 1 ms).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = Some(ttl.max(Duration::from_millis(1)));
        self
    }

    /// How long this call waits for another call running the same key.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.options.wait_timeout = Some(timeout);
        self
    }

    /// A retryable error (or a panic) of this call leaves no record: the key is released, as
    /// if it had never been used, so the next call with it runs afresh — with any fingerprint
    /// — and starts again at attempt 1. (By default a retryable failure is recorded: the next
    /// call must carry the same fingerprint, and the attempt count grows.) Permanent errors
    /// and results are recorded as always.
    pub fn forget_retryable_errors(mut self) -> Self {
        self.options.forget_retryable = true;
        self
    }

    /// What this call does with an interrupted earlier run; see [`OrphanPolicy`].
    /// `Rerun` here lets a caller that reconciled after [`Error::Interrupted`](crate::Error::Interrupted) proceed.
    pub fn orphan_policy(mut self, policy: OrphanPolicy) -> Self {
        self.options.orphan_policy = Some(policy);
        self
    }

    /// How this call's outcome (result, permanent error, step results) is encoded, instead of
    /// the store's setting; see [`Codec`]. Replays decode with the codec the record was
    /// written with, whatever this says.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.options.codec = Some(codec);
        self
    }

    /// Declares which errors are permanent: those are recorded and replayed to later calls
    /// (the operation does not run again); all others stay retryable. Recording an error
    /// needs an encoding, so `E` must be serde here.
    pub fn permanent_if<E, F>(self, is_permanent: F) -> Call<'s, 'k, PermanentIf<F>, S>
    where
        F: Fn(&E) -> bool,
        E: Serialize + DeserializeOwned,
    {
        Call {
            store: self.store,
            key: self.key,
            options: self.options,
            policy: PermanentIf(is_permanent),
        }
    }

    /// Runs `f` once for this key (or replays its recorded outcome); see
    /// [`Store::execute_once`] for the full contract.
    ///
    /// # Errors
    /// As [`Store::execute_once`].
    pub fn run<T, E, F>(self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T, E>,
        P: ErrorPolicy<E>,
    {
        let timer = CallTimer::start();
        let result = crate::driver::execute::execute(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            |_| f(),
        );
        timer.finish(&result);
        result
    }

    /// As [`run`](Self::run), for an operation made of named steps; see
    /// [`Store::execute_steps`].
    ///
    /// # Errors
    /// As [`Store::execute_steps`].
    pub fn run_steps<T, E, F>(mut self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut Context<'_>) -> Result<T, E>,
        P: ErrorPolicy<E>,
    {
        self.options.with_steps = true;
        let timer = CallTimer::start();
        let result = crate::driver::execute::execute(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            f,
        );
        timer.finish(&result);
        result
    }

    /// The former name of [`run_steps`](Self::run_steps).
    ///
    /// # Errors
    /// As [`run_steps`](Self::run_steps).
    #[deprecated(since = "0.2.0", note = "renamed to `run_steps`")]
    pub fn run_with<T, E, F>(self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut Context<'_>) -> Result<T, E>,
        P: ErrorPolicy<E>,
    {
        self.run_steps(f)
    }
}

/// The sled-specific part of a call: exactly-once local effects.
impl<P> Call<'_, '_, P, SledEngine> {
    /// As [`run`](Self::run), with the operation's writes to `trees` committed in one
    /// transaction with its outcome; see [`Store::execute_once_in_tx`].
    ///
    /// # Errors
    /// As [`Store::execute_once_in_tx`].
    pub fn run_in_tx<T, E, F>(
        self,
        trees: &[&sled::Tree],
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(&[sled::transaction::TransactionalTree]) -> TxResult<T, E>,
        P: ErrorPolicy<E>,
    {
        crate::driver::transaction::execute_in_tx(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            trees,
            f,
        )
    }
}
