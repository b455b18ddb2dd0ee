//! Adversarial tests of the PostgreSQL read lanes: reads of
//! records go down a few shared connections, many callers' statements pipelined on each;
//! batched reads share one key's row; every connection lives on the engine's runtime.
//! Needs `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{hold_in_session, named, pg_url, PgSchema};
use common::wait_until;
use idemstore::{Error, ExecuteError, PgOptions, PgStore, StorageKind, StoreBuilder};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

type Io = std::io::Error;

/// A store on `options` with no sweeper.
fn open(options: PgOptions) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(options)
        .expect("open")
}

/// The storage kind of a store error, if it is one.
fn storage_kind<E>(e: &ExecuteError<E>) -> Option<StorageKind> {
    match e {
        ExecuteError::Store(Error::Storage(s)) => Some(s.kind()),
        _ => None,
    }
}

/// Replays enough recorded keys (`prefix`-0..`count`) that the store reads first and every
/// lane is connected.
fn warm(store: &PgStore, prefix: &str, count: u64) {
    for i in 0..64u64 {
        let k = i % count;
        let out = store
            .execute_once(format!("{prefix}-{k}"), || -> Result<u64, Io> {
                panic!("warm-up replay of {prefix}-{k} ran its operation")
            })
            .expect("a warm-up replay");
        assert_eq!(*out, k);
    }
    assert!(
        !store.__claims_first(),
        "replays turned the store to reading first"
    );
}

/// Store sessions named `app`, as pids.
fn sessions(schema: &PgSchema, app: &str, extra: &str) -> Vec<i32> {
    schema
        .sql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '{app}' {extra}"
        ))
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .collect()
}

/// Promise (design §13 "Read lanes"; tests/pg_runtimes.rs): callers do not
/// wait for each other's answers, and a caller's runtime that stops being driven stalls none
/// of the store's later statements. An async replay of a large record is polled once (its
/// read is sent down a lane) and its runtime's only thread then goes on to other work for a
/// moment; meanwhile sync replays of small records from another thread must all answer.
///
/// The large record's length is chosen so that its answer reaches the client in three pieces
/// (the row ends a few bytes before a 256 KiB boundary of the lane's read buffer, splitting
/// the statement's closing messages off): tokio-postgres then holds that connection's reading
/// until the undriven caller takes its pieces, and every read pipelined behind it waits.
/// Over a real network such splits happen by themselves; on loopback they need this alignment.
#[test]
fn an_async_replay_left_undriven_stalls_no_other_callers_replay() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let builder = || {
        StoreBuilder::default()
            .sweep_interval(None)
            .max_result_bytes(8 << 20)
    };
    let writer = builder()
        .open_postgres(schema.options().pool_size(2))
        .expect("open");
    // The bytes a record adds to its outcome's text, at these lengths.
    let probe = "p".repeat(200_000);
    writer
        .execute_once("probe", || Ok::<_, Io>(probe.clone()))
        .expect("record the probe");
    let stored: i32 =
        schema.sql("SELECT length(record) FROM {s}.records WHERE key = 'probe'::bytea")[0].get(0);
    let overhead = i64::from(stored) - 200_000;
    for k in 0..8u64 {
        writer
            .execute_once(format!("small-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    let runs = AtomicUsize::new(0);
    let mut stalled: Vec<String> = Vec::new();
    for end in [-12i64, -8, -4] {
        // BindComplete (5 bytes), then the DataRow: 11 bytes and the record.
        let len = (1i64 << 18) + end - 16 - overhead;
        let big = "b".repeat(len as usize);
        let key = format!("big{end}");
        writer
            .execute_once(&key, || Ok::<_, Io>(big.clone()))
            .expect("record the large outcome");
        // A store of its own each round: fresh lanes, fresh read buffers.
        let store = builder()
            .open_postgres(
                schema
                    .options()
                    .pool_size(2)
                    .io_timeout(Duration::from_secs(3)),
            )
            .expect("open");
        warm(&store, "small", 8);
        let callers = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (runs, store, key) = (&runs, &store, &key);
        let failures = callers.block_on(async move {
            let mut failures = Vec::new();
            let mut call = Box::pin(store.execute_once_async(key, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<String, Io>(String::new())
            }));
            // One poll: the replay's read is sent down its lane.
            let first = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await;
            if first.is_ready() {
                return failures;
            }
            // This runtime's only thread now works elsewhere for a moment (it waits for
            // another thread's calls), leaving the replay undriven, neither done nor dropped.
            std::thread::sleep(Duration::from_millis(100));
            let replays = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        for i in 0..8u64 {
                            match store.execute_once(format!("small-{i}"), || -> Result<u64, Io> {
                                runs.fetch_add(1, Ordering::SeqCst);
                                Ok(u64::MAX)
                            }) {
                                Ok(out) => assert_eq!(*out, i, "small-{i}"),
                                Err(e) => {
                                    return Some(format!(
                                        "{key}: a sync replay of small-{i} failed ({:?}): {e}",
                                        storage_kind(&e)
                                    ))
                                }
                            }
                        }
                        None
                    })
                    .join()
                    .expect("the sync replays' thread")
            });
            failures.extend(replays);
            match call.await {
                Ok(out) if out.len() == big.len() => {}
                Ok(_) => failures.push(format!("{key}: the large replay answered another record")),
                Err(e) => failures.push(format!("{key}: the large replay, driven again: {e}")),
            }
            failures
        });
        drop(callers);
        let done = !failures.is_empty();
        stalled.extend(failures);
        if done {
            break;
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
    assert!(
        stalled.is_empty(),
        "replays waited out the I/O timeout behind an undriven caller's read: {stalled:#?}"
    );
}

