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
//! - [`Store::execute_steps`] runs an operation made of named steps ([`Context::step`]):
//!   each step's outcome is recorded as it finishes, so a retry resumes after the last
//!   finished step; the [`Context`] also gives the claim token (fencing) and deterministic
//!   keys for downstream calls.
//! - [`Store::execute_once_in_tx`] commits the operation's writes to your own trees
//!   ([`Store::tree`]) and its outcome in one transaction: exactly once, crash or not.
//! - [`Store::call`] sets per-call options: fingerprint, TTL, wait, orphan policy, and which
//!   errors are permanent (recorded and replayed).
//! - Operating a store: [`Store::inspect`], [`Store::resolve`] (record what an interrupted
//!   run did), [`Store::export`] / [`Store::import`] (between stores of any engine); the
//!   `idemstore` command of the `idemstore-cli` crate does the same without code.
//!
//! Features: `postgres` (a store many replicas share, `PgStore`), `tokio` (the async API),
//! `http` (a tower `Idempotency-Key` layer), `metrics` (counters and latencies through the
//! `metrics` facade, [`METRIC_NAMES`]), `memory-engine` (fault injection for tests).
//!
//! The guarantee: for one key, within its TTL, the operation runs once per recorded outcome.
//! Across a crash it can run again only if the crash fell between the durable claim and the
//! durable outcome, and only under [`OrphanPolicy::Rerun`]. See the README for the full
//! contract, durability modes and what each can lose.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

// Layers, each depending only on those below it: `api` (the public surface) over `driver`
// (the loops that run calls: plain, transactional, sweeping) over `core` (the contract's rules,
// no I/O) and `engine` (storage engines behind one interface), over `format` (bytes: records,
// steps, codecs, fingerprints) and the shared leaves (`error`, `key`, `clock`, `stats`).
mod api;
mod clock;
mod core;
mod driver;
mod engine;
mod error;
mod format;
mod key;
mod stats;

pub use api::admin::{ImportSummary, RecordDetail, Resolution, StoredOutcome};
pub use api::call::Call;
pub use api::config::StoreBuilder;
/// An `Idempotency-Key` layer for tower HTTP services (feature `http`).
#[cfg(feature = "http")]
pub use api::http;
#[cfg(feature = "postgres")]
pub use api::postgres::{PgOptions, PgStore};
pub use api::store::{Records, StepInfo, Store};
pub use clock::{Clock, ManualClock, SystemClock};
pub use core::options::{Durability, OrphanPolicy};
pub use core::outcome::{Outcome, RecordInfo};
pub use core::policy::{AllRetryable, ErrorPolicy, PermanentIf};
#[cfg(feature = "tokio")]
pub use driver::async_context::AsyncContext;
pub use driver::context::{Context, RetryPolicy, StepError};
pub use driver::transaction::TxResult;
#[cfg(feature = "memory-engine")]
pub use engine::memory::{BarrierStall, MemoryEngine};
#[cfg(feature = "postgres")]
pub use engine::postgres::{PgEngine, PgTx};
pub use engine::sled::SledEngine;
pub use error::{Error, ExecuteError, StorageError, StorageKind};
pub use format::codec::Codec;
pub use format::fingerprint::{derive_key, Fingerprint};
pub use format::record::{ClaimToken, RecordState};
pub use key::{key_hash, KeyName};
/// The sled version the transactional API ([`Store::tree`], [`Store::execute_once_in_tx`])
/// speaks, re-exported so its types need no separate dependency.
pub use sled;
pub use stats::{MetricNames, Stats, METRIC_NAMES};
/// The PostgreSQL client the PostgreSQL engine speaks, re-exported for [`PgTx`]'s rows and
/// parameter types.
#[cfg(feature = "postgres")]
pub use tokio_postgres;

/// Decodes arbitrary bytes as a stored record; for the fuzz targets and their corpus tests.
/// Returns the record's metadata or the error a call would get for these bytes.
#[doc(hidden)]
pub fn __decode_record(bytes: &[u8]) -> Result<RecordInfo, Error> {
    format::record::decode(bytes)
        .map(|r| RecordInfo::new(&r.header, r.payload.len()))
        .map_err(|e| core::replay::decode_error(b"fuzz", e))
}
