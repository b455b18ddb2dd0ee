//! The errors the store returns.
//!
//! Invariants: every failure is a distinct variant naming what was wrong; messages show keys
//! only as their short hash ([`KeyName`]); no path through the store turns bad bytes, a bad
//! key or a storage failure into a panic or into a silent re-run of the caller's closure.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::key::KeyName;

/// What went wrong in the store itself (as opposed to the caller's operation).
///
/// `Clone`, so one failure can be reported to every step that a failed run refuses.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key is empty. Nothing was written.
    #[error("idempotency key is empty")]
    EmptyKey,

    /// The key is longer than the store's `max_key_bytes`. Nothing was written.
    #[error("idempotency key is {len} bytes, over the limit of {limit}")]
    KeyTooLong {
        /// Length of the key in bytes.
        len: usize,
        /// The configured limit.
        limit: usize,
    },

    /// A later call with this key carried a different request fingerprint than the one the
    /// record holds. Nothing ran and nothing changed.
    #[error("{key} was used for a different request (fingerprint mismatch)")]
    FingerprintMismatch {
        /// The key.
        key: KeyName,
    },

    /// Another call in this process is running the operation for this key, and it did not
    /// finish within the wait timeout. Retry later.
    #[error("{key} is in progress in another call (waited {waited:?})")]
    InProgress {
        /// The key.
        key: KeyName,
        /// How long this call waited.
        waited: Duration,
    },

    /// An earlier run of this key was interrupted (its process died, or its outcome could not
    /// be recorded) and the orphan policy is `Report`: the side effect may or may not have
    /// happened. Reconcile, then record the answer with [`Store::resolve`](crate::Store::resolve)
    /// (or `idemstore resolve`): a result, a permanent error, or a release so the next call
    /// runs it; or re-run with `OrphanPolicy::Rerun` on the call.
    #[error(
        "{key} was interrupted in an earlier run (attempt {attempts}); reconcile before re-running"
    )]
    Interrupted {
        /// The key.
        key: KeyName,
        /// Attempts recorded so far, including the interrupted one.
        attempts: u32,
    },

    /// The operation ran, but its outcome could not be recorded because the record changed
    /// under the final write (it was removed or taken over). The store did not overwrite it.
    #[error("{key}: the operation ran but its outcome was not recorded: the record changed while it ran")]
    OutcomeNotRecorded {
        /// The key.
        key: KeyName,
    },

    /// On a shared engine: this call's claim lapsed (its lease ended while it ran, for
    /// example in a process paused past its lease) and another process took the key over.
    /// This call's outcome was not recorded; the record holds the new holder's.
    #[error("{key}: the claim's lease ended and another process took the key over; this outcome was not recorded")]
    LeaseLost {
        /// The key.
        key: KeyName,
    },

    /// The operation's result (or permanent error), encoded, exceeds `max_result_bytes`.
    /// The operation ran; the record remembers that it completed, so it will not run again
    /// for this key, and every later call gets this error too.
    #[error("{key}: the recorded outcome is {size} bytes encoded, over the limit of {limit}")]
    ResultTooLarge {
        /// The key.
        key: KeyName,
        /// Encoded size in bytes.
        size: u64,
        /// The configured limit at the time it was recorded.
        limit: u64,
    },

    /// The operation's outcome could not be serialized. The operation ran; as with
    /// [`Error::ResultTooLarge`] the record remembers that, and every later call gets this error.
    #[error("{key}: could not encode the operation's outcome: {message}")]
    ResultNotEncodable {
        /// The key.
        key: KeyName,
        /// The serializer's message.
        message: String,
    },

    /// A request value given for fingerprinting or key derivation could not be serialized.
    #[error("could not encode the {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The serializer's message.
        message: String,
    },

    /// The stored outcome does not decode as the type this call asked for (the result type
    /// changed since it was recorded). Nothing ran.
    #[error("{key}: the stored {what} does not decode as the requested type: {message}")]
    Decode {
        /// The key.
        key: KeyName,
        /// `"result"` or `"error"`.
        what: &'static str,
        /// The decoder's message.
        message: String,
    },

    /// A permanent error is recorded for this key, but this call declared no permanent errors
    /// (see `Call::permanent_if`) and so cannot decode it. Nothing ran.
    #[error("{key}: a permanent error is recorded, and this call has no way to decode it")]
    PermanentErrorRecorded {
        /// The key.
        key: KeyName,
    },

    /// The bytes stored for this key are not a valid record. Nothing ran; other keys are
    /// unaffected; remove the key to reuse it.
    #[error("{key}: stored record is corrupt: {reason}")]
    CorruptRecord {
        /// The key.
        key: KeyName,
        /// What was wrong with the bytes.
        reason: &'static str,
    },

    /// The record for this key was written by a newer version of idemstore.
    #[error(
        "{key}: stored record has format version {version}, newer than this idemstore supports"
    )]
    UnsupportedRecordVersion {
        /// The key.
        key: KeyName,
        /// The version byte found.
        version: u8,
    },

    /// A retry of a multi-step operation asked for a different step than the one recorded at
    /// this position: step names must be deterministic across attempts. Nothing ran.
    #[error(
        "{key}: step {index} was recorded as {recorded:?}, this attempt asked for {requested:?}"
    )]
    StepSequenceChanged {
        /// The key.
        key: KeyName,
        /// The step's position (0-based).
        index: u32,
        /// The name recorded by an earlier attempt.
        recorded: String,
        /// The name this attempt used.
        requested: String,
    },

    /// A step name was used twice in one run, or is empty or over 1 KiB. Nothing ran.
    #[error("{key}: step name {name:?} is used twice in one run, or is empty or too long")]
    InvalidStep {
        /// The key.
        key: KeyName,
        /// The step name.
        name: String,
    },

    /// The bytes recorded for a step are corrupt. Nothing ran.
    #[error("{key}: recorded step {index} is corrupt: {reason}")]
    CorruptStep {
        /// The key.
        key: KeyName,
        /// The step's position (0-based).
        index: u32,
        /// What was wrong.
        reason: &'static str,
    },

    /// [`Store::resolve`](crate::Store::resolve) was refused: the key's record is not an
    /// interrupted run (a live Pending record whose holder is gone). Nothing changed.
    #[error("{key} is not an interrupted run: {}", not_an_orphan(*.found, *.holder_live))]
    NotAnOrphan {
        /// The key.
        key: KeyName,
        /// The live record's state (None: no live record).
        found: Option<crate::RecordState>,
        /// A holder is still running the key (in this process, or with a live lease), or
        /// acted on it while the resolution was being made.
        holder_live: bool,
    },

    /// [`Store::import`](crate::Store::import) met a line it cannot read. Lines before it
    /// were imported.
    #[error("import line {line}: {reason}")]
    ImportLine {
        /// The line's number (1-based).
        line: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A name for a user tree was refused: names starting with `idemstore/` are the store's.
    #[error("tree name {0:?} is reserved for the store")]
    ReservedTreeName(String),

    /// Another process (or another open `Store` in this process) holds the database open.
    #[error("store at {path:?} is locked: another process (or another open Store in this process) has it open")]
    Locked {
        /// The database directory.
        path: PathBuf,
    },

    /// The path exists but is not an idemstore database.
    #[error("{path:?} is not an idemstore database: {reason}")]
    NotAStore {
        /// The path given to open.
        path: PathBuf,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The directory was an idemstore database, but the storage engine no longer finds its
    /// data (its files were damaged or replaced). Opening it as new would forget every
    /// recorded outcome, so the store refuses; restore the directory from a backup, or remove
    /// it to start empty.
    #[error("store at {path:?} is damaged: {reason}")]
    Damaged {
        /// The database directory.
        path: PathBuf,
        /// What is missing.
        reason: &'static str,
    },

    /// The database was written by a newer version of idemstore.
    #[error("store at {path:?} has format version {found}, newer than this idemstore supports")]
    UnsupportedStoreVersion {
        /// The database directory.
        path: PathBuf,
        /// The version found.
        found: u32,
    },

    /// The PostgreSQL schema was written by a newer version of idemstore.
    #[error(
        "PostgreSQL schema {schema:?} has version {found}, newer than this idemstore supports"
    )]
    UnsupportedSchemaVersion {
        /// The schema's name.
        schema: String,
        /// The version found.
        found: i32,
    },

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),

    /// The storage engine failed (I/O error such as a full disk, or detected corruption).
    /// When this is returned before the operation ran, it did not run.
    #[error("storage error: {0}")]
    Storage(StorageError),

    /// An I/O error outside the storage engine's own calls (inspecting, creating or syncing
    /// the store's files), with the path it concerns.
    #[error("I/O error on {path:?}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// A failure inside the storage engine, opaque: its message, its source chain, and (for I/O
