//! Adversarial tests of the follower's "wait until claimed" (registry `claimed` flag,
//! `follower_wait`) and of PostgreSQL's repeated `end_lease_now`. A failing test is a defect.

mod common;

use common::pg::{hex, pg_url, raw_session, PgSchema};
use idemstore::{
    Durability, Error, ExecuteError, Fingerprint, MemoryEngine, OrphanPolicy, Store, StoreBuilder,
};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

type R = Result<String, String>;

/// The tests of this file measure process CPU and waits: one at a time, so they do not
/// measure each other.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn cpu_secs() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn label(fp: Option<&str>) -> String {
    fp.unwrap_or("none").to_owned()
}

fn classify(r: Result<idemstore::Outcome<String>, ExecuteError<std::io::Error>>) -> R {
    match r {
        Ok(o) => Ok((*o).clone()),
        Err(ExecuteError::Store(Error::FingerprintMismatch { .. })) => Err("mismatch".into()),
        Err(ExecuteError::Store(Error::InProgress { .. })) => Err("inprogress".into()),
        Err(e) => Err(format!("other: {e}")),
    }
}

#[derive(Default)]
struct Runs {
    runs: AtomicU32,
    active: AtomicU32,
    overlap: AtomicBool,
}

impl Runs {
    fn enter(&self) {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.active.fetch_add(1, Ordering::SeqCst) > 0 {
            self.overlap.store(true, Ordering::SeqCst);
        }
    }
    fn leave(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

const FPS: [Option<&str>; 9] = [
    Some("a"),
    Some("b"),
    None,
    Some("a"),
    Some("b"),
    None,
    Some("b"),
    Some("a"),
    Some("c"),
];

/// Checks one mixed trial's results: one run; every compatible caller replays the winner's
/// value; every incompatible one is refused, and well before the run ends.
fn check_mixed(
    what: &str,
    runs: &Runs,
    results: &[(Option<&'static str>, R, Duration)],
    refuse_by: Duration,
) {
    assert_eq!(
        runs.runs.load(Ordering::SeqCst),
        1,
        "{what}: runs {results:?}"
    );
    assert!(
        !runs.overlap.load(Ordering::SeqCst),
        "{what}: overlapping runs"
    );
    let winner = results
        .iter()
        .find_map(|(_, r, _)| r.as_ref().ok().cloned())
        .expect("someone succeeded");
    for (fp, r, took) in results {
        let compatible = fp.is_none() || winner == "none" || Some(winner.as_str()) == *fp;
        if compatible {
            assert_eq!(
                r.as_ref().ok(),
                Some(&winner),
                "{what}: caller {fp:?} (winner {winner}) got {r:?} after {took:?}; all: {results:?}"
            );
        } else {
            assert_eq!(
                r.as_ref().err().map(String::as_str),
                Some("mismatch"),
                "{what}: caller {fp:?} (winner {winner}) got {r:?}; all: {results:?}"
            );
            assert!(
                *took < refuse_by,
                "{what}: mismatched caller {fp:?} refused only after {took:?}; all: {results:?}"
            );
        }
    }
}

macro_rules! mixed_sync {
    ($what:expr, $store:expr, $trials:expr) => {{
        let store = $store;
        const RUN: Duration = Duration::from_millis(2500);
        for trial in 0..$trials {
            let key = format!("mixed-{trial}");
            let runs = Runs::default();
            let barrier = Barrier::new(FPS.len());
            let (mut cpu, mut results) = (0.0, Vec::new());
            std::thread::scope(|s| {
                let handles: Vec<_> = FPS
                    .iter()
                    .enumerate()
                    .map(|(i, &fp)| {
                        let (store, key, runs, barrier) = (&store, &key, &runs, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            // Some start together, some a moment later (after the claim).
                            if i >= 6 {
                                std::thread::sleep(Duration::from_millis(150));
                            }
                            let started = Instant::now();
                            let mut c = store.call(key.as_str());
                            if let Some(fp) = fp {
                                c = c.fingerprint(Fingerprint::of(fp).unwrap());
                            }
                            let r = classify(c.run(|| {
                                runs.enter();
                                std::thread::sleep(RUN);
                                runs.leave();
                                Ok::<_, std::io::Error>(label(fp))
                            }));
                            (fp, r, started.elapsed())
                        })
                    })
                    .collect();
                std::thread::sleep(Duration::from_millis(700));
                let c0 = cpu_secs();
                std::thread::sleep(Duration::from_millis(1500));
                cpu = cpu_secs() - c0;
                results = handles.into_iter().map(|h| h.join().unwrap()).collect();
            });
            check_mixed($what, &runs, &results, Duration::from_millis(2000));
            // Nine callers spinning on two cores would burn about 3 s in these 1.5 s.
            assert!(
                cpu < 1.2,
                "{}: {cpu:.2}s of CPU in 1.5s while callers only waited (spinning?)",
                $what
            );
        }
    }};
}

#[test]
fn sync_mixed_fingerprints_sled() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::builder(dir.path().join("db"))
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(30))
        .open()
        .unwrap();
    mixed_sync!("sled", &store, 2);
}

#[test]
fn sync_mixed_fingerprints_memory() {
    let _serial = serial();
    let engine = MemoryEngine::new();
    let store = engine
        .open(
            Store::builder("memory")
                .sweep_interval(None)
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    mixed_sync!("memory", &store, 2);
}

#[test]
fn sync_mixed_fingerprints_memory_report_and_periodic() {
    let _serial = serial();
    let engine = MemoryEngine::new();
    let store = engine
        .open(
            Store::builder("memory")
                .sweep_interval(None)
                .orphan_policy(OrphanPolicy::Report)
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    mixed_sync!("memory report", &store, 1);
    drop(store);
    let engine = MemoryEngine::new();
    let store = engine
        .open(
            Store::builder("memory")
                .sweep_interval(None)
                .durability(Durability::Periodic(Duration::from_millis(50)))
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    mixed_sync!("memory periodic", &store, 1);
}

#[test]
fn sync_mixed_fingerprints_postgres() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(30))
        .open_postgres(schema.options())
        .unwrap();
    mixed_sync!("postgres", &store, 2);
}

/// Waiters with a short budget (matching or no fingerprint) get InProgress at about their
/// budget, not at once after the claim and not after the whole run; mismatches are refused.
#[test]
fn short_budget_followers_get_in_progress_at_their_budget() {
    let _serial = serial();
    let engine = MemoryEngine::new();
    let store = engine
        .open(Store::builder("memory").sweep_interval(None))
        .unwrap();
    let runs = Runs::default();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let (store, runs) = (&store, &runs);
        s.spawn(move || {
            store
                .call("budget")
                .fingerprint(Fingerprint::of("a").unwrap())
                .run(|| {
                    runs.enter();
                    tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_secs(3));
                    runs.leave();
                    Ok::<_, std::io::Error>("a".to_owned())
                })
                .unwrap();
        });
        rx.recv().unwrap();
        let hs: Vec<_> = [Some("a"), None, Some("b"), Some("a")]
            .into_iter()
            .map(|fp| {
                s.spawn(move || {
                    let started = Instant::now();
                    let mut c = store
                        .call("budget")
                        .wait_timeout(Duration::from_millis(800));
                    if let Some(fp) = fp {
                        c = c.fingerprint(Fingerprint::of(fp).unwrap());
                    }
                    let r = classify(c.run(|| {
                        runs.enter();
                        runs.leave();
                        Ok::<_, std::io::Error>(label(fp))
                    }));
                    (fp, r, started.elapsed())
                })
            })
            .collect();
        for h in hs {
            let (fp, r, took) = h.join().unwrap();
            match fp {
                Some("b") => assert!(
                    r == Err("mismatch".into()) && took < Duration::from_millis(2000),
                    "{fp:?}: {r:?} after {took:?}"
                ),
                _ => assert!(
                    r == Err("inprogress".into())
                        && took >= Duration::from_millis(700)
                        && took < Duration::from_millis(2900),
                    "{fp:?}: {r:?} after {took:?}"
                ),
            }
        }
    });
    assert_eq!(runs.runs.load(Ordering::SeqCst), 1);
}