/// Promise (design §13, batch.rs): a read answers from its own key's row in its own scope,
/// and shared rows lie within each caller's call: a replay that starts after another
/// thread's call returned its recorded outcome finds that outcome (never "absent", which
/// would run the operation again), in the right tenant, while crowds of readers share rows.
#[test]
fn replays_after_a_write_returned_find_it_in_their_own_tenant_under_a_crowd() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let tenants = ["ta", "tb", "tc"];
    let stores: Vec<PgStore> = tenants
        .iter()
        .map(|t| open(schema.options().tenant(*t).pool_size(4)))
        .collect();
    let latest: Vec<AtomicU64> = tenants.iter().map(|_| AtomicU64::new(0)).collect();
    let writers_done = AtomicUsize::new(0);
    let runs = AtomicUsize::new(0);
    let wrong: Mutex<Vec<String>> = Mutex::new(Vec::new());
    const VERSIONS: u64 = 120;
    std::thread::scope(|scope| {
        for (t, tenant) in tenants.iter().enumerate() {
            let (store, latest, writers_done) = (&stores[t], &latest, &writers_done);
            scope.spawn(move || {
                for n in 1..=VERSIONS {
                    let out = store
                        .execute_once(format!("lin-{n}"), || Ok::<_, Io>(format!("{tenant}:{n}")))
                        .expect("a writer's call");
                    assert_eq!(*out, format!("{tenant}:{n}"));
                    latest[t].store(n, Ordering::SeqCst);
                }
                writers_done.fetch_add(1, Ordering::SeqCst);
            });
        }
        for r in 0..40usize {
            let (stores, latest, writers_done, runs, wrong) =
                (&stores, &latest, &writers_done, &runs, &wrong);
            scope.spawn(move || {
                let mut i = r;
                while writers_done.load(Ordering::SeqCst) < tenants.len() {
                    i += 1;
                    let t = i % tenants.len();
                    let n = latest[t].load(Ordering::SeqCst);
                    if n == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    // Most readers hit the newest key together (a crowd that shares rows).
                    let m = if i % 4 == 0 {
                        1 + (i as u64 * 7) % n
                    } else {
                        n
                    };
                    let key = format!("lin-{m}");
                    match stores[t].execute_once(&key, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(format!("reader {r} ran"))
                    }) {
                        Ok(out) => {
                            if *out != format!("{}:{m}", tenants[t]) || !out.is_replayed() {
                                wrong.lock().unwrap().push(format!(
                                    "tenant {} {key} (written before the read began): {:?}, \
                                     replayed {}",
                                    tenants[t],
                                    *out,
                                    out.is_replayed()
                                ));
                            }
                        }
                        Err(e) => wrong
                            .lock()
                            .unwrap()
                            .push(format!("tenant {} {key}: {e}", tenants[t])),
                    }
                }
            });
        }
    });
    let wrong = wrong.into_inner().unwrap();
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
}

