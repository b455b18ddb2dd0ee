//! What a recorded outcome gives back to a caller.
//!
//! Invariants: pure; a recorded result decodes with the codec and shape it was recorded with,
//! or the caller gets `Decode` (never a different value); an unstorable outcome gives its
//! typed error; a permanent error needs a policy that can decode it
//! (`PermanentErrorRecorded` otherwise). Bad bytes never panic.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::outcome::{Outcome, RecordInfo};
use crate::core::policy::ErrorPolicy;
use crate::error::{Error, ExecuteError};
use crate::format::codec;
use crate::format::record::{DecodeError, OutcomeKind, Record, RecordState};
use crate::format::unstorable;
use crate::key::KeyName;

/// What a terminal record holds for its caller, before any decoding.
pub(crate) enum Recorded<'a> {
    /// A completed call's result, encoded.
    Value(&'a [u8]),
    /// A permanent error the operation returned, encoded.
    PermanentError(&'a [u8]),
}

/// What `rec` (a terminal record of `key`) holds: a stored result or error, or the typed error
/// an unstorable outcome gives.
pub(crate) fn recorded<'a>(key: &[u8], rec: &Record<'a>) -> Result<Recorded<'a>, Error> {
    let h = &rec.header;
    if let Some(error) = unstorable::replay(key, h.outcome, rec.payload) {
        return Err(error);
    }
    match (h.state, h.outcome) {
        (RecordState::Completed, OutcomeKind::Stored) => Ok(Recorded::Value(rec.payload)),
        (RecordState::FailedPermanent, OutcomeKind::Stored) => {
            Ok(Recorded::PermanentError(rec.payload))
        }
        // record::decode admits no other terminal combination.
        _ => Err(Error::CorruptRecord {
            key: KeyName::new(key),
            reason: "outcome kind does not match state",
        }),
    }
}

/// The outcome recorded in `rec` (a terminal record of `key`), as the caller receives it.
pub(crate) fn replay<T, E, P>(
    key: &[u8],
    rec: &Record<'_>,
    policy: &P,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    let name = || KeyName::new(key);
    let h = &rec.header;
    match recorded(key, rec)? {
        Recorded::Value(payload) => match codec::decode::<T>(payload, h.codec, h.shape) {
            Ok(value) => Ok(Outcome::new(value, true, RecordInfo::new(h, payload.len()))),
            Err(message) => Err(Error::Decode {
                key: name(),
                what: "result",
                message,
            }
            .into()),
        },
        Recorded::PermanentError(payload) => match policy.decode(payload, h.codec, h.shape) {
            Some(Ok(error)) => Err(ExecuteError::Operation {
                error,
                replayed: true,
            }),
            Some(Err(message)) => Err(Error::Decode {
                key: name(),
                what: "error",
                message,
            }
            .into()),
            None => Err(Error::PermanentErrorRecorded { key: name() }.into()),
        },
    }
}

/// The error a call gets for bytes that are not a record of `key`.
pub(crate) fn decode_error(key: &[u8], e: DecodeError) -> Error {
    match e {
        DecodeError::Corrupt(reason) => Error::CorruptRecord {
            key: KeyName::new(key),
            reason,
        },
        DecodeError::FutureVersion(version) => Error::UnsupportedRecordVersion {
            key: KeyName::new(key),
            version,
        },
    }
}