/// Leaders that fail retryably (forgetting the record), panic or succeed, with followers of
/// every kind: runs never overlap, nothing runs after a success, every caller gets the winner's
/// value or a typed error, nobody hangs and nobody is told InProgress.
fn failing_leaders_storm(store: &Store<MemoryEngine>, trials: usize) {
    let counter = AtomicU64::new(0);
    for trial in 0..trials {
        let key = format!("storm-{trial}");
        let runs = Runs::default();
        let succeeded = AtomicBool::new(false);
        let ran_after_success = AtomicU32::new(0);
        let barrier = Barrier::new(8);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let (store, key, runs, barrier) = (&store, &key, &runs, &barrier);
                    let (succeeded, ran_after_success, counter) =
                        (&succeeded, &ran_after_success, &counter);
                    s.spawn(move || {
                        let fp = [Some("a"), Some("b"), None, Some("a")][i % 4];
                        barrier.wait();
                        if i >= 4 {
                            std::thread::sleep(Duration::from_millis(5 * i as u64));
                        }
                        let started = Instant::now();
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let mut c = store.call(key.as_str()).forget_retryable_errors();
                            if let Some(fp) = fp {
                                c = c.fingerprint(Fingerprint::of(fp).unwrap());
                            }
                            c.run(|| {
                                runs.enter();
                                if succeeded.load(Ordering::SeqCst) {
                                    ran_after_success.fetch_add(1, Ordering::SeqCst);
                                }
                                std::thread::sleep(Duration::from_millis(40));
                                let n = counter.fetch_add(1, Ordering::SeqCst);
                                runs.leave();
                                match n % 3 {
                                    0 => Err(std::io::Error::other("retry")),
                                    1 => panic!("boom"),
                                    _ => {
                                        succeeded.store(true, Ordering::SeqCst);
                                        Ok(label(fp))
                                    }
                                }
                            })
                        }));
                        let r = match out {
                            Err(_) => Err("panicked".to_owned()),
                            Ok(r) => match classify(r) {
                                Err(e) if e.starts_with("other: ") => Err("op-error".into()),
                                r => r,
                            },
                        };
                        (fp, r, started.elapsed())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(!runs.overlap.load(Ordering::SeqCst), "overlap: {results:?}");
        assert_eq!(ran_after_success.load(Ordering::SeqCst), 0, "{results:?}");
        for (fp, r, took) in &results {
            assert!(*took < Duration::from_secs(10), "{fp:?} took {took:?}");
            assert_ne!(
                r.as_ref().err().map(String::as_str),
                Some("inprogress"),
                "{results:?}"
            );
            if let Ok(v) = r {
                assert!(
                    fp.is_none() || v == "none" || Some(v.as_str()) == *fp,
                    "caller {fp:?} got {v}: {results:?}"
                );
            }
        }
    }
}