/// Promise (design §13 "Read lanes"): a read that finds its lane's connection lost is sent
/// once more on a new connection (a read changes nothing); never a wrong answer, never a
/// re-run. Every lane's backend is ended by the server while replays are on their way, several
/// times over (each new lane only once it is set up): every replay answers, right.
#[test]
fn lanes_ended_by_the_server_mid_read_cost_no_replay_an_error_or_a_wrong_answer() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("advl_{}", schema.name);
    let store = open(named(&schema, &app).pool_size(2));
    for k in 0..16u64 {
        store
            .execute_once(format!("kill-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    warm(&store, "kill", 16);
    let lanes_sql =
        "AND (query LIKE 'SELECT record FROM%' OR query LIKE 'SELECT k.key, r.record%')";
    let stop = AtomicBool::new(false);
    let runs = AtomicUsize::new(0);
    let replays = AtomicUsize::new(0);
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut ended: Vec<i32> = Vec::new();
    std::thread::scope(|scope| {
        for t in 0..6u64 {
            let (store, stop, runs, replays, errors) = (&store, &stop, &runs, &replays, &errors);
            scope.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    i += 5;
                    let k = i % 16;
                    match store.execute_once(format!("kill-{k}"), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(u64::MAX)
                    }) {
                        Ok(out) => {
                            assert_eq!(*out, k, "kill-{k}");
                            replays.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => errors
                            .lock()
                            .unwrap()
                            .push(format!("kill-{k} ({:?}): {e}", storage_kind(&e))),
                    }
                }
            });
        }
        for _ in 0..5 {
            // Lanes that are set up: seen twice, a while apart, none ended before.
            let mut settled = Vec::new();
            wait_until("new lanes, set up", || {
                let before = sessions(&schema, &app, lanes_sql);
                std::thread::sleep(Duration::from_millis(150));
                let after = sessions(&schema, &app, lanes_sql);
                settled = before
                    .into_iter()
                    .filter(|p| after.contains(p) && !ended.contains(p))
                    .collect();
                !settled.is_empty()
            });
            for pid in &settled {
                schema.sql(&format!("SELECT pg_terminate_backend({pid})"));
            }
            ended.extend(settled);
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
    });
    assert!(ended.len() >= 5, "lanes were ended ({ended:?})");
    assert!(replays.load(Ordering::SeqCst) > 0);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
    let errors = errors.into_inner().unwrap();
    assert!(
        errors.is_empty(),
        "replays failed after their lane was lost: {errors:#?}"
    );
    drop(store);
    std::thread::sleep(Duration::from_millis(50));
}

