//! Per-call options: fingerprint, TTL, wait, orphan policy, and which errors are permanent.
//!
//! Invariants: a call's error policy decides at compile time whether its error type needs an
//! encoding: [`AllRetryable`] (the default) never stores an error, so any `E` works, serde or
//! not; only [`PermanentIf`] requires `E: Serialize + DeserializeOwned`, because only a
//! permanent error is recorded and replayed.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

use crate::codec::{self, Codec, EncodeFailure, Encoded};
use crate::{Context, ExecuteError, Fingerprint, OrphanPolicy, Outcome, Store};

/// Options of one call, as the state machine reads them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallOptions {
    pub fingerprint: Option<Fingerprint>,
    pub ttl: Option<Duration>,
    pub wait_timeout: Option<Duration>,
    pub orphan_policy: Option<OrphanPolicy>,
    /// The operation records steps (`run_with`).
    pub with_steps: bool,
    /// How this call encodes its outcome (None: the store's setting).
    pub codec: Option<Codec>,
}

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
pub struct Call<'s, 'k, P = AllRetryable> {
    pub(crate) store: &'s Store,
    pub(crate) key: &'k [u8],
    pub(crate) options: CallOptions,
    pub(crate) policy: P,
}

impl<'s, 'k, P> Call<'s, 'k, P> {
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
    pub fn permanent_if<E, F>(self, is_permanent: F) -> Call<'s, 'k, PermanentIf<F>>
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
        crate::machine::execute(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            |_| f(),
        )
    }

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
        F: Fn(&[sled::transaction::TransactionalTree]) -> crate::TxResult<T, E>,
        P: ErrorPolicy<E>,
    {
        crate::tx::execute_in_tx(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            trees,
            f,
        )
    }

    /// As [`run`](Self::run), for an operation made of named steps; see
    /// [`Store::execute_once_with`].
    ///
    /// # Errors
    /// As [`Store::execute_once_with`].
    pub fn run_with<T, E, F>(mut self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut Context<'_>) -> Result<T, E>,
        P: ErrorPolicy<E>,
    {
        self.options.with_steps = true;
        crate::machine::execute(
            self.store.shared(),
            self.key,
            &self.options,
            &self.policy,
            f,
        )
    }
}

/// The default error policy: every error is retryable, none is stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllRetryable;

/// An error policy from a predicate: errors it accepts are permanent and recorded.
#[derive(Debug, Clone, Copy)]
pub struct PermanentIf<F>(F);

/// Which errors of type `E` are permanent, and how they are stored. Implemented by
/// [`AllRetryable`] and [`PermanentIf`]; sealed.
pub trait ErrorPolicy<E>: sealed::Classify<E> {}

impl<E, P: sealed::Classify<E>> ErrorPolicy<E> for P {}

pub(crate) mod sealed {
    use super::{Codec, EncodeFailure, Encoded};

    pub trait Classify<E> {
        fn is_permanent(&self, error: &E) -> bool;
        fn encode(&self, error: &E, codec: Codec, limit: usize) -> Result<Encoded, EncodeFailure>;
        /// None: this policy cannot decode stored errors.
        fn decode(
            &self,
            bytes: &[u8],
            codec: Codec,
            shape: Option<u64>,
        ) -> Option<Result<E, String>>;
    }
}

impl<E> sealed::Classify<E> for AllRetryable {
    fn is_permanent(&self, _: &E) -> bool {
        false
    }

    fn encode(&self, _: &E, _: Codec, _: usize) -> Result<Encoded, EncodeFailure> {
        Err(EncodeFailure::Serializer(
            "this call stores no errors".into(),
        ))
    }

    fn decode(&self, _: &[u8], _: Codec, _: Option<u64>) -> Option<Result<E, String>> {
        None
    }
}

impl<E, F> sealed::Classify<E> for PermanentIf<F>
where
    F: Fn(&E) -> bool,
    E: Serialize + DeserializeOwned,
{
    fn is_permanent(&self, error: &E) -> bool {
        (self.0)(error)
    }

    fn encode(&self, error: &E, codec: Codec, limit: usize) -> Result<Encoded, EncodeFailure> {
        codec::encode(error, codec, limit)
    }

    fn decode(&self, bytes: &[u8], codec: Codec, shape: Option<u64>) -> Option<Result<E, String>> {
        Some(codec::decode(bytes, codec, shape))
    }
}
