//! Outcomes that ran but cannot be stored: how they are recorded, and the error they replay.
//!
//! Invariants: an operation (or a step) whose result or permanent error is too large or does
//! not encode has still run; its record (or step record) says so with its own outcome kind,
//! so it never runs again while the record lives, and every later call gets the same typed
//! error. The payload is the reason: for `TooLarge` the size and the limit (u64 LE each), for
//! `NotEncodable` the serializer's message (UTF-8, at most 1 KiB).

use crate::error::Error;
use crate::format::codec::EncodeFailure;
use crate::format::record::OutcomeKind;
use crate::key::KeyName;

/// The outcome kind and payload that record `failure`, and the error every call gets for it.
pub(crate) fn record(
    key: &[u8],
    failure: EncodeFailure,
    limit: usize,
) -> (OutcomeKind, Vec<u8>, Error) {
    let key = KeyName::new(key);
    match failure {
        EncodeFailure::TooLarge { size } => {
            let limit = limit as u64;
            let mut payload = size.to_le_bytes().to_vec();
            payload.extend_from_slice(&limit.to_le_bytes());
            (
                OutcomeKind::TooLarge,
                payload,
                Error::ResultTooLarge { key, size, limit },
            )
        }
        EncodeFailure::Serializer(message) => {
            let mut cut = message.len().min(1024);
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            let payload = message.as_bytes()[..cut].to_vec();
            (
                OutcomeKind::NotEncodable,
                payload,
                Error::ResultNotEncodable { key, message },
            )
        }
    }
}

/// The error a recorded unstorable outcome replays as; `None` for other kinds.
pub(crate) fn replay(key: &[u8], kind: OutcomeKind, payload: &[u8]) -> Option<Error> {
    // The key's name is made only for an error: a stored outcome's replay allocates nothing here.
    let key = || KeyName::new(key);
    match kind {
        OutcomeKind::TooLarge => Some(
            payload
                .split_first_chunk::<8>()
                .and_then(|(size, rest)| Some((*size, <[u8; 8]>::try_from(rest).ok()?)))
                .map_or_else(
                    || Error::CorruptRecord {
                        key: key(),
                        reason: "bad size note",
                    },
                    |(size, limit)| Error::ResultTooLarge {
                        key: key(),
                        size: u64::from_le_bytes(size),
                        limit: u64::from_le_bytes(limit),
                    },
                ),
        ),
        OutcomeKind::NotEncodable => Some(Error::ResultNotEncodable {
            key: key(),
            message: String::from_utf8_lossy(payload).into_owned(),
        }),
        OutcomeKind::None | OutcomeKind::Stored => None,
    }
}