/// Promise (`PgOptions::statement_timeout`): the server cancels any statement of the store
/// that runs longer, and the call gets a Timeout error. Lanes connect with the pool's session
/// settings: a replay whose read waits on a table lock is cancelled by the statement timeout
/// (100 ms), before the store's own lock wait (250 ms) would end it as Busy.
#[test]
fn a_replay_on_a_lane_is_cancelled_by_the_stores_statement_timeout() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open(
        schema
            .options()
            .pool_size(2)
            .statement_timeout(Duration::from_millis(100)),
    );
    for k in 0..4u64 {
        store
            .execute_once(format!("st-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    warm(&store, "st", 4);
    let session = hold_in_session(
        &url,
        format!(
            "BEGIN; LOCK TABLE \"{}\".records IN ACCESS EXCLUSIVE MODE",
            schema.name
        ),
        Duration::from_secs(3),
    );
    let runs = AtomicUsize::new(0);
    let got = store.execute_once("st-1", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>(u64::MAX)
    });
    session.join().expect("the locking session");
    match &got {
        Err(ExecuteError::Store(Error::Storage(e))) if e.kind() == StorageKind::Timeout => {
            let code = e
                .get_ref()
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(|e| e.code().cloned());
            assert_eq!(
                code,
                Some(tokio_postgres::error::SqlState::QUERY_CANCELED),
                "the server's statement timeout ended the read: {e}"
            );
        }
        other => panic!("expected the statement timeout's Timeout error, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let out = store
        .execute_once("st-1", || Ok::<_, Io>(u64::MAX))
        .expect("a replay once the lock is gone");
    assert_eq!(*out, 1);
}

/// Promise (async API, lanes.rs): an async call cancelled at any point (its read on its way
/// down a shared lane, or waiting in a batch) changes nothing for anyone: every later answer,
/// on every lane, is its own key's record.
#[test]
fn async_replays_cancelled_mid_read_leave_every_later_answer_right() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = Arc::new(open(schema.options().pool_size(2)));
    for k in 0..32u64 {
        store
            .execute_once(format!("c-{k}"), || Ok::<_, Io>(k * 1000 + 7))
            .expect("record");
    }
    for i in 0..64u64 {
        let k = i % 32;
        let out = store
            .execute_once(format!("c-{k}"), || Ok::<_, Io>(u64::MAX))
            .expect("warm");
        assert_eq!(*out, k * 1000 + 7);
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let wrong: Vec<String> = runtime.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for t in 0..48u64 {
            let (store, runs, cancelled) = (
                Arc::clone(&store),
                Arc::clone(&runs),
                Arc::clone(&cancelled),
            );
            set.spawn(async move {
                let mut wrong = Vec::new();
                let mut seed = t
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                for _ in 0..25 {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let k = (seed >> 33) % 32;
                    let wait = Duration::from_micros((seed >> 20) % 3000);
                    let runs2 = Arc::clone(&runs);
                    let call = store.execute_once_async(format!("c-{k}"), move || async move {
                        runs2.fetch_add(1, Ordering::SeqCst);
                        Ok::<u64, Io>(u64::MAX)
                    });
                    match tokio::time::timeout(wait, call).await {
                        Err(_) => {
                            cancelled.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ok(out)) if *out == k * 1000 + 7 => {}
                        Ok(other) => wrong.push(format!("c-{k} (cut short): {other:?}")),
                    }
                    let k2 = (seed >> 40) % 32;
                    let runs3 = Arc::clone(&runs);
                    match store
                        .execute_once_async(format!("c-{k2}"), move || async move {
                            runs3.fetch_add(1, Ordering::SeqCst);
                            Ok::<u64, Io>(u64::MAX)
                        })
                        .await
                    {
                        Ok(out) if *out == k2 * 1000 + 7 => {}
                        other => wrong.push(format!("c-{k2}: {other:?}")),
                    }
                }
                wrong
            });
        }
        let mut wrong = Vec::new();
        while let Some(done) = set.join_next().await {
            wrong.extend(done.expect("a task"));
        }
        wrong
    });
    drop(runtime);
    assert!(
        cancelled.load(Ordering::SeqCst) > 0,
        "some calls were cut short"
    );
    assert!(wrong.is_empty(), "wrong answers: {wrong:#?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
    for k in 0..32u64 {
        let out = store
            .execute_once(format!("c-{k}"), || Ok::<_, Io>(u64::MAX))
            .expect("a sync replay afterwards");
        assert_eq!(*out, k * 1000 + 7);
    }
}

/// Promise (`PgOptions::pool_size`): the store uses at most pool_size connections, plus one
/// for notifications, one for renewing leases and one read lane; and
/// dropping the store ends them all (bridge.rs: its runtime shuts down, ending the engine's
/// connections).
#[test]
fn a_busy_store_keeps_to_its_connection_budget_and_ends_every_session_when_dropped() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("advc_{}", schema.name);
    let pool = 2usize;
    let lanes = 1usize;
    let budget = pool + 2 + lanes;
    let store = open(named(&schema, &app).pool_size(pool));
    for k in 0..8u64 {
        store
            .execute_once(format!("b-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (stop2, most2, schema2, app2) = (&stop, &most, &schema, &app);
        let sampler = scope.spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let n = sessions(schema2, app2, "").len();
                most2.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let workers: Vec<_> = (0..24u64)
            .map(|t| {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..30u64 {
                        let k = (t * 31 + i) % 8;
                        let out = store
                            .execute_once(format!("b-{k}"), || Ok::<_, Io>(u64::MAX))
                            .expect("a replay");
                        assert_eq!(*out, k);
                        let fresh = format!("n-{t}-{i}");
                        let out = store
                            .execute_once(&fresh, || Ok::<_, Io>(t * 1000 + i))
                            .expect("a new call");
                        assert_eq!(*out, t * 1000 + i);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a worker");
        }
        stop.store(true, Ordering::SeqCst);
        sampler.join().expect("the sampler");
    });
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= budget,
        "{most} sessions at once, over pool_size {pool} + 2 + {lanes} lanes"
    );
    drop(store);
    wait_until("the dropped store's sessions to end", || {
        sessions(&schema, &app, "").is_empty()
    });
}

/// Promise (connect.rs, bridge.rs): lanes first made during async calls on a user's runtime
/// live on the engine's runtime, so they outlive that runtime; and the sync API works when
/// called from inside a tokio runtime (current-thread or multi-thread).
#[test]
fn lanes_first_made_on_a_users_runtime_outlive_it_and_sync_calls_work_inside_runtimes() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    {
        let writer = open(schema.options().pool_size(2));
        for k in 0..16u64 {
            writer
                .execute_once(format!("rt-{k}"), || Ok::<_, Io>(k + 100))
                .expect("record");
        }
    }
    let store = Arc::new(open(
        schema
            .options()
            .pool_size(2)
            .io_timeout(Duration::from_secs(5)),
    ));
    let never = || async { Err::<u64, Io>(Io::other("a replay ran its operation")) };
    let callers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    callers.block_on(async {
        for i in 0..32u64 {
            let k = i % 16;
            let out = store
                .execute_once_async(format!("rt-{k}"), never)
                .await
                .unwrap_or_else(|e| panic!("async replay rt-{k}: {e}"));
            assert_eq!(*out, k + 100);
        }
    });
    drop(callers);
    for i in 0..32u64 {
        let k = i % 16;
        let out = store
            .execute_once(format!("rt-{k}"), || -> Result<u64, Io> {
                panic!("a replay ran its operation")
            })
            .unwrap_or_else(|e| panic!("sync replay rt-{k} after the runtime went: {e}"));
        assert_eq!(*out, k + 100);
    }
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    current.block_on(async {
        for i in 0..16u64 {
            let out = store
                .execute_once(format!("rt-{i}"), || -> Result<u64, Io> {
                    panic!("a replay ran its operation")
                })
                .unwrap_or_else(|e| panic!("sync replay inside a runtime: {e}"));
            assert_eq!(*out, i + 100);
        }
    });
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    multi.block_on(async {
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for i in 0..8u64 {
                        let k = (t + i) % 16;
                        let out = store
                            .execute_once(format!("rt-{k}"), || -> Result<u64, Io> {
                                panic!("a replay ran its operation")
                            })
                            .unwrap_or_else(|e| panic!("sync replay in a task: {e}"));
                        assert_eq!(*out, k + 100);
                        let out = store
                            .execute_once_async(format!("rt-{k}"), never)
                            .await
                            .unwrap_or_else(|e| panic!("async replay in a task: {e}"));
                        assert_eq!(*out, k + 100);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a task");
        }
    });
}

/// Promise (`PgOptions::replay_cache`, replay_cache.rs): after this store removes or rewrites
/// a key, its calls never replay the old record from its cache. One thread removes and
/// re-records a key again and again (publishing each version once its call returned) while a
/// crowd of this store's callers replays it (sharing batched rows and keeping them in the
/// cache): no caller that began after a version was published gets an older one.
#[test]
fn with_a_replay_cache_no_caller_replays_a_version_this_store_replaced() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open(
        schema
            .options()
            .pool_size(4)
            .replay_cache(1000, Duration::from_secs(60)),
    );
    let published = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let stale: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let (store2, published2, done2, stale2) = (&store, &published, &done, &stale);
        scope.spawn(move || {
            for v in 1..=60u64 {
                let mut tries = 0;
                loop {
                    tries += 1;
                    assert!(tries < 1000, "version {v} never got recorded");
                    store2.remove("rc").expect("remove");
                    let out = store2
                        .execute_once("rc", || Ok::<_, Io>(v))
                        .expect("the writer's call");
                    if *out == v {
                        assert!(!out.is_replayed());
                        break;
                    }
                    if *out != 0 {
                        stale2.lock().unwrap().push(format!(
                            "the writer's call for version {v}, right after its own removal, \
                             replayed version {}",
                            *out
                        ));
                    }
                }
                published2.store(v, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            done2.store(true, Ordering::SeqCst);
        });
        for _ in 0..20 {
            let (store, published, done, stale) = (&store, &published, &done, &stale);
            scope.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let before = published.load(Ordering::SeqCst);
                    match store.execute_once("rc", || Ok::<_, Io>(0u64)) {
                        Ok(out) => {
                            let got = *out;
                            if got != 0 && got < before {
                                stale.lock().unwrap().push(format!(
                                    "a replay that began after version {before} was recorded \
                                     got version {got}"
                                ));
                            }
                        }
                        Err(e) => stale.lock().unwrap().push(format!("a reader's call: {e}")),
                    }
                }
            });
        }
    });
    let stale = stale.into_inner().unwrap();
    assert!(
        stale.is_empty(),
        "{} stale answers: {:#?}",
        stale.len(),
        &stale[..stale.len().min(20)]
    );
}

