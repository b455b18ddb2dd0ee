//! What record an operation's result becomes, and what its caller gets.
//!
//! Invariants: pure (encoding is CPU work; the user's `Serialize` and `permanent_if` may
//! panic, which the driver's claim guard covers): a result that encodes and decodes back is
//! Completed; a permanent error likewise FailedPermanent; one that does not is recorded as
//! unstorable in the same state, so the operation never runs again; a retryable error or a
//! panic is FailedRetryable with nothing to replay; a store failure inside the run (a step)
//! wins over whatever the operation returned, and is terminal when a step ran but could not be
//! stored.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::policy::ErrorPolicy;
use crate::error::{Error, ExecuteError};
use crate::format::codec::{self, Codec};
use crate::format::record::{OutcomeKind, RecordState};
use crate::format::unstorable;

/// Why a run must fail whatever the operation returns (a step's store error).
pub(crate) struct RunFailure {
    pub error: Error,
    /// Set when a step ran but its outcome could not be stored: the run's record ends with
    /// this outcome kind and payload, so the operation never runs again.
    pub terminal: Option<(OutcomeKind, Vec<u8>)>,
    /// Set when a step ran and its record's write or durability point failed: whether the
    /// step is recorded is unknown, as for an operation whose outcome write failed, so the
    /// claim stays Pending (an orphan, handled by the orphan policy).
    pub in_doubt: bool,
}

/// What the caller gets, once the record is written.
pub(crate) enum Reply<T, E> {
    Value(T),
    Error(ExecuteError<E>),
    Panic(Box<dyn std::any::Any + Send>),
}

/// The record a run's result becomes, and the reply.
pub(crate) struct Settled<T, E> {
    /// Leave the claim's Pending record as it is (see [`RunFailure::in_doubt`]).
    pub keep_claim: bool,
    pub state: RecordState,
    pub outcome: OutcomeKind,
    pub payload: Vec<u8>,
    pub codec: Codec,
    pub shape: Option<u64>,
    pub reply: Reply<T, E>,
}

/// Settles a run of `key`: `ran` is what the operation returned (or its panic).
pub(crate) fn settle<T, E, P>(
    key: &[u8],
    ran: std::thread::Result<Result<T, E>>,
    failure: Option<RunFailure>,
    policy: &P,
    codec: Codec,
    limit: usize,
) -> Settled<T, E>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    let plain = |state, reply| Settled {
        keep_claim: false,
        state,
        outcome: OutcomeKind::None,
        payload: Vec::new(),
        codec,
        shape: None,
        reply,
    };
    let stored = |state, encoded: Result<codec::Encoded, codec::EncodeFailure>, ok: Reply<T, E>| {
        match encoded {
            Ok(e) => Settled {
                keep_claim: false,
                state,
                outcome: OutcomeKind::Stored,
                payload: e.bytes,
                codec: e.codec,
                shape: Some(e.shape),
                reply: ok,
            },
            Err(failure) => {
                let (outcome, payload, error) = unstorable::record(key, failure, limit);
                Settled {
                    keep_claim: false,
                    state,
                    outcome,
                    payload,
                    codec,
                    shape: None,
                    reply: Reply::Error(error.into()),
                }
            }
        }
    };
    match (ran, failure) {
        // A step ran and whether it is recorded is unknown: leave the claim an orphan.
        (
            ran,
            Some(RunFailure {
                error,
                in_doubt: true,
                ..
            }),
        ) => Settled {
            keep_claim: true,
            ..plain(
                RecordState::Pending,
                match ran {
                    Err(panic) => Reply::Panic(panic),
                    Ok(_) => Reply::Error(error.into()),
                },
            )
        },
        // A step ran but could not be stored: the operation is finished with that error,
        // whatever it returned, and even if it then panicked (the panic goes on).
        (
            ran,
            Some(RunFailure {
                error,
                terminal: Some((outcome, payload)),
                ..
            }),
        ) => Settled {
            keep_claim: false,
            state: RecordState::Completed,
            outcome,
            payload,
            codec,
            shape: None,
            reply: match ran {
                Err(panic) => Reply::Panic(panic),
                Ok(_) => Reply::Error(error.into()),
            },
        },
        (Err(panic), _) => plain(RecordState::FailedRetryable, Reply::Panic(panic)),
        // A step the store could not record or replay fails the run, whatever it returned.
        (
            Ok(_),
            Some(RunFailure {
                error,
                terminal: None,
                ..
            }),
        ) => plain(RecordState::FailedRetryable, Reply::Error(error.into())),
        (Ok(Ok(value)), None) => {
            let encoded = codec::encode(&value, codec, limit);
            stored(RecordState::Completed, encoded, Reply::Value(value))
        }
        (Ok(Err(error)), None) if policy.is_permanent(&error) => {
            let encoded = policy.encode(&error, codec, limit);
            let reply = Reply::Error(ExecuteError::Operation {
                error,
                replayed: false,
            });
            stored(RecordState::FailedPermanent, encoded, reply)
        }
        (Ok(Err(error)), None) => plain(
            RecordState::FailedRetryable,
            Reply::Error(ExecuteError::Operation {
                error,
                replayed: false,
            }),
        ),
    }
}
