//! Counters of what the store did, and their snapshot.
//!
//! Invariants: counters only grow; each is updated with one relaxed atomic add where the
//! event happens, so reading a snapshot never blocks a call. A snapshot is not atomic across
//! counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub executions: AtomicU64,
    pub replays: AtomicU64,
    pub waits: AtomicU64,
    pub fingerprint_mismatches: AtomicU64,
    pub in_progress_rejections: AtomicU64,
    pub orphans_recovered: AtomicU64,
    pub orphans_reported: AtomicU64,
    pub records_swept: AtomicU64,
    pub flush_batches: AtomicU64,
}

/// A snapshot of the store's counters since it was opened.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// let store = idemstore::Store::open(dir.path().join("db")).unwrap();
/// store.execute_once("k", || Ok::<_, std::io::Error>(1)).unwrap();
/// store.execute_once("k", || Ok::<_, std::io::Error>(1)).unwrap();
/// let stats = store.stats();
/// assert_eq!((stats.executions, stats.replays), (1, 1));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Times an operation ran (including re-runs after retryable errors and orphans).
    pub executions: u64,
    /// Calls answered from a recorded outcome (result or permanent error).
    pub replays: u64,
    /// Calls that waited for another call running the same key.
    pub waits: u64,
    /// Calls refused because their fingerprint differed from the recorded one.
    pub fingerprint_mismatches: u64,
    /// Calls that gave up waiting with `InProgress`.
    pub in_progress_rejections: u64,
    /// Interrupted runs taken over and re-run under `OrphanPolicy::Rerun`.
    pub orphans_recovered: u64,
    /// Interrupted runs reported with `Interrupted` under `OrphanPolicy::Report`.
    pub orphans_reported: u64,
    /// Expired records removed by sweeping.
    pub records_swept: u64,
    /// Flushes made for `Immediate` durability (each covers every caller waiting at the time).
    pub flush_batches: u64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            executions: get(&self.executions),
            replays: get(&self.replays),
            waits: get(&self.waits),
            fingerprint_mismatches: get(&self.fingerprint_mismatches),
            in_progress_rejections: get(&self.in_progress_rejections),
            orphans_recovered: get(&self.orphans_recovered),
            orphans_reported: get(&self.orphans_reported),
            records_swept: get(&self.records_swept),
            flush_batches: get(&self.flush_batches),
        }
    }
}
