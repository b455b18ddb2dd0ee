//! What a call returns, and what inspection shows of a record.
//!
//! Invariants: `Outcome::replayed` is true exactly when the value came from a record written
//! by an earlier call (this call's closure did not run); `RecordInfo` is built from the
//! record header alone, so inspecting never decodes a payload.

use std::ops::Deref;
use std::time::SystemTime;

use crate::clock::to_system_time;
use crate::format::fingerprint::Fingerprint;
use crate::format::record::{ClaimToken, Header, RecordState};

/// The result of a successful call: the value, whether it was replayed, and its record.
///
/// Derefs to the value.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// let store = idemstore::Store::open(dir.path().join("db")).unwrap();
/// let first = store.execute_once("k", || Ok::<_, std::io::Error>(42)).unwrap();
/// let again = store.execute_once("k", || Ok::<_, std::io::Error>(7)).unwrap();
/// assert_eq!((*first, first.is_replayed()), (42, false));
/// assert_eq!((*again, again.is_replayed()), (42, true));
/// ```
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    value: T,
    replayed: bool,
    record: RecordInfo,
}

impl<T> Outcome<T> {
    pub(crate) fn new(value: T, replayed: bool, record: RecordInfo) -> Self {
        Self {
            value,
            replayed,
            record,
        }
    }

    /// Whether the value was recorded by an earlier call (the closure did not run now):
    /// what an HTTP layer reports as `Idempotent-Replayed: true`.
    pub fn is_replayed(&self) -> bool {
        self.replayed
    }

    /// The record's metadata as of this call.
    pub fn record(&self) -> &RecordInfo {
        &self.record
    }

    /// The value.
    pub fn into_value(self) -> T {
        self.value
    }
}

impl<T> Deref for Outcome<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// A record's metadata, readable without decoding its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordInfo {
    /// Lifecycle state.
    pub state: RecordState,
    /// How many times the operation has been started for this key.
    pub attempts: u32,
    /// When the key was first claimed (by the store's clock).
    pub created_at: SystemTime,
    /// When the record last changed.
    pub updated_at: SystemTime,
    /// When the record stops counting (reads as absent) and may be swept.
    pub expires_at: SystemTime,
    /// The request fingerprint the record holds, if any.
    pub fingerprint: Option<Fingerprint>,
    /// The claim that wrote the record (grows with every claim, across restarts).
    pub claim: ClaimToken,
    /// Size of the stored outcome in bytes (0 for none).
    pub outcome_bytes: usize,
}

impl RecordInfo {
    pub(crate) fn new(header: &Header, payload_len: usize) -> Self {
        Self {
            state: header.state,
            attempts: header.attempts,
            created_at: to_system_time(header.created_ms),
            updated_at: to_system_time(header.updated_ms),
            expires_at: to_system_time(header.expires_ms),
            fingerprint: header.fingerprint,
            claim: header.claim,
            outcome_bytes: payload_len,
        }
    }
}