/// failures) the operating system's error kind.
///
/// ```
/// # fn check(e: &idemstore::Error) {
/// if let idemstore::Error::Storage(storage) = e {
///     if storage.io_kind() == Some(std::io::ErrorKind::StorageFull) { /* free some space */ }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct StorageError {
    inner: Arc<dyn std::error::Error + Send + Sync>,
    io_kind: Option<std::io::ErrorKind>,
    kind: StorageKind,
}

/// What kind of storage failure a [`StorageError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageKind {
    /// A local I/O operation failed (see [`StorageError::io_kind`]), or the engine found
    /// damage.
    Io,
    /// The database server could not be reached, or the connection broke (a restart, a
    /// terminated backend, a network failure). Whether a write sent before the break took
    /// effect is unknown; the store never assumes it did not.
    Connection,
    /// A wait for the database ran out: a statement timeout, no answer within the I/O
    /// timeout, or no pooled connection in time.
    Timeout,
    /// A row the call needed stayed locked by another transaction (a transactional call of
    /// another replica, say) longer than the store waits for a lock.
    Busy,
    /// The database refused a statement (a permission, a constraint, a full disk on the server).
    Database,
}

impl StorageError {
    pub(crate) fn new(
        e: impl std::error::Error + Send + Sync + 'static,
        io_kind: Option<std::io::ErrorKind>,
    ) -> Self {
        Self::of_kind(e, io_kind, StorageKind::Io)
    }

