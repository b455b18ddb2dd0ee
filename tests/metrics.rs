//! The store's metrics through the `metrics` facade (feature `metrics`): a recorder installed
//! as an exporter would install it sees every counter of `Stats` under its documented name,
//! with the same values, and a latency for each replay, each run and each durability point.
//! One test: the recorder is global to this test binary.

use idemstore::{ExecuteError, Fingerprint, Store, METRIC_NAMES};
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Seen {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
    described: Mutex<Vec<(String, Option<Unit>)>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

#[derive(Clone, Default)]
struct TestRecorder(Arc<Seen>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.0
            .described
            .lock()
            .unwrap()
            .push((key.as_str().to_owned(), unit));
    }
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.0
            .described
            .lock()
            .unwrap()
            .push((key.as_str().to_owned(), unit));
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.0.counters.lock().unwrap();
        Counter::from_arc(counters.entry(key.name().to_owned()).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.0.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(key.name().to_owned()).or_default().clone())
    }
}

impl TestRecorder {
    fn counter(&self, name: &str) -> u64 {
        self.0
            .counters
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
    fn samples(&self, name: &str) -> Vec<f64> {
        self.0
            .histograms
            .lock()
            .unwrap()
            .get(name)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }
}

#[test]
fn counters_and_latencies_reach_the_installed_recorder() {
    let recorder = TestRecorder::default();
    metrics::set_global_recorder(recorder.clone()).expect("the only recorder of this binary");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();

    let described = recorder.0.described.lock().unwrap().clone();
    for (name, _) in METRIC_NAMES.counters {
        assert!(described.iter().any(|(d, _)| d == name), "{name} described");
    }
    for (name, _) in METRIC_NAMES.histograms {
        assert!(
            described
                .iter()
                .any(|(d, unit)| d == name && *unit == Some(Unit::Seconds)),
            "{name} described in seconds"
        );
    }

    let fp = Fingerprint::of_bytes(b"request");
    let run = || {
        store
            .call("k")
            .fingerprint(fp)
            .run(|| Ok::<_, std::io::Error>(7u32))
    };
    assert!(!run().unwrap().is_replayed());
    assert!(run().unwrap().is_replayed());
    assert!(run().unwrap().is_replayed());
    let mismatch = store
        .call("k")
        .fingerprint(Fingerprint::of_bytes(b"another"))
        .run(|| Ok::<_, std::io::Error>(7u32));
    assert!(matches!(mismatch, Err(ExecuteError::Store(_))));
    let failed = store
        .call("p")
        .permanent_if(|_: &String| true)
        .run(|| Err::<u32, _>("declined".to_string()));
    assert!(failed.is_err());
    let again = store
        .call("p")
        .permanent_if(|_: &String| true)
        .run(|| -> Result<u32, String> { panic!("replayed, never run") });
    assert!(matches!(
        again,
        Err(ExecuteError::Operation { replayed: true, .. })
    ));
    // The async API, replay answered by its first look.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replay = runtime
        .block_on(
            store
                .call("k")
                .fingerprint(fp)
                .run_async(|| async { Ok::<_, std::io::Error>(8u32) }),
        )
        .unwrap();
    assert_eq!((*replay, replay.is_replayed()), (7, true));

    let stats = store.stats();
    let by_name: Vec<(&str, u64)> = METRIC_NAMES
        .counters
        .iter()
        .map(|(n, _)| *n)
        .zip([
            stats.executions,
            stats.replays,
            stats.waits,
            stats.fingerprint_mismatches,
            stats.in_progress_rejections,
            stats.orphans_recovered,
            stats.orphans_reported,
            stats.records_swept,
            stats.flush_batches,
        ])
        .collect();
    for (name, value) in &by_name {
        assert_eq!(
            recorder.counter(name),
            *value,
            "{name} counts what Stats counts"
        );
    }
    assert_eq!(
        (
            stats.executions,
            stats.replays,
            stats.fingerprint_mismatches
        ),
        (2, 4, 1)
    );
    assert!(
        stats.flush_batches >= 2,
        "Immediate: each outcome made durable"
    );

    let replays = recorder.samples("idemstore_replay_seconds");
    let runs = recorder.samples("idemstore_run_seconds");
    let durable = recorder.samples("idemstore_durable_point_seconds");
    assert_eq!(
        replays.len(),
        4,
        "two replays of k, one of p, one async: {replays:?}"
    );
    assert_eq!(runs.len(), 2, "k and p ran once each: {runs:?}");
    assert!(
        durable.len() >= 2,
        "the two outcomes' durability points: {durable:?}"
    );
    assert!(replays
        .iter()
        .chain(&runs)
        .chain(&durable)
        .all(|s| *s >= 0.0 && *s < 600.0));
}