/// Promise (tests/pg_runtimes.rs; design §13 "Batching" and "Read lanes": callers do not wait
/// for each other's answers): a caller's runtime that stops being driven stalls none of the
/// store's later statements. Here a crowd of async replays of small records (more than the
/// reads that may run alone, 16) is polled once each, so every read is sent, and their
/// runtime's only thread then works elsewhere for a moment: a sync replay from another
/// thread must still answer.
#[test]
fn a_crowd_of_undriven_async_replays_holds_up_no_sync_replay() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open(
        schema
            .options()
            .pool_size(4)
            .io_timeout(Duration::from_secs(3)),
    );
    for k in 0..8u64 {
        store
            .execute_once(format!("u-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    warm(&store, "u", 8);
    let runs = AtomicUsize::new(0);
    let callers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (store, runs) = (&store, &runs);
    let (sync, undriven) = callers.block_on(async move {
        // 24 replays on their way, each polled once (one that answered at once is done).
        let mut calls = Vec::new();
        let mut made = 0u64;
        while calls.len() < 24 {
            assert!(made < 1000, "replays kept answering at their first poll");
            let i = made;
            made += 1;
            let mut call = Box::pin(store.execute_once_async(
                format!("u-{}", i % 8),
                move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u64, Io>(u64::MAX)
                },
            ));
            match std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
                Poll::Ready(out) => assert_eq!(out.map(|o| *o).ok(), Some(i % 8)),
                Poll::Pending => calls.push((i, call)),
            }
        }
        // The runtime's only thread works elsewhere for a moment: it waits for a sync replay.
        std::thread::sleep(Duration::from_millis(100));
        let sync = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    store
                        .execute_once("u-3", || -> Result<u64, Io> {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok(u64::MAX)
                        })
                        .map(|out| *out)
                        .map_err(|e| format!("({:?}) {e}", storage_kind(&e)))
                })
                .join()
                .expect("the sync replay's thread")
        });
        let mut undriven = Vec::new();
        for (i, call) in calls {
            undriven.push(
                call.await
                    .map(|out| *out == i % 8)
                    .map_err(|e| e.to_string()),
            );
        }
        (sync, undriven)
    });
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
    assert_eq!(
        sync,
        Ok(3),
        "a sync replay waited out the I/O timeout behind undriven async callers"
    );
    assert!(undriven.iter().all(|r| r == &Ok(true)), "{undriven:?}");
}