    pub(crate) fn of_kind(
        e: impl std::error::Error + Send + Sync + 'static,
        io_kind: Option<std::io::ErrorKind>,
        kind: StorageKind,
    ) -> Self {
        Self {
            inner: Arc::new(e),
            io_kind,
            kind,
        }
    }

    /// The I/O error kind, when the engine failed on an I/O operation.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        self.io_kind
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StorageKind {
        self.kind
    }

    /// The engine's own error, to downcast (for example to `tokio_postgres::Error`, for its
    /// SQLSTATE).
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.inner
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

impl Error {
    /// Whether the storage failed because a row stayed locked by another transaction.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(self, Error::Storage(e) if e.kind() == StorageKind::Busy)
    }

    /// The key this error concerns, if it concerns one.
    pub fn key(&self) -> Option<&KeyName> {
        match self {
            Error::FingerprintMismatch { key }
            | Error::InProgress { key, .. }
            | Error::Interrupted { key, .. }
            | Error::OutcomeNotRecorded { key }
            | Error::LeaseLost { key }
            | Error::ResultTooLarge { key, .. }
            | Error::ResultNotEncodable { key, .. }
            | Error::Decode { key, .. }
            | Error::PermanentErrorRecorded { key }
            | Error::CorruptRecord { key, .. }
            | Error::UnsupportedRecordVersion { key, .. }
            | Error::StepSequenceChanged { key, .. }
            | Error::InvalidStep { key, .. }
            | Error::CorruptStep { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The error of [`Store::execute_once`](crate::Store::execute_once): the operation's own error,
/// or the store's.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use idemstore::{ExecuteError, Store};
/// let store = Store::open(dir.path().join("db"))?;
/// let res = store.execute_once("k", || Err::<u32, _>(std::io::Error::other("timeout")));
/// assert!(matches!(res, Err(ExecuteError::Operation { replayed: false, .. })));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum ExecuteError<E> {
    /// The operation returned this error: just now, or (when `replayed`) in an earlier call
    /// that recorded it as permanent. Displays as the error itself.
    Operation {
        /// The operation's error.
        error: E,
        /// Whether this error was recorded by an earlier call rather than returned just now.
        replayed: bool,
    },
    /// The store could not keep its contract for this call; see [`Error`].
    Store(Error),
}

impl<E> From<Error> for ExecuteError<E> {
    fn from(e: Error) -> Self {
        ExecuteError::Store(e)
    }
}

impl<E: std::fmt::Display> std::fmt::Display for ExecuteError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecuteError::Operation { error, replayed } => {
                write!(f, "operation failed: {error}")?;
                if *replayed {
                    f.write_str(" (recorded by an earlier call, replayed)")?;
                }
                Ok(())
            }
            ExecuteError::Store(e) => std::fmt::Display::fmt(e, f),
        }
    }
}

/// The source chain continues with the operation's error's own source (the error itself is
/// already in the message), or with the store error's.
impl<E: std::error::Error + 'static> std::error::Error for ExecuteError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExecuteError::Operation { error, .. } => error.source(),
            ExecuteError::Store(e) => e.source(),
        }
    }
}

impl<E> ExecuteError<E> {
    /// The operation's error, if this is one.
    pub fn into_operation_error(self) -> Option<E> {
        match self {
            ExecuteError::Operation { error, .. } => Some(error),
            ExecuteError::Store(_) => None,
        }
    }

    /// The store's error, if this is one.
    pub fn store_error(&self) -> Option<&Error> {
        match self {
            ExecuteError::Store(e) => Some(e),
            ExecuteError::Operation { .. } => None,
        }
    }
}

fn not_an_orphan(found: Option<crate::RecordState>, holder_live: bool) -> String {
    match (found, holder_live) {
        (_, true) => "its holder is still running (or acted on it meanwhile)".into(),
        (None, false) => "it has no live record".into(),
        (Some(state), false) => format!("its record is {state:?}, not Pending"),
    }
}