#[test]
fn failing_leaders_storm_memory() {
    let _serial = serial();
    let engine = MemoryEngine::new();
    let store = engine
        .open(
            Store::builder("memory")
                .sweep_interval(None)
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    failing_leaders_storm(&store, 25);
}

#[test]
fn failing_leaders_storm_memory_report() {
    let _serial = serial();
    let engine = MemoryEngine::new();
    let store = engine
        .open(
            Store::builder("memory")
                .sweep_interval(None)
                .orphan_policy(OrphanPolicy::Report)
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    failing_leaders_storm(&store, 25);
}

/// OrphanPolicy::Report: the leader's claim barrier fails (it never calls `claimed`); the
/// followers that wait "until claimed" must wake when it gives up, and one of them leads.
#[test]
fn followers_wake_when_the_claim_barrier_fails() {
    let _serial = serial();
    let engine = MemoryEngine::new();
    let store = engine
        .open(
            Store::builder("memory")
                .sweep_interval(None)
                .orphan_policy(OrphanPolicy::Report)
                .wait_timeout(Duration::from_secs(30)),
        )
        .unwrap();
    for trial in 0..10 {
        let key = format!("barrier-{trial}");
        let runs = Runs::default();
        engine.fail_nth_barrier(1);
        let barrier = Barrier::new(6);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|i| {
                    let (store, key, runs, barrier) = (&store, &key, &runs, &barrier);
                    s.spawn(move || {
                        let fp = [Some("a"), Some("b"), None][i % 3];
                        barrier.wait();
                        let started = Instant::now();
                        let mut c = store.call(key.as_str());
                        if let Some(fp) = fp {
                            c = c.fingerprint(Fingerprint::of(fp).unwrap());
                        }
                        let r = classify(c.run(|| {
                            runs.enter();
                            std::thread::sleep(Duration::from_millis(100));
                            runs.leave();
                            Ok::<_, std::io::Error>(label(fp))
                        }));
                        (fp, r, started.elapsed())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(!runs.overlap.load(Ordering::SeqCst));
        assert!(runs.runs.load(Ordering::SeqCst) <= 1, "{results:?}");
        for (fp, r, took) in &results {
            assert!(
                *took < Duration::from_secs(5),
                "{fp:?}: {r:?} after {took:?}"
            );
            assert_ne!(
                r.as_ref().err().map(String::as_str),
                Some("inprogress"),
                "{results:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Async.

fn mixed_async(runtime: tokio::runtime::Runtime, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::builder(dir.path().join("db"))
            .sweep_interval(None)
            .wait_timeout(Duration::from_secs(30))
            .open()
            .unwrap(),
    );
    for trial in 0..2 {
        let key = format!("amixed-{trial}");
        let runs = Arc::new(Runs::default());
        let ticks = Arc::new(AtomicU32::new(0));
        let (results, tick_count, cpu) = runtime.block_on(async {
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        ticks.fetch_add(1, Ordering::SeqCst);
                    }
                })
            };
            let hs: Vec<_> = FPS
                .iter()
                .enumerate()
                .map(|(i, &fp)| {
                    let (store, key, runs) = (store.clone(), key.clone(), runs.clone());
                    tokio::spawn(async move {
                        if i >= 6 {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                        }
                        let started = Instant::now();
                        let mut c = store.call(key.as_str());
                        if let Some(fp) = fp {
                            c = c.fingerprint(Fingerprint::of(fp).unwrap());
                        }
                        let r = classify(
                            c.run_async(|| async move {
                                runs.enter();
                                tokio::time::sleep(Duration::from_millis(2500)).await;
                                runs.leave();
                                Ok::<_, std::io::Error>(label(fp))
                            })
                            .await,
                        );
                        (fp, r, started.elapsed())
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let (c0, t0) = (cpu_secs(), ticks.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let (cpu, tick_count) = (cpu_secs() - c0, ticks.load(Ordering::SeqCst) - t0);
            let mut results = Vec::new();
            for h in hs {
                results.push(h.await.unwrap());
            }
            ticker.abort();
            (results, tick_count, cpu)
        });
        check_mixed(what, &runs, &results, Duration::from_millis(2000));
        assert!(
            tick_count >= 40,
            "{what}: runtime starved: {tick_count} ticks in 1.5 s"
        );
        assert!(cpu < 1.2, "{what}: {cpu:.2}s CPU in 1.5 s of waiting");
    }
}

#[test]
fn async_mixed_fingerprints_current_thread() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    mixed_async(rt, "current-thread");
}

#[test]
fn async_mixed_fingerprints_multi_thread() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    mixed_async(rt, "multi-thread");
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: the repeated end_lease of a dropped async call.

/// A dropped async call's late claim lands; the key is then taken by a legitimate holder
/// (same process, then another replica checks). The retried end_lease must not end the
/// legitimate holder's lease: a third replica calling during its run must not run too.
fn dropped_then_legit_holder(legit_in_same_process: bool) {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let lease = Duration::from_secs(8);
    let open = |wait: Duration| {
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(wait)
            .open_postgres(schema.options().lease(lease))
            .unwrap()
    };
    let a = open(Duration::from_secs(10));
    let b = open(Duration::from_secs(10));
    let c = open(Duration::from_millis(500));
    let key = "late-then-legit";
    let (tx, rx) = mpsc::channel();
    let insert = format!(
        "BEGIN; INSERT INTO \"{}\".records (scope, key, record, digest, state, expires_ms, \
         claim_epoch, claim_seq, life_epoch, life_seq) \
         VALUES ('', '\\x{}'::bytea, '\\x00', '\\x00', 1, 0, 0, 0, 0, 0)",
        schema.name,
        hex(key.as_bytes())
    );
    let session = {
        let url = url.clone();
        std::thread::spawn(move || {
            raw_session(
                url,
                vec![
                    (insert, Duration::from_millis(150)),
                    ("ROLLBACK".into(), Duration::ZERO),
                ],
                tx,
            )
        })
    };
    assert_eq!(rx.recv().unwrap(), 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dropped = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(60),
            a.execute_once_async(key, || async {
                Ok::<_, std::io::Error>("dropped".to_owned())
            }),
        )
        .await
    });
    assert!(
        dropped.is_err(),
        "the call was dropped while its claim waited"
    );
    let dropped_at = Instant::now();
    session.join().unwrap();
    let runs = Runs::default();
    std::thread::scope(|s| {
        let legit = if legit_in_same_process { &a } else { &b };
        let runs = &runs;
        let holder = s.spawn(move || {
            classify(legit.execute_once(key, || {
                runs.enter();
                std::thread::sleep(Duration::from_secs(4));
                runs.leave();
                Ok::<_, std::io::Error>("legit".to_owned())
            }))
        });
        // Past every retry of the dropped call's end_lease.
        while dropped_at.elapsed() < Duration::from_millis(2200) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            runs.runs.load(Ordering::SeqCst),
            1,
            "the legitimate holder runs"
        );
        let third = classify(c.execute_once(key, || {
            runs.enter();
            runs.leave();
            Ok::<_, std::io::Error>("third".to_owned())
        }));
        assert_eq!(
            third,
            Err("inprogress".to_owned()),
            "a third replica during the legitimate run"
        );
        assert_eq!(holder.join().unwrap(), Ok("legit".to_owned()));
    });
    assert_eq!(runs.runs.load(Ordering::SeqCst), 1);
    assert!(!runs.overlap.load(Ordering::SeqCst));
}

#[test]
fn pg_dropped_claim_retries_spare_a_later_holder_elsewhere() {
    let _serial = serial();
    dropped_then_legit_holder(false);
}

#[test]
fn pg_dropped_claim_retries_spare_a_later_holder_same_process() {
    let _serial = serial();
    dropped_then_legit_holder(true);
}
