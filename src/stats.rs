//! Counters of what the store did, their snapshot, and (feature `metrics`) the same events
//! and call latencies through the `metrics` facade.
//!
//! Invariants: counters only grow; each is updated with one relaxed atomic add where the
//! event happens, so reading a snapshot never blocks a call. A snapshot is not atomic across
//! counters. With the feature `metrics`, every add is also reported to the facade under the
//! counter's documented name ([`METRIC_NAMES`]), and calls and durability points are timed;
//! without it nothing is timed and no name is looked up.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::outcome::Outcome;
use crate::error::ExecuteError;

/// One counter, and the name it is reported under.
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    name: &'static str,
}

impl Counter {
    const fn named(name: &'static str) -> Self {
        Self {
            value: AtomicU64::new(0),
            name,
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(self.name).increment(n);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// The live counters.
#[derive(Debug)]
pub(crate) struct Counters {
    pub executions: Counter,
    pub replays: Counter,
    pub waits: Counter,
    pub fingerprint_mismatches: Counter,
    pub in_progress_rejections: Counter,
    pub orphans_recovered: Counter,
    pub orphans_reported: Counter,
    pub records_swept: Counter,
    pub flush_batches: Counter,
}

impl Default for Counters {
    fn default() -> Self {
        let [executions, replays, waits, fingerprint_mismatches, in_progress_rejections, orphans_recovered, orphans_reported, records_swept, flush_batches] =
            METRIC_NAMES.counters.map(|(name, _)| Counter::named(name));
        Self {
            executions,
            replays,
            waits,
            fingerprint_mismatches,
            in_progress_rejections,
            orphans_recovered,
            orphans_reported,
            records_swept,
            flush_batches,
        }
    }
}

/// The names the store reports under (feature `metrics`), with what each measures.
pub struct MetricNames {
    /// Counters, in the order of [`Stats`]' fields: (name, description).
    pub counters: [(&'static str, &'static str); 9],
    /// Histograms of seconds: (name, description).
    pub histograms: [(&'static str, &'static str); 3],
}

/// Every metric the store reports through the `metrics` facade (feature `metrics`); each
/// counter counts the same events as the [`Stats`] field of the same name.
///
/// ```
/// let names: Vec<&str> = idemstore::METRIC_NAMES.counters.iter().map(|(n, _)| *n).collect();
/// assert!(names.contains(&"idemstore_replays_total"));
/// ```
pub const METRIC_NAMES: MetricNames = MetricNames {
    counters: [
        (
            "idemstore_executions_total",
            "times an operation ran (re-runs included)",
        ),
        (
            "idemstore_replays_total",
            "calls answered from a recorded outcome",
        ),
        (
            "idemstore_waits_total",
            "calls that waited for a same-key call",
        ),
        (
            "idemstore_fingerprint_mismatches_total",
            "calls refused: a different request fingerprint",
        ),
        (
            "idemstore_in_progress_rejections_total",
            "calls that gave up waiting (InProgress)",
        ),
        (
            "idemstore_orphans_recovered_total",
            "interrupted runs taken over and re-run (Rerun)",
        ),
        (
            "idemstore_orphans_reported_total",
            "interrupted runs reported (Report)",
        ),
        ("idemstore_records_swept_total", "expired records removed"),
        (
            "idemstore_flush_batches_total",
            "flushes made for Immediate durability",
        ),
    ],
    histograms: [
        (
            "idemstore_replay_seconds",
            "calls answered from a recorded outcome, start to return",
        ),
        (
            "idemstore_run_seconds",
            "calls that ran the operation, start to return (outcome durable)",
        ),
        (
            "idemstore_durable_point_seconds",
            "waits for a durability point (flush and sync)",
        ),
    ],
};

/// Describes every metric to the installed recorder (feature `metrics`), once per open.
pub(crate) fn describe() {
    #[cfg(feature = "metrics")]
    {
        for (name, text) in METRIC_NAMES.counters {
            metrics::describe_counter!(name, text);
        }
        for (name, text) in METRIC_NAMES.histograms {
            metrics::describe_histogram!(name, metrics::Unit::Seconds, text);
        }
    }
}

/// Times one call (feature `metrics`; without it, nothing).
pub(crate) struct CallTimer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl CallTimer {
    pub(crate) fn start() -> Self {
        Self {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    /// Reports the call's latency as a replay or a run, by its result; a store error is not a
    /// latency of either.
    pub(crate) fn finish<T, E>(self, result: &Result<Outcome<T>, ExecuteError<E>>) {
        let replayed = match result {
            Ok(outcome) => outcome.is_replayed(),
            Err(ExecuteError::Operation { replayed, .. }) => *replayed,
            Err(ExecuteError::Store(_)) => return,
        };
        self.finish_as(replayed);
    }

    /// Reports the call's latency as a replay (`true`) or a run.
    pub(crate) fn finish_as(self, replayed: bool) {
        #[cfg(feature = "metrics")]
        {
            let name = METRIC_NAMES.histograms[usize::from(!replayed)].0;
            metrics::histogram!(name).record(self.started.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = replayed;
    }
}

/// Times one durability point (feature `metrics`; without it, nothing).
pub(crate) fn timed_durable_point<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "metrics")]
    {
        let started = std::time::Instant::now();
        let r = f();
        metrics::histogram!(METRIC_NAMES.histograms[2].0).record(started.elapsed().as_secs_f64());
        r
    }
    #[cfg(not(feature = "metrics"))]
    f()
}

/// As [`timed_durable_point`], for an awaited durability point.
#[cfg(feature = "tokio")]
pub(crate) async fn timed_durable_point_async<R>(f: impl std::future::Future<Output = R>) -> R {
    #[cfg(feature = "metrics")]
    {
        let started = std::time::Instant::now();
        let r = f.await;
        metrics::histogram!(METRIC_NAMES.histograms[2].0).record(started.elapsed().as_secs_f64());
        r
    }
    #[cfg(not(feature = "metrics"))]
    f.await
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
    pub(crate) fn bump(counter: &Counter) {
        counter.add(1);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            executions: self.executions.get(),
            replays: self.replays.get(),
            waits: self.waits.get(),
            fingerprint_mismatches: self.fingerprint_mismatches.get(),
            in_progress_rejections: self.in_progress_rejections.get(),
            orphans_recovered: self.orphans_recovered.get(),
            orphans_reported: self.orphans_reported.get(),
            records_swept: self.records_swept.get(),
            flush_batches: self.flush_batches.get(),
        }
    }
}