/// Promise (lanes.rs: one connect at a time per lane; connect.rs: connections live on the
/// engine's runtime; `PgOptions::pool_size`): async calls cancelled while their store's lanes
/// are being connected leave no stray session behind and break no later read.
#[test]
fn async_calls_cancelled_while_lanes_connect_leave_no_stray_session_or_broken_read() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    {
        let writer = open(schema.options().pool_size(2));
        for k in 0..8u64 {
            writer
                .execute_once(format!("cc-{k}"), || Ok::<_, Io>(k + 1))
                .expect("record");
        }
    }
    let app = format!("advx_{}", schema.name);
    let pool = 2usize;
    let lanes = 1usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut most = 0usize;
    for round in 0..6u64 {
        let store = Arc::new(open(named(&schema, &app).pool_size(pool)));
        let cut = runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for t in 0..24u64 {
                let store = Arc::clone(&store);
                set.spawn(async move {
                    let wait = Duration::from_micros((t * 97 + round * 331) % 4000);
                    let call = store.execute_once_async(format!("cc-{}", t % 8), || async {
                        Err::<u64, Io>(Io::other("a replay ran its operation"))
                    });
                    tokio::time::timeout(wait, call).await.is_err()
                });
            }
            let mut cut = 0;
            while let Some(done) = set.join_next().await {
                cut += usize::from(done.expect("a task"));
            }
            cut
        });
        for k in 0..8u64 {
            let out = store
                .execute_once(format!("cc-{k}"), || -> Result<u64, Io> {
                    panic!("a replay ran its operation")
                })
                .unwrap_or_else(|e| panic!("round {round} ({cut} cut short): cc-{k}: {e}"));
            assert_eq!(*out, k + 1);
        }
        most = most.max(sessions(&schema, &app, "").len());
        drop(store);
        wait_until("the dropped store's sessions to end", || {
            sessions(&schema, &app, "").is_empty()
        });
    }
    assert!(
        most <= pool + 2 + lanes,
        "{most} sessions, over pool_size {pool} + 2 + {lanes} lanes"
    );
}

