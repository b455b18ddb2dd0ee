//! # idemstore
//!
//! An embedded, durable idempotency store. Wrap a side effect in
//! [`Store::execute_once`]: the first call with a key runs it and durably records its
//! outcome; retries with the same key get that outcome back and the side effect does not run
//! again, across threads, retries, timeouts and process crashes.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # struct Card;
//! # let card = Card;
//! # fn charge(_: &Card, cents: u64) -> Result<String, std::io::Error> { Ok(format!("ch_{cents}")) }
//! let store = idemstore::Store::open(dir.path().join("idem-db"))?;
//! let receipt = store.execute_once("order-7f3a", || charge(&card, 4200))?; // runs once
//! let again = store.execute_once("order-7f3a", || charge(&card, 4200))?; // replayed, no charge
//! assert_eq!(*receipt, *again);
//! assert!(again.is_replayed());
//! # Ok(()) }
//! ```
//!
//! Beyond single operations:
//!
//! - [`Store::execute_once_with`] runs an operation made of named steps ([`Context::step`]):
//!   each step's outcome is recorded as it finishes, so a retry resumes after the last
//!   finished step; the [`Context`] also gives the claim token (fencing) and deterministic
//!   keys for downstream calls.
//! - [`Store::execute_once_in_tx`] commits the operation's writes to your own trees
//!   ([`Store::tree`]) and its outcome in one transaction: exactly once, crash or not.
//! - [`Store::call`] sets per-call options: fingerprint, TTL, wait, orphan policy, and which
//!   errors are permanent (recorded and replayed).
//!
//! The guarantee: for one key, within its TTL, the operation runs once per recorded outcome.
//! Across a crash it can run again only if the crash fell between the durable claim and the
//! durable outcome, and only under [`OrphanPolicy::Rerun`]. See the README for the full
//! contract, durability modes and what each can lose.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod call;
mod clock;
mod codec;
mod config;
mod context;
mod error;
mod fingerprint;
mod group_commit;
mod key;
mod machine;
mod outcome;
mod record;
mod registry;
mod stats;
mod step;
mod storage;
mod store;
mod sweeper;
mod tx;
mod unstorable;
mod walk;

pub use call::{AllRetryable, Call, ErrorPolicy, PermanentIf};
pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::Codec;
pub use config::{Durability, OrphanPolicy, StoreBuilder};
pub use context::{Context, RetryPolicy, StepError};
pub use error::{Error, ExecuteError};
pub use fingerprint::{derive_key, Fingerprint};
pub use key::{key_hash, KeyName};
pub use outcome::{Outcome, RecordInfo};
pub use record::{ClaimToken, RecordState};
pub use stats::Stats;
pub use store::{Records, StepInfo, Store};

/// What the operation of [`Store::execute_once_in_tx`] returns: its value, or
/// `ConflictableTransactionError::Abort(e)` (see `sled::transaction::abort`) to abort with
/// its error `e`. Errors of the transactional views convert with `?`.
pub type TxResult<T, E> = sled::transaction::ConflictableTransactionResult<T, E>;

/// Decodes arbitrary bytes as a stored record; for the fuzz targets and their corpus tests.
/// Returns the record's metadata or the error a call would get for these bytes.
#[doc(hidden)]
pub fn __decode_record(bytes: &[u8]) -> Result<RecordInfo, Error> {
    record::decode(bytes)
        .map(|r| RecordInfo::new(&r.header, r.payload.len()))
        .map_err(|e| machine::decode_error(b"fuzz", e))
}
