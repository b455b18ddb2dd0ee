//! Which errors of an operation are permanent (recorded and replayed), and how they are
//! stored.
//!
//! Invariants: a call's error policy decides at compile time whether its error type needs an
//! encoding: [`AllRetryable`] (the default) never stores an error, so any `E` works, serde or
//! not; only [`PermanentIf`] requires `E: Serialize + DeserializeOwned`, because only a
//! permanent error is recorded and replayed.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::format::codec::{self, Codec, EncodeFailure, Encoded};

/// The default error policy: every error is retryable, none is stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllRetryable;

/// An error policy from a predicate: errors it accepts are permanent and recorded.
#[derive(Debug, Clone, Copy)]
pub struct PermanentIf<F>(pub(crate) F);

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