/// Promise (design §13 "Batching"): a batched outcome (sent unnamed, planned
/// for its batch's scope) is fenced and lands on its own key in its own scope. With one pooled
/// connection per store, outcomes of concurrent calls in three tenants of one schema are
/// batched; every call's outcome, and every later replay, is its own.
#[test]
fn batched_outcomes_of_many_tenants_each_land_on_their_own_key() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let tenants = ["oa", "ob", "oc"];
    let stores: Vec<PgStore> = tenants
        .iter()
        .map(|t| open(schema.options().tenant(*t).pool_size(1)))
        .collect();
    let runs = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for (s, tenant) in tenants.iter().enumerate() {
            for t in 0..8u64 {
                let (store, runs) = (&stores[s], &runs);
                scope.spawn(move || {
                    for i in 0..25u64 {
                        let key = format!("o-{}", (t * 25 + i) % 120);
                        let mine = format!("{tenant}/{t}/{i}");
                        let out = store
                            .execute_once(&key, || {
                                runs.fetch_add(1, Ordering::SeqCst);
                                Ok::<_, Io>(mine.clone())
                            })
                            .unwrap_or_else(|e| panic!("{tenant} {key}: {e}"));
                        assert!(
                            out.starts_with(&format!("{tenant}/")),
                            "{tenant} {key} answered {:?}",
                            *out
                        );
                        if !out.is_replayed() {
                            assert_eq!(*out, mine);
                        }
                    }
                });
            }
        }
    });
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3 * 120,
        "each key ran once per tenant"
    );
    for (s, tenant) in tenants.iter().enumerate() {
        for k in 0..120u64 {
            let out = stores[s]
                .execute_once(format!("o-{k}"), || -> Result<String, Io> {
                    panic!("a replay ran its operation")
                })
                .expect("a replay");
            assert!(
                out.starts_with(&format!("{tenant}/")),
                "{tenant} o-{k}: {:?}",
                *out
            );
        }
    }
}

/// Promise (bridge.rs: dropping the engine never blocks and never panics, and ends its
/// connections; lanes.rs: lane connections end with the engine's runtime): the last handles to
/// a store are held by async tasks whose reads are on their way down the lanes when their
/// runtime is dropped; the drop returns, and every session of the store ends.
#[test]
fn a_store_dropped_with_its_tasks_while_reads_are_in_flight_ends_every_session() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("advd_{}", schema.name);
    let store = Arc::new(open(named(&schema, &app).pool_size(2)));
    for k in 0..8u64 {
        store
            .execute_once(format!("d-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    warm(&store, "d", 8);
    let replays = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    for t in 0..32u64 {
        let (store, replays) = (Arc::clone(&store), Arc::clone(&replays));
        runtime.spawn(async move {
            for i in 0.. {
                let k = (t + i) % 8;
                let out = store
                    .execute_once_async(format!("d-{k}"), || async {
                        Err::<u64, Io>(Io::other("a replay ran its operation"))
                    })
                    .await
                    .expect("a replay");
                assert_eq!(*out, k);
                replays.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    drop(store);
    wait_until("replays under way", || replays.load(Ordering::SeqCst) > 200);
    drop(runtime);
    wait_until("the dropped store's sessions to end", || {
        sessions(&schema, &app, "").is_empty()
    });
}
